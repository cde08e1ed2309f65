"""`st2si zoo ...`: look at and tidy the local store of artifacts.

The logic lives in `st2si_cli.zoo.store` (plain dataclasses); this module only formats it. Results go
to stdout (rich tables, or JSON with `--json`), warnings, prompts and progress to stderr. `cli/app.py`
groups these commands, and `pull` from `pull_cmd`, under `st2si zoo`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import typer

from st2si_cli.cli.options import open_zoo, state
from st2si_cli.cli.output import err, human_size, out, print_json, safe_text
from st2si_cli.data.catalog import catalog_lines, catalog_summary
from st2si_cli.errors import St2siError
from st2si_cli.heads.choice import default_head, lm_over_id_only, pin_default
from st2si_cli.zoo.meta import BackboneMeta, DatasetMeta, Inputs, Metrics, RunMeta

if TYPE_CHECKING:  # the store pulls in sqlite-utils: imported only when a command runs
    from st2si_cli.zoo.store import Artifact, Zoo

JSON_HELP = "Print JSON on stdout instead of a table."
KIND_HELP = "The kind of the named artifact, where kinds share a name (names are per kind)."
# Metrics shown in `ls`, in this order, when an artifact records them (matched case-insensitively).
HEADLINE_METRICS = ("ndcg@10", "recall@10", "hr@10", "mrr@10")


# ---- formatting helpers ------------------------------------------------------------------------------
def _label(art: Artifact) -> str:
    """`kind name (short id)`, or `kind short id` for an unnamed artifact."""
    return f"{art.kind} {art.name} ({art.short_id})" if art.name else f"{art.kind} {art.short_id}"


def _local_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _number(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _headline_metrics(metrics: Metrics, limit: int = 2) -> list[tuple[str, Any]]:
    """The few metrics worth a glance: the test split's (else validation's, else unsplit), NDCG@10 first."""
    chosen_split = metrics.test or metrics.valid or metrics.extra
    numeric = [
        (k, v) for k, v in chosen_split.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    by_key = {k.lower(): (k, v) for k, v in numeric}
    chosen = [by_key[k] for k in HEADLINE_METRICS if k in by_key]
    return (chosen or numeric)[:limit]


def _flags(flags: Mapping[str, Any]) -> str:
    return " ".join(k if v is True else f"{k}={v}" for k, v in flags.items() if v not in (False, None))


def summarize(art: Artifact) -> str:
    """One short line from meta: dataset stats, headline metrics, the flags of a run or a tuned backbone."""
    parts = []
    if art.kind == "dataset":
        parts += [f"{key} {_number(n)}" for key, n in DatasetMeta.of(art).stats.counts().items()]
    parts += [f"{k} {_number(v)}" for k, v in _headline_metrics(Metrics.of(art))]
    if art.kind in ("run", "backbone"):
        flags = _flags(RunMeta.of(art).flags if art.kind == "run" else BackboneMeta.of(art).flags)
        parts += [f"[{flags}]"] if flags else []
    return ", ".join(parts)


def _brief(art: Artifact) -> dict[str, Any]:
    return {"id": art.id, "kind": art.kind, "name": art.name}


def _require_kind(kind: str | None) -> None:
    from st2si_cli.zoo.store import KINDS

    if kind is not None and kind not in KINDS:
        raise typer.BadParameter(f"{kind!r} is not one of {', '.join(KINDS)}", param_hint="'--kind'")


# ---- commands ----------------------------------------------------------------------------------------
def path_cmd(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Print the zoo folder: --zoo PATH, else $ST2SI_HOME, else the platform's user data dir."""
    from st2si_cli.zoo.store import resolve_root

    root = resolve_root(state.zoo_path)
    if as_json:
        print_json({"root": str(root)})
    else:
        typer.echo(str(root))


def ls_cmd(
    kind: str | None = typer.Option(
        None, "--kind", help="Only this kind: dataset, catalog, backbone, head, features or run."
    ),
    domain: str | None = typer.Option(None, "--domain", help="Only this domain (e.g. ml-100k)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array of artifacts on stdout."),
) -> None:
    """List artifacts, newest first."""
    _require_kind(kind)
    zoo = open_zoo(create=False)
    arts = zoo.ls(kind=kind, domain=domain)
    if as_json:
        print_json([{**a.to_dict(), "names": zoo.names_of(a)} for a in arts])
        return
    if not arts:
        what = " ".join(x for x in (kind and f"kind={kind}", domain and f"domain={domain}") if x)
        err.print(
            safe_text(f"No artifacts{' with ' + what if what else ''} in the zoo at {zoo.root}."),
            markup=False,
        )
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False)
    table.add_column("NAME", overflow="fold")
    table.add_column("KIND")
    table.add_column("DOMAIN", overflow="fold")
    table.add_column("ID", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("CREATED", no_wrap=True)
    table.add_column("SUMMARY")
    for a in arts:  # Text cells: names and meta are data, never rich markup
        cells = (a.name or "", a.kind, a.domain or "", a.short_id, human_size(a.size), _local_time(a.created))
        table.add_row(*(Text(safe_text(c)) for c in (*cells, summarize(a))))
    out.print(table)
    total = sum(a.size for a in arts)
    err.print(
        f"{len(arts)} artifact(s), {human_size(total)} (shared blobs counted once per artifact).",
        markup=False,
    )
    if domain and kind in (None, "head") and (choice := default_head(zoo, domain)):  # eval's and recommend's
        shown = safe_text(f"Default head: {choice.head.name or choice.head.short_id}, {choice.reason}.")
        err.print(shown, markup=False, soft_wrap=True)
        if line := lm_over_id_only(zoo, domain):
            err.print(safe_text(line), markup=False, soft_wrap=True)


def default_cmd(
    domain: str = typer.Argument(..., metavar="DOMAIN", help="The domain (dataset name)."),
    head: str | None = typer.Argument(
        None, metavar="[HEAD]", help="The head to pin as the default (name or ID); leave out to show it."
    ),
    clear: bool = typer.Option(False, "--clear", help="Unpin: the default is the best on validation again."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show or pin the head `eval`, `recommend` and `report` use for a domain without --head.

    Unpinned, the default is the best on validation NDCG@10 among the domain's heads of its current
    catalog (ties: the newest)."""
    if head is not None and clear:
        raise typer.BadParameter("give a HEAD to pin or --clear, not both", param_hint="'--clear'")
    if head is not None or clear:
        zoo = open_zoo()
        zoo.get(domain, kind="dataset")  # an unknown domain is an error, as elsewhere
        before = pin_default(zoo, domain, head)
        if before is not None:
            err.print(
                safe_text(f"Unpinned {before.name or before.short_id} ({before.short_id})."), markup=False
            )
    else:
        zoo = open_zoo(create=False)
    choice = default_head(zoo, domain)
    if as_json:
        print_json(
            {
                "domain": domain,
                "head": choice.head.name if choice else None,
                "head_id": choice.head.id if choice else None,
                "pinned": bool(choice and choice.pinned),
                "reason": choice.reason if choice else f"no head for domain {domain}",
            }
        )
        return
    if choice is None:
        err.print(
            safe_text(f"No head for domain {domain}: run `st2si adapt --domain {domain}`."), markup=False
        )
        return
    h = choice.head
    out.print(safe_text(f"{h.name or h.short_id} ({h.short_id})"), markup=False, soft_wrap=True)
    err.print(safe_text(f"Default head of {domain}: {choice.reason}."), markup=False, soft_wrap=True)
    if line := lm_over_id_only(zoo, domain):
        err.print(safe_text(line), markup=False, soft_wrap=True)


def _inputs(zoo: Zoo, art: Artifact) -> list[dict[str, Any]]:
    """The artifact's inputs, each ID looked up: role, id, and the name and kind if it is still in the zoo."""
    rows = []
    for role, ids in Inputs.of(art).refs.items():
        for ref in sorted(set(ids)):
            try:
                found = zoo.find(ref)
            except St2siError:  # an ambiguous prefix: not a clean reference
                found = None
            rows.append(
                {
                    "role": role,
                    "id": ref,
                    "present": found is not None,
                    "name": found.name if found else None,
                    "kind": found.kind if found else None,
                }
            )
    return rows


def _info_dict(zoo: Zoo, art: Artifact) -> dict[str, Any]:
    sizes = {
        r["sha256"]: r["size"]
        for r in zoo.db["blobs"].rows_where("sha256 IN (SELECT blob FROM files WHERE artifact = ?)", [art.id])
    }
    return {
        **art.to_dict(),
        "names": zoo.names_of(art),
        "file_details": [
            {"name": f, "sha256": sha, "size": sizes.get(sha), "path": str(zoo.blob_path(sha))}
            for f, sha in sorted(art.files.items())
        ],
        "inputs": _inputs(zoo, art),
        "dependents": [_brief(d) for d in zoo.dependents(art)],
        "catalog": catalog_summary(zoo, art),
    }


def info_cmd(
    ref: str = typer.Argument(
        ..., metavar="NAME|ID", help="A name, a full ID or a unique ID prefix (6+ characters)."
    ),
    kind: str | None = typer.Option(None, "--kind", help=KIND_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Everything about one artifact: files, meta (config, inputs, versions, metrics), names, dependents."""
    _require_kind(kind)
    zoo = open_zoo(create=False)
    art = zoo.get(ref, kind)
    info = _info_dict(zoo, art)
    if as_json:
        print_json(info)
        return
    from rich.table import Table
    from rich.text import Text

    head = Table(box=None, show_header=False, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    head.add_row("id", Text(safe_text(art.id)))
    head.add_row("kind", Text(safe_text(art.kind)))
    head.add_row("names", Text(safe_text(", ".join(info["names"]) or "(none)")))
    head.add_row("domain", Text(safe_text(art.domain or "")))
    head.add_row("created", f"{_local_time(art.created)} ({info['created']})")
    head.add_row("size", f"{human_size(art.size)} ({art.size:,} bytes)")
    summary = summarize(art)
    if summary:
        head.add_row("summary", Text(safe_text(summary)))
    out.print(head)
    for line in catalog_lines(info["catalog"]):
        out.print(safe_text(line), markup=False)

    files = Table(title="Files", title_justify="left", box=None, pad_edge=False)
    files.add_column("FILE", overflow="fold")
    files.add_column("SIZE", justify="right", no_wrap=True)
    files.add_column("BLOB", no_wrap=True)
    for f in info["file_details"]:
        files.add_row(Text(safe_text(f["name"])), human_size(f["size"] or 0), f["sha256"][:12])
    out.print()
    out.print(files)

    if info["inputs"]:
        out.print()
        out.print("Inputs", style="bold")
        for i in info["inputs"]:
            where = f"{i['kind']} {i['name'] or ''}".strip() if i["present"] else "MISSING from the zoo"
            out.print(safe_text(f"  {i['role']}: {i['id'][:12]}  {where}"), markup=False, soft_wrap=True)
    out.print()
    out.print("Used by", style="bold")
    if info["dependents"]:
        for d in info["dependents"]:
            line = f"  {d['kind']} {d['name'] or d['id'][:12]} ({d['id'][:12]})"
            out.print(safe_text(line), markup=False, soft_wrap=True)
    else:
        out.print("  (nothing in the zoo lists it as an input)", markup=False)
    meta = {k: v for k, v in art.meta.items() if k != "inputs"}  # the record as stored, shown whole
    if meta:
        import json

        out.print()
        out.print("Meta", style="bold")
        # escaped line by line, so that the layout's newlines stay
        shown = json.dumps(meta, indent=2, ensure_ascii=False, default=str)
        out.print("\n".join(map(safe_text, shown.split("\n"))), markup=False, soft_wrap=True)
