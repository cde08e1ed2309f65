"""recbole: RecBole atomic files.

`{name}.inter` (user_id, item_id, optional timestamp) + `{name}.item` (item_id + attribute columns, one
of them a title).
"""

from __future__ import annotations

from st2si_cli.data.dataset import RawInteraction
from st2si_cli.data.formats._io import atomic_header, iter_atomic, require_columns
from st2si_cli.data.formats.base import (
    TITLE_NAMES,
    Format,
    ItemTable,
    Located,
    Names,
    Origins,
    Parsed,
    has_title,
    require_content,
    timestamp,
)
from st2si_cli.errors import InputError

# UniSRec's split files (the recbole-unisrec format) end in `.inter` but are no recbole dataset.
UNISREC_SPLITS = (".train.inter", ".valid.inter", ".test.inter")


def read_recbole(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    header = atomic_header(inter_path)
    require_columns(inter_path, header, "user_id", "item_id")
    has_time = "timestamp" in header
    interactions: list[RawInteraction] = []
    origins = Origins()
    origins.file(inter_path)
    for n, row in iter_atomic(inter_path):
        ts = timestamp(inter_path, n, row["timestamp"]) if has_time else 0.0
        interactions.append(RawInteraction(row["user_id"], row["item_id"], ts, n))
        origins.add(n)
    require_content(inter_path, len(interactions), "interactions")

    header = atomic_header(item_path)
    require_columns(item_path, header, "item_id")
    if not has_title({h: None for h in header}):
        raise InputError(item_path, f"no title column (one of {', '.join(TITLE_NAMES)})", 1)
    table = ItemTable(item_path)
    for n, row in iter_atomic(item_path):
        key = row.pop("item_id")
        table.add(key, row, n)
    require_content(item_path, len(table.items), "items")
    notes = {} if has_time else {"timestamps": "none: file order"}
    return Parsed("recbole", table.items, interactions, item_path, origins, notes=notes)


def detect_file(name: str, names: Names) -> Located | None:
    if not name.endswith(".inter") or name.endswith(UNISREC_SPLITS):
        return None
    stem = name.removesuffix(".inter")
    if f"{stem}.item" not in names:
        return None
    return Located("recbole", {"interactions": names[name], "items": names[f"{stem}.item"]}, stem)


FORMAT = Format(
    name="recbole",
    description="RecBole atomic files: {name}.inter + {name}.item (tab-separated, typed header)",
    expected="{name}.inter and {name}.item",
    read=read_recbole,
    detect_file=detect_file,
    claims_pair=lambda i, m: i.endswith(".inter") or m.endswith(".item"),
)
