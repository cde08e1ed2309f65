"""`st2si prepare`: raw data -> a dataset artifact in the zoo.

The library does the work (`st2si_cli.data.prepare`); this module parses options and prints the
paper's Table 1 statistics. The input is parsed completely before the zoo is opened, so bad input
leaves the zoo untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from st2si_cli.cli.options import check_new_name, open_zoo
from st2si_cli.cli.output import err, out, print_json, safe_text

FORMAT_HELP = (
    "Input format: amazon-raw, recformer, json-lists, recbole, recbole-unisrec, generic (default: detect)."
)


def _report_lines(report: dict[str, Any]) -> list[str]:
    skip = {"source", "format"}
    lines = []
    for key, value in report.items():
        if key in skip:
            continue
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        lines.append(safe_text(f"  {key.replace('_', ' ')}: {shown}"))
    return lines


def _print_table(name: str, art_id: str, fmt: str, stats: dict[str, Any], report: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(safe_text(f"Dataset {name} ({fmt})")), title_justify="left")
    for col in ("Dataset", "#Users", "#Items", "#Interactions", "Avg. length", "Density"):
        table.add_column(col, justify="left" if col == "Dataset" else "right")
    table.add_row(
        Text(safe_text(name)),
        f"{stats['users']:,}",
        f"{stats['items']:,}",
        f"{stats['interactions']:,}",
        f"{stats['avg_length']:.2f}",
        f"{stats['density']:.4%}",
    )
    out.print(table)
    out.print(f"dataset hash: {art_id}", markup=False, soft_wrap=True)
    out.print("report:", markup=False)
    for line in _report_lines(report):
        out.print(line, markup=False, soft_wrap=True)


def _report_replaced(zoo: Any, old: Any, art: Any) -> None:
    """After --replace moved the domain to new data: say so, and name the heads that no longer match."""
    from st2si_cli.data.prepare import stale_heads

    if old is None or old.id == art.id:
        return
    err.print(
        safe_text(f"Replaced dataset {art.name}: {old.short_id} -> {art.short_id}."),
        markup=False,
        soft_wrap=True,
    )
    stale = stale_heads(zoo, art)
    if stale:
        names = ", ".join(f"{h.name or h.short_id} ({h.short_id})" for h in stale)
        err.print(
            safe_text(
                f"{len(stale)} head(s) of {art.name} were trained on other data and no longer match it: {names}"
            ),
            markup=False,
            soft_wrap=True,
        )


def prepare(
    source: Path | None = typer.Argument(
        None,
        metavar="SOURCE",
        help="Folder holding the raw files (or one of its files). Format detected from the file names.",
    ),
    domain: str | None = typer.Option(
        None,
        "--domain",
        callback=check_new_name,
        help="Dataset name in the zoo (default with --source: the index's domain).",
    ),
    format: str | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    source_name: str | None = typer.Option(
        None,
        "--source",
        help="A short name from the dataset index instead of SOURCE (movielens-100k, movielens-1m).",
    ),
    k_core: int = typer.Option(
        0, "--k-core", min=0, help="Keep only users and items with >= K interactions (0: off)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Interactions naming items absent from the item file are an error."
    ),
    items: Path | None = typer.Option(
        None, "--items", help="Item file (with --interactions, instead of SOURCE)."
    ),
    interactions: Path | None = typer.Option(
        None, "--interactions", help="Interaction file (with --items, instead of SOURCE)."
    ),
    min_user_interactions: int = typer.Option(
        3,
        "--min-user-interactions",
        min=3,
        help="Drop users with fewer interactions (leave-one-out needs 3).",
    ),
    replace: bool = typer.Option(
        False,
        "--replace",
        help="The domain already holds other data: point it at this data (its heads then no longer match).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table."),
) -> None:
    """Turn raw data into a dataset artifact (catalog + user sequences) and print its statistics and hash."""
    from st2si_cli.data.prepare import prepare_dataset, resolve_source_name

    src: Path | str | None = source
    if source_name is not None:
        if source is not None or items is not None or interactions is not None:
            raise typer.BadParameter(
                "--source NAME replaces SOURCE and --items/--interactions", param_hint="--source"
            )
        path, fmt_default, entry = resolve_source_name(source_name)
        src = path
        format = format or fmt_default
        domain = domain or entry.get("domain") or source_name
    if not domain:
        raise typer.BadParameter("a dataset needs a name: pass --domain NAME", param_hint="--domain")

    opened: dict[str, Any] = {}

    def zoo_before_put():  # called only after the input parsed: bad input leaves the zoo untouched
        opened["zoo"] = zoo = open_zoo()
        opened["old"] = zoo.find(domain, kind="dataset")
        return zoo

    art, ds = prepare_dataset(
        src,
        format=format,
        domain=domain,
        zoo=zoo_before_put,
        replace=replace,
        k_core=k_core,
        strict=strict,
        min_user_interactions=min_user_interactions,
        item_file=items,
        interactions_file=interactions,
        extra_meta={"source_name": source_name} if source_name else None,
    )
    _report_replaced(opened["zoo"], opened["old"], art)
    fmt = ds.report["format"]
    stats = ds.stats()
    if as_json:
        print_json({"name": domain, "id": art.id, "stats": stats, "report": ds.report, "format": fmt})
    else:
        _print_table(domain, art.id, fmt, stats, ds.report)
