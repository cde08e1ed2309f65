"""`st2si items add / update / rm`: change a domain's catalog; heads place new items from their text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from st2si_cli.cli.options import Placement, device_option, json_option, open_zoo
from st2si_cli.cli.output import out, print_json, safe_text
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta

app = typer.Typer(
    help="Change a domain's catalog: add items (placed from their text, no retraining), retitle, retire.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _report(change: Any, as_json: bool) -> None:
    ds = change.dataset
    info = DatasetMeta.of(ds).catalog
    if as_json:
        print_json(
            {
                "dataset": ds.id,
                "version": info.version,
                "items": info.items,
                "retired": info.retired,
                "changed": change.items,
                "heads": [
                    {"from": old.id, "head": new.name, "id": new.id, **HeadMeta.of(new).catalog.to_dict()}
                    for old, new in change.heads
                ],
                "skipped": [{"head": h.name, "id": h.id, "reason": why} for h, why in change.skipped],
            }
        )
        return
    out.print(
        safe_text(
            f"Catalog {ds.name} version {info.version} ({ds.short_id}): {info.items} items, "
            f"{info.retired} retired; {len(change.items)} changed"
        ),
        markup=False,
    )
    for old, new in change.heads:
        c = HeadMeta.of(new).catalog
        line = (
            f"  head {new.name} ({old.short_id} -> {new.short_id}): {c.trained_items} trained, "
            f"{c.text_items} from text ({c.placement.get('method')})"
        )
        out.print(safe_text(line), markup=False)
    for head, why in change.skipped:
        out.print(safe_text(f"  head {head.name} ({head.short_id}) not extended: {why}"), markup=False)


@app.command(
    "add",
    epilog="\b\nExamples:\n  st2si items add new-items.jsonl --domain amazon-scientific\n"
    "  st2si items add new.csv --domain pets --placement ridge --json",
)
def add_cmd(
    file: Path = typer.Argument(
        ..., help="Item file, JSONL or CSV: an item key (item, item_id, id, ...), a title, ..."
    ),
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    placement: Placement = typer.Option(
        Placement.auto,
        "--placement",
        help="How new items get their rows: auto (each head's own map: ridge for the paper's ILP, text for "
        "ilp-text; new items then rank below the top), ridge, text, or neighbour (what training gave the "
        "nearest known item by text: its ILP row, or its ID embedding in an adapter; new items then compete "
        "like that item).",
    ),
    device: str = device_option(),
    as_json: bool = json_option(),
) -> None:
    """Add items to a catalog as a new version; every head of the domain gets rows for them from their text."""
    from st2si_cli.items import ItemsOptions, add_items

    _report(
        add_items(open_zoo(), domain, file, ItemsOptions(placement=placement.value, device=device)), as_json
    )


@app.command(
    "update",
    epilog="\b\nExamples:\n  st2si items update B00X1 --domain pets --title 'Dog bed, large'\n"
    "  st2si items update B00X1 B00X2 --domain pets --retire",
)
def update_cmd(
    keys: list[str] = typer.Argument(..., metavar="ITEM...", help="Item keys of the catalog."),
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    title: str | None = typer.Option(None, "--title", help="New title."),
    retire: bool | None = typer.Option(
        None, "--retire/--unretire", help="Retire the items (never recommended again) or bring them back."
    ),
    device: str = device_option(),
    as_json: bool = json_option(),
) -> None:
    """Retitle and/or retire items; a retired item keeps its row, so old evaluations stay reproducible."""
    from st2si_cli.errors import St2siError
    from st2si_cli.items import ItemsOptions, update_items

    if title is None and retire is None:
        raise St2siError("nothing to change: give --title, --retire or --unretire")
    attrs = {"title": title} if title is not None else None
    change = update_items(
        open_zoo(), domain, keys, attributes=attrs, retire=retire, opts=ItemsOptions(device=device)
    )
    _report(change, as_json)


@app.command("rm", epilog="\b\nExample:\n  st2si items rm B00X1 B00X2 --domain pets")
def rm_cmd(
    keys: list[str] = typer.Argument(..., metavar="ITEM...", help="Item keys of the catalog."),
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    as_json: bool = json_option(),
) -> None:
    """Retire items: never recommended again; their rows stay (the same as `items update --retire`)."""
    from st2si_cli.items import update_items

    _report(update_items(open_zoo(), domain, keys, retire=True), as_json)
