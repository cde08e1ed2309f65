"""generic: `interactions.csv|jsonl` (user, item, optional timestamp) + `items.csv|jsonl` (item, title,
any other attributes). Column names are matched case-insensitively against a few aliases each.
"""

from __future__ import annotations

from st2si_cli.data.dataset import RawInteraction
from st2si_cli.data.formats._io import is_csv, iter_rows
from st2si_cli.data.formats.base import (
    ITEM_COLUMNS,
    TIME_COLUMNS,
    USER_COLUMNS,
    Format,
    ItemTable,
    Located,
    Names,
    Origins,
    Parsed,
    pick,
    require_content,
    timestamp,
)
from st2si_cli.errors import InputError


def read_generic(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    interactions: list[RawInteraction] = []
    origins = Origins()
    origins.file(inter_path)
    cols: tuple[str | None, str | None, str | None] | None = None
    has_time = False
    inter_csv, item_csv = is_csv(inter_path), is_csv(item_path)
    for n, row in iter_rows(inter_path):
        if cols is None or not inter_csv:
            cols = (pick(row, USER_COLUMNS), pick(row, ITEM_COLUMNS), pick(row, TIME_COLUMNS))
            if cols[0] is None or cols[1] is None:
                missing = "user" if cols[0] is None else "item"
                raise InputError(
                    inter_path, f"no {missing!r} column/field (have: {', '.join(row)})", 1 if inter_csv else n
                )
            if not interactions:
                has_time = cols[2] is not None
            elif (cols[2] is not None) != has_time:
                raise InputError(inter_path, "timestamp given on some rows but not on others", n)
        ucol, icol, tcol = cols
        ts = timestamp(inter_path, n, row[tcol]) if tcol is not None else 0.0
        user, item = row[ucol], row[icol]
        if user is None or item is None or str(user).strip() == "" or str(item).strip() == "":
            raise InputError(inter_path, "empty user or item", n)
        interactions.append(RawInteraction(str(user).strip(), str(item).strip(), ts, n))
        origins.add(n)
    require_content(inter_path, len(interactions), "interactions")

    table = ItemTable(item_path)
    for n, row in iter_rows(item_path):
        table.add_row(row, n, item_csv)
    require_content(item_path, len(table.items), "items")
    notes = {} if has_time else {"timestamps": "none: file order"}
    return Parsed("generic", table.items, interactions, item_path, origins, notes=notes)


def detect_folder(names: Names) -> Located | None:
    inter = [n for n in ("interactions.csv", "interactions.jsonl") if n in names]
    items = [n for n in ("items.csv", "items.jsonl") if n in names]
    if not (inter and items):
        return None
    return Located("generic", {"interactions": names[inter[0]], "items": names[items[0]]})


FORMAT = Format(
    name="generic",
    description="interactions.csv|jsonl (user, item, optional timestamp) + items.csv|jsonl (item, title, ...)",
    expected="interactions.csv|jsonl and items.csv|jsonl",
    read=read_generic,
    detect_folder=detect_folder,
    claims_pair=lambda i, m: i.removesuffix(".gz").endswith((".csv", ".jsonl")),
)
