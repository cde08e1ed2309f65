"""Catalog versions: items added, retitled or retired after `prepare`, each change a new dataset version.

A catalog only grows: new items are appended after the existing ones, so every item keeps its
internal ID and a head's existing rows keep their meaning. A retired item stays in the catalog (its
ID and row stay, so old evaluations remain reproducible) and is listed in the dataset's
`retired.json`; `recommend` never returns it. Retiring does not change the catalog hash, so the
domain's heads stay valid as they are; adding or retitling items does (heads are then extended or
re-pointed by `st2si_cli.items`).

Every version is its own dataset artifact (the name DOMAIN moves to the newest); its meta records
`catalog`: the version number, the parent version's ID and what changed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from st2si_cli.data.dataset import Dataset
from st2si_cli.data.formats._io import is_csv, iter_rows
from st2si_cli.data.formats.base import ItemTable
from st2si_cli.data.prepare import CATALOG_FILE, SEQUENCES_FILE, dataset_meta
from st2si_cli.errors import InputError
from st2si_cli.zoo.store import Artifact, Zoo

RETIRED_FILE = "retired.json"


def read_item_file(path: str | Path) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """(item key -> canonical attributes, item key -> line) of a JSONL or CSV item file, as `prepare` reads
    item files: an item key column (item, item_id, asin, id, ...) and a title; anything wrong is an
    `InputError` naming the file and line."""
    path = Path(path)
    table = ItemTable(path)
    csv = is_csv(path)
    for n, row in iter_rows(path):
        key = table.add_row(row, n, csv)
        if "title" not in table.items[key]:
            raise InputError(path, f"item {key!r} has an empty title", n)
    if not table.items:
        raise InputError(path, "no items in the file")
    return table.items, table.lines


def retired_items(zoo: Zoo, art: Artifact) -> list[int]:
    """Internal IDs of the items retired in dataset version `art` (sorted; empty if none)."""
    if RETIRED_FILE not in art.files:
        return []
    return sorted(int(i) for i in json.loads(zoo.file(art, RETIRED_FILE).read_text("utf-8")))


def exclude_retired(
    exclude: list[list[int]] | None, retired: Sequence[int], n_rows: int
) -> list[list[int]] | None:
    """Per-row exclusions with the retired items added to every row (`exclude` unchanged if none are)."""
    if not retired:
        return exclude
    base = exclude if exclude is not None else [[] for _ in range(n_rows)]
    return [list(row) + list(retired) for row in base]


def catalog_info(art: Artifact) -> dict[str, Any]:
    """The version record of a dataset artifact (version 1 for a dataset as `prepare` stored it)."""
    info = art.meta.get("catalog") or {}
    return {"version": int(info.get("version", 1)), "parent": info.get("parent"), **info}


def store_version(
    zoo: Zoo, ds: Dataset, parent: Artifact, retired: Sequence[int], change: dict[str, Any]
) -> Artifact:
    """Store `ds` (with its retired items) as the next version of `parent`'s catalog; the domain's name moves to it."""
    prev = catalog_info(parent)
    meta = dataset_meta(ds, parent.meta.get("format", "unknown"), parent.meta.get("source"))
    meta["report"] = parent.meta.get("report", {})
    meta["catalog"] = {
        "version": prev["version"] + 1,
        "parent": parent.id,
        "items": ds.n_items,
        "retired": len(retired),
        **change,
    }
    meta["inputs"] = {"dataset": parent.id}
    files = {CATALOG_FILE: ds.catalog_bytes(), SEQUENCES_FILE: ds.sequences_bytes()}
    if retired:
        files[RETIRED_FILE] = json.dumps(sorted(int(i) for i in retired)).encode()
    domain = parent.domain or parent.name
    return zoo.put("dataset", files, meta, name=parent.name or domain, domain=domain)


def catalog_versions(zoo: Zoo, art: Artifact) -> list[dict[str, Any]]:
    """The versions of `art`'s catalog, oldest first, by following the parents that are in the zoo."""
    chain = []
    seen: set[str] = set()
    cur: Artifact | None = art
    while cur is not None and cur.id not in seen:
        seen.add(cur.id)
        info = catalog_info(cur)
        chain.append(
            {
                "version": info["version"],
                "id": cur.id,
                "items": int(cur.meta.get("stats", {}).get("items", 0)),
                "retired": int(info.get("retired", 0)),
                "change": info.get("change", "prepare"),
                "catalog_hash": cur.meta.get("catalog_hash"),
            }
        )
        cur = zoo.find(info["parent"], kind="dataset") if info.get("parent") else None
    return chain[::-1]


def catalog_summary(zoo: Zoo, art: Artifact) -> dict[str, Any] | None:
    """For `zoo info`: a dataset's catalog versions, or how many items a head trained on and placed from text."""
    if art.kind == "dataset":
        return {"versions": catalog_versions(zoo, art)}
    if art.kind == "head" and "n_items" in art.meta:
        c = art.meta.get("catalog", {})
        n = int(art.meta["n_items"])
        trained = int(c.get("trained_items", n))
        return {
            "trained_items": trained,
            "text_items": n - trained,
            "placement": c.get("placement", {}).get("method"),
        }
    return None


def catalog_lines(summary: dict[str, Any] | None) -> list[str]:
    """`catalog_summary` as lines of text."""
    if not summary:
        return []
    if "versions" in summary:
        return ["Catalog versions"] + [
            f"  v{v['version']}  {v['id'][:12]}  {v['items']} items, {v['retired']} retired  ({v['change']})"
            for v in summary["versions"]
        ]
    line = f"Catalog: {summary['trained_items']} items seen in training, {summary['text_items']} placed from text"
    return [line + (f" ({summary['placement']})" if summary["text_items"] else "")]
