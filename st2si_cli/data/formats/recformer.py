"""recformer: Recformer's `finetune_data/<Cat>/`.

train.json, val.json, test.json (user index -> item indices; the sequence is train + val + test),
smap.json (asin -> item index), meta_data.json (asin -> {title, brand, category}), umap.json
(optional: user -> index).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from st2si_cli.data.dataset import sequences_from_lists
from st2si_cli.data.formats._io import index_lists, json_object, key_line, read_text
from st2si_cli.data.formats.base import UNMAPPED, Format, Located, Names, Parsed, has_title, require_content
from st2si_cli.errors import InputError

FILES = {
    "train": "train.json",
    "val": "val.json",
    "test": "test.json",
    "smap": "smap.json",
    "items": "meta_data.json",
}


def _invert_index(path: Path, mapping: Mapping[str, Any], text_of: Callable[[], str]) -> dict[str, str]:
    inverse: dict[str, str] = {}
    for key, idx in mapping.items():
        idx = str(idx)
        if idx in inverse and inverse[idx] != key:
            raise InputError(
                path, f"index {idx} is given to both {inverse[idx]!r} and {key!r}", key_line(text_of(), key)
            )
        inverse[idx] = key
    return inverse


def read_recformer(loc: Located) -> Parsed:
    f = loc.files
    train, _ = index_lists(f["train"])
    val, _ = index_lists(f["val"])
    test, _ = index_lists(f["test"])
    smap, smap_text = json_object(f["smap"], "item keys to indices")
    meta, meta_text = json_object(f["items"], "item keys to attributes")
    index_to_item = _invert_index(f["smap"], smap, lambda: smap_text)
    index_to_user: dict[str, str] = {}
    if "umap" in f:
        umap, umap_text = json_object(f["umap"], "user keys to indices")
        index_to_user = _invert_index(f["umap"], umap, lambda: umap_text)

    items: dict[str, dict[str, Any]] = {}
    for asin in smap:
        attrs = meta.get(asin)
        if attrs is None:
            continue  # its interactions are dropped (counted) or, with --strict, an error
        if not isinstance(attrs, dict):
            raise InputError(
                f["items"], f"item {asin!r}: expected an object of attributes", key_line(meta_text, asin)
            )
        if not has_title(attrs):
            raise InputError(f["items"], f"item {asin!r} has no title field", key_line(meta_text, asin))
        items[asin] = attrs

    users = list(dict.fromkeys([*train, *val, *test]))
    lists: dict[str, list[str]] = {}
    part_of: list[int] = []  # which file each interaction came from: 0 train, 1 val, 2 test
    for u in users:
        # Recformer's val/test hold just the target; accept files that hold the sequence up to it too.
        idxs: list[Any] = []
        parts_of_user: list[int] = []
        for part, source in enumerate((train, val, test)):
            got = list(source.get(u, []))
            if idxs and len(got) > len(idxs) and got[: len(idxs)] == idxs:
                got = got[len(idxs) :]
            idxs += got
            parts_of_user += [part] * len(got)
        lists[index_to_user.get(u, u)] = [index_to_item.get(str(i), UNMAPPED.format(i)) for i in idxs]
        part_of += parts_of_user
    if len(lists) != len(users):
        raise InputError(f["umap"], "two user indices map to the same user")
    interactions = sequences_from_lists(lists)
    require_content(f["train"], len(interactions), "interactions")
    raw_user = {index_to_user.get(u, u): u for u in users}
    parts = (f["train"], f["val"], f["test"])
    texts: dict[int, str] = {}

    def where(i: int) -> tuple[Path, int | None]:
        part = part_of[i]
        if part not in texts:
            texts[part] = read_text(parts[part])
        return parts[part], key_line(texts[part], raw_user[interactions[i].user])

    return Parsed("recformer", items, interactions, f["items"], where, index_file=f["smap"])


def detect_folder(names: Names) -> Located | None:
    if not all(n in names for n in FILES.values()):
        return None
    files = {role: names[n] for role, n in FILES.items()}
    if "umap.json" in names:
        files["umap"] = names["umap.json"]
    return Located("recformer", files)


def pair_files(interactions: Path, items: Path) -> dict[str, Path]:
    raise InputError(
        interactions, "the recformer format needs its folder (train/val/test/smap/meta_data.json)"
    )


FORMAT = Format(
    name="recformer",
    description="Recformer's finetune_data/<Cat>/ folder: JSON index lists, smap, meta_data",
    expected="train.json, val.json, test.json, smap.json and meta_data.json",
    read=read_recformer,
    detect_folder=detect_folder,
    pair_files=pair_files,
)
