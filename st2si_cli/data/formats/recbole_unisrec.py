"""recbole-unisrec: UniSRec's split RecBole atomic files.

`{Name}.test.inter` (user_id, item_id_list, item_id; the sequence is the history + target), `{Name}.text`
(item_id, text = title), `{Name}.item2index`, optional `{Name}.user2index`.
"""

from __future__ import annotations

from pathlib import Path

from st2si_cli.data.dataset import RawInteraction
from st2si_cli.data.formats._io import atomic_header, iter_atomic, iter_lines, missing, require_columns
from st2si_cli.data.formats.base import (
    UNMAPPED,
    Format,
    ItemTable,
    Located,
    Names,
    Origins,
    Parsed,
    has_title,
    require_content,
    two_files,
)
from st2si_cli.errors import InputError


def _index_file(path: Path) -> dict[str, str]:
    """A UniSRec `.item2index` / `.user2index` file: key<TAB>index per line -> {index: key}."""
    inverse: dict[str, str] = {}
    for n, text in iter_lines(path):
        text = text.rstrip("\r\n")
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) != 2:
            raise InputError(path, "expected 'key<TAB>index'", n)
        key, idx = parts
        if idx in inverse and inverse[idx] != key:
            raise InputError(path, f"index {idx} is given to both {inverse[idx]!r} and {key!r}", n)
        inverse[idx] = key
    return inverse


def read_recbole_unisrec(loc: Located) -> Parsed:
    f = loc.files
    test = f["interactions"]
    index_to_item = _index_file(f["item2index"])
    index_to_user = _index_file(f["user2index"]) if "user2index" in f else {}

    header = atomic_header(test)
    require_columns(test, header, "user_id", "item_id_list", "item_id")
    interactions: list[RawInteraction] = []
    origins = Origins()
    origins.file(test)
    seen: dict[str, int] = {}
    for n, row in iter_atomic(test):
        user = index_to_user.get(row["user_id"], row["user_id"])
        if user in seen:
            raise InputError(
                test, f"user {row['user_id']} has a second test row (first at line {seen[user]})", n
            )
        seen[user] = n
        for t, idx in enumerate([*row["item_id_list"].split(), row["item_id"].strip()]):
            key = index_to_item.get(idx, UNMAPPED.format(idx))
            interactions.append(RawInteraction(user, key, float(t), len(interactions)))
            origins.add(n)
    require_content(test, len(interactions), "interactions")

    text_path = f["items"]
    header = atomic_header(text_path)
    require_columns(text_path, header, "item_id")
    title_col = "text" if "text" in header else None
    if title_col is None and not has_title({h: None for h in header}):
        raise InputError(text_path, "no 'text' (or title) column", 1)
    table = ItemTable(text_path)
    for n, row in iter_atomic(text_path):
        key = row.pop("item_id")
        if title_col:
            row = {"title": row.pop(title_col), **row}
        table.add(key, row, n)
    notes = {"sequences": "test history + target"}
    return Parsed(
        "recbole-unisrec",
        table.items,
        interactions,
        text_path,
        origins,
        index_file=f["item2index"],
        notes=notes,
    )


def detect_file(name: str, names: Names) -> Located | None:
    if not name.endswith(".test.inter"):
        return None
    stem = name.removesuffix(".test.inter")
    if f"{stem}.text" not in names or f"{stem}.item2index" not in names:
        return None
    files = {
        "interactions": names[name],
        "items": names[f"{stem}.text"],
        "item2index": names[f"{stem}.item2index"],
    }
    if f"{stem}.user2index" in names:
        files["user2index"] = names[f"{stem}.user2index"]
    return Located("recbole-unisrec", files, stem)


def pair_files(interactions: Path, items: Path) -> dict[str, Path]:
    """The two files and the index files beside the interaction file (`.item2index` is required)."""
    files = two_files(interactions, items)
    stem = interactions.name.removesuffix(".test.inter")
    index = interactions.parent / f"{stem}.item2index"
    if not index.exists():
        raise missing(index)
    files["item2index"] = index
    users = interactions.parent / f"{stem}.user2index"
    if users.exists():
        files["user2index"] = users
    return files


FORMAT = Format(
    name="recbole-unisrec",
    description="UniSRec's atomic files: {Name}.test.inter + {Name}.text + {Name}.item2index",
    expected="{Name}.test.inter, {Name}.text and {Name}.item2index",
    read=read_recbole_unisrec,
    detect_file=detect_file,
    claims_pair=lambda i, m: i.endswith(".test.inter") or m.endswith(".text"),
    pair_files=pair_files,
)
