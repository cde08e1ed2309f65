"""json-lists: `{Name}.inter.json` + `{Name}.item.json`.

`{Name}.inter.json` is {user: [item, ...]} in time order, `{Name}.item.json` is {item: {title, ...}}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from st2si_cli.data.dataset import sequences_from_lists
from st2si_cli.data.formats._io import index_lists, json_object, key_line
from st2si_cli.data.formats.base import Format, Located, Names, Parsed, has_title, require_content
from st2si_cli.errors import InputError


def read_json_lists(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    lists, inter_text = index_lists(inter_path)
    raw_items, item_text = json_object(item_path, "item keys to attributes")
    items: dict[str, dict[str, Any]] = {}
    for key, attrs in raw_items.items():
        if not isinstance(attrs, dict):
            raise InputError(
                item_path, f"item {key!r}: expected an object of attributes", key_line(item_text, key)
            )
        if not has_title(attrs):
            raise InputError(item_path, f"item {key!r} has no title field", key_line(item_text, key))
        items[str(key)] = attrs
    for user, seq in lists.items():
        for it in seq:
            if not isinstance(it, (int, str)) or isinstance(it, bool):
                raise InputError(
                    inter_path, f"user {user!r}: item {it!r} is not an ID", key_line(inter_text, user)
                )
    interactions = sequences_from_lists(lists)
    require_content(inter_path, len(interactions), "interactions")

    def where(i: int) -> tuple[Path, int | None]:
        return inter_path, key_line(inter_text, interactions[i].user)

    return Parsed("json-lists", items, interactions, item_path, where)


def detect_file(name: str, names: Names) -> Located | None:
    if not name.endswith(".inter.json"):
        return None
    stem = name.removesuffix(".inter.json")
    if f"{stem}.item.json" not in names:
        return None
    return Located("json-lists", {"interactions": names[name], "items": names[f"{stem}.item.json"]}, stem)


FORMAT = Format(
    name="json-lists",
    description="{Name}.inter.json (user -> items in time order) + {Name}.item.json (item -> attributes)",
    expected="{Name}.inter.json and {Name}.item.json",
    read=read_json_lists,
    detect_file=detect_file,
    claims_pair=lambda i, m: i.endswith(".inter.json") or m.endswith(".item.json"),
)
