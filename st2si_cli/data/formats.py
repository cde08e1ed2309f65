"""Readers for the raw input formats that `st2si prepare` accepts.

Each reader parses its files into item attributes and `RawInteraction`s (a `Parsed`); `build_dataset`
then canonicalises them, so the same data in two formats gives the same dataset hash. Readers parse the
whole input before anything is written anywhere, and every problem with the input is an `InputError`
naming the file and, where there is one, the line.

Formats (`FORMATS`) and the files that identify them in a folder:

- amazon-raw       Amazon Review Data (2018): `{Cat}_5.json.gz` or `{Cat}.json.gz` (reviews: reviewerID,
                   asin, unixReviewTime) + `meta_{Cat}.json.gz` (asin, title, brand, category). JSON lines,
                   gzip optional. Items without a title are dropped (counted).
- recformer        Recformer's `finetune_data/<Cat>/`: train.json, val.json, test.json (user index -> item
                   indices; the sequence is train + val + test), smap.json (asin -> item index),
                   meta_data.json (asin -> {title, brand, category}), umap.json (optional: user -> index).
- json-lists       `{Name}.inter.json` ({user: [item, ...]} in time order) + `{Name}.item.json`
                   ({item: {title, ...}}).
- recbole          RecBole atomic files `{name}.inter` (user_id, item_id, optional timestamp) + `{name}.item`
                   (item_id + attribute columns, one of them a title).
- recbole-unisrec  UniSRec's split atomic files `{Name}.test.inter` (user_id, item_id_list, item_id; the
                   sequence is the history + target), `{Name}.text` (item_id, text = title),
                   `{Name}.item2index`, optional `{Name}.user2index`.
- generic          `interactions.csv|jsonl` (user, item, optional timestamp) + `items.csv|jsonl` (item,
                   title, any other attributes).
"""

from __future__ import annotations

import bisect
import csv
import gzip
import json
import re
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.data.dataset import (
    ATTRIBUTE_ALIASES,
    RawInteraction,
    canonical_attributes,
    sequences_from_lists,
)
from st2si_cli.errors import InputError

FORMATS = ("amazon-raw", "recformer", "json-lists", "recbole", "recbole-unisrec", "generic")
ACCEPTED = ", ".join(FORMATS)

# Item keys for item indices that the index file does not map (cannot collide with a real item key).
UNMAPPED = "<unmapped index {}>"

TITLE_NAMES = sorted(k for k, v in ATTRIBUTE_ALIASES.items() if v == "title")
USER_COLUMNS = ("user", "user_id", "userid", "reviewerid")
ITEM_COLUMNS = ("item", "item_id", "itemid", "asin", "id")
TIME_COLUMNS = ("timestamp", "time", "unixreviewtime")


@dataclass
class Located:
    """A format and its files, by role ("interactions", "items", "train", ...)."""

    format: str
    files: dict[str, Path]
    name: str = ""  # the dataset's prefix in its folder, if any


@dataclass
class Parsed:
    format: str
    items: dict[str, dict[str, Any]]  # item key -> raw attributes
    interactions: list[RawInteraction]
    item_file: Path  # the file items come from (for messages)
    where: Callable[[int], tuple[Path, int | None]]  # file and line of interaction i
    index_file: Path | None = None  # the file mapping item indices to keys, where there is one
    notes: dict[str, Any] = field(default_factory=dict)  # what the reader counted or chose

    def unknown_item_error(self, i: int) -> InputError:
        path, line = self.where(i)
        key = self.interactions[i].item
        if key.startswith("<unmapped index") and self.index_file is not None:
            what = f"item index {key[len('<unmapped index ') : -1]} is not in {self.index_file.name}"
        else:
            what = f"item {key!r} is not in {self.item_file.name}"
        return InputError(path, f"user {self.interactions[i].user!r}: {what}", line)


# ---- low-level reading ---------------------------------------------------------------------------


def _missing(path: Path) -> InputError:
    return InputError(path, "no such file or directory")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its newline) of a UTF-8 text file, gunzipped on the fly for `.gz`.

    Streams: the file is never held in memory. Raises InputError for a missing or empty file, bytes
    that are not UTF-8, and a truncated or corrupt gzip stream.
    """
    gz = path.name.endswith(".gz")
    n = 0
    content = False
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        with f:
            for n, raw in enumerate(f, 1):
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(
                        path, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})", n
                    ) from None
                if n == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                if not content and text.strip():
                    content = True
                yield n, text
    except EOFError:
        raise InputError(path, "truncated gzip file: the compressed stream ends early", n + 1) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(path, f"corrupt gzip file ({e})", n + 1 if n else None) from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if not content:
        raise InputError(path, "empty file")


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (for formats that are one JSON document)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _missing(path) from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, expected a file") from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    if path.name.endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except EOFError:
            raise InputError(path, "truncated gzip file: the compressed stream ends early") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise InputError(path, f"corrupt gzip file ({e})") from None
    if not data.strip():
        raise InputError(path, "empty file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {col})", line) from None
    return text.removeprefix("\ufeff")


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out and out[k] != v:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def key_line(text: str, key: str, nth: int = 1) -> int | None:
    """Line of the nth occurrence of `"key":` in a JSON text (None if not found)."""
    for quoted in dict.fromkeys((json.dumps(key, ensure_ascii=False), json.dumps(key))):
        matches = list(re.finditer(re.escape(quoted) + r"\s*:", text))
        if len(matches) >= nth:
            return text.count("\n", 0, matches[nth - 1].start()) + 1
    return None


def read_json(path: Path) -> tuple[Any, str]:
    """One JSON document and its text. Duplicate keys with different values are an error."""
    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=_pairs_hook), text
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except _DuplicateKey as e:
        raise InputError(
            path, f"key {e.key!r} appears twice with different values", key_line(text, e.key, 2)
        ) from None


def _json_object(path: Path, what: str) -> tuple[dict[str, Any], str]:
    data, text = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object mapping {what}, found {type(data).__name__}", 1)
    if not data:
        raise InputError(path, "empty file (no entries)", 1)
    return data, text


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON-lines file; blank lines skipped."""
    for n, text in iter_lines(path):
        s = text.strip()
        if not s:
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            if s.startswith("{'"):
                raise InputError(
                    path,
                    "a Python literal, not JSON (the older Amazon release); convert the file to "
                    "JSON lines first (json.dumps(ast.literal_eval(line)) per line)",
                    n,
                ) from None
            raise InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", n) from None
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, found {type(obj).__name__}", n)
        yield n, obj


def iter_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with a header; keys are the lower-cased column names."""
    reader = csv.reader(text for _, text in iter_lines(path))
    try:
        header = [h.strip().lower() for h in next(reader)]
        if len(set(header)) != len(header):
            raise InputError(path, f"repeated column name in the header {header}", 1)
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise InputError(path, f"{len(row)} fields, the header has {len(header)}", reader.line_num)
            yield reader.line_num, dict(zip(header, row, strict=True))
    except csv.Error as e:
        raise InputError(path, f"malformed CSV: {e}", reader.line_num) from None


def _is_csv(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(".csv")


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV or JSON-lines file, by extension."""
    if _is_csv(path):
        return iter_csv(path)
    if path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json")):
        return iter_json_lines(path)
    raise InputError(path, "unsupported file type: expected .csv or .jsonl")


class _Origins:
    """File and line of each interaction, compact: line numbers in an array, files as segments."""

    def __init__(self) -> None:
        self.lines = array("q")
        self.starts: list[int] = []
        self.paths: list[Path] = []

    def file(self, path: Path) -> None:
        self.starts.append(len(self.lines))
        self.paths.append(path)

    def add(self, line: int) -> None:
        self.lines.append(line)

    def __call__(self, i: int) -> tuple[Path, int | None]:
        seg = bisect.bisect_right(self.starts, i) - 1
        return self.paths[seg], self.lines[i]


def _pick(row: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    lower = {k.lower(): k for k in row}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def _has_title(attrs: Mapping[str, Any]) -> bool:
    return any(ATTRIBUTE_ALIASES.get(k.lower()) == "title" for k in attrs)


def _timestamp(path: Path, line: int, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(path, f"timestamp {value!r} is not a number", line) from None


class _ItemTable:
    """Items of a line-based file: a repeated key must repeat the same attributes."""

    def __init__(self, path: Path):
        self.path = path
        self.items: dict[str, dict[str, Any]] = {}
        self.lines: dict[str, int] = {}

    def add(self, key: str, attrs: Mapping[str, Any], line: int) -> None:
        canon = canonical_attributes(attrs)
        if key in self.items:
            if self.items[key] != canon:
                raise InputError(
                    self.path,
                    f"item {key!r} appears twice with different attributes (first at line {self.lines[key]})",
                    line,
                )
            return
        self.items[key] = canon
        self.lines[key] = line


def _require_content(path: Path, rows: int, what: str) -> None:
    if rows == 0:
        raise InputError(path, f"no {what} in the file")


# ---- amazon-raw ----------------------------------------------------------------------------------

AMAZON_META_FIELDS = ("title", "brand", "category")


def read_amazon_raw(loc: Located) -> Parsed:
    reviews, meta = loc.files["interactions"], loc.files["items"]
    interactions: list[RawInteraction] = []
    origins = _Origins()
    origins.file(reviews)
    asins: set[str] = set()
    for n, obj in iter_json_lines(reviews):
        for k in ("reviewerID", "asin", "unixReviewTime"):
            if k not in obj:
                raise InputError(reviews, f"review has no {k!r} field", n)
        user, item = str(obj["reviewerID"]), str(obj["asin"])
        interactions.append(RawInteraction(user, item, _timestamp(reviews, n, obj["unixReviewTime"]), n))
        origins.add(n)
        asins.add(item)
    _require_content(reviews, len(interactions), "reviews")

    table = _ItemTable(meta)
    rows = 0
    for n, obj in iter_json_lines(meta):
        rows += 1
        if "asin" not in obj:
            raise InputError(meta, "item has no 'asin' field", n)
        asin = str(obj["asin"])
        if asin in asins:  # the meta file lists the whole category; keep the reviewed items only
            table.add(asin, {k: obj.get(k) for k in AMAZON_META_FIELDS}, n)
    _require_content(meta, rows, "items")
    notes = {"reviews_file": reviews.name, "meta_file": meta.name, "meta_rows": rows}
    return Parsed("amazon-raw", table.items, interactions, meta, origins, notes=notes)


# ---- recformer -----------------------------------------------------------------------------------


def _index_lists(path: Path) -> tuple[dict[str, list[Any]], str]:
    data, text = _json_object(path, "user indices to item lists")
    out: dict[str, list[Any]] = {}
    for user, items in data.items():
        if isinstance(items, (int, str)):
            items = [items]
        if not isinstance(items, list):
            raise InputError(path, f"user {user!r}: expected a list of item indices", key_line(text, user))
        out[str(user)] = items
    return out, text


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
    train, _ = _index_lists(f["train"])
    val, _ = _index_lists(f["val"])
    test, _ = _index_lists(f["test"])
    smap, smap_text = _json_object(f["smap"], "item keys to indices")
    meta, meta_text = _json_object(f["items"], "item keys to attributes")
    index_to_item = _invert_index(f["smap"], smap, lambda: smap_text)
    index_to_user: dict[str, str] = {}
    if "umap" in f:
        umap, umap_text = _json_object(f["umap"], "user keys to indices")
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
        if not _has_title(attrs):
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
    _require_content(f["train"], len(interactions), "interactions")
    raw_user = {index_to_user.get(u, u): u for u in users}
    parts = (f["train"], f["val"], f["test"])
    texts: dict[int, str] = {}

    def where(i: int) -> tuple[Path, int | None]:
        part = part_of[i]
        if part not in texts:
            texts[part] = read_text(parts[part])
        return parts[part], key_line(texts[part], raw_user[interactions[i].user])

    return Parsed("recformer", items, interactions, f["items"], where, index_file=f["smap"])


# ---- json-lists ----------------------------------------------------------------------------------


def read_json_lists(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    lists, inter_text = _index_lists(inter_path)
    raw_items, item_text = _json_object(item_path, "item keys to attributes")
    items: dict[str, dict[str, Any]] = {}
    for key, attrs in raw_items.items():
        if not isinstance(attrs, dict):
            raise InputError(
                item_path, f"item {key!r}: expected an object of attributes", key_line(item_text, key)
            )
        if not _has_title(attrs):
            raise InputError(item_path, f"item {key!r} has no title field", key_line(item_text, key))
        items[str(key)] = attrs
    for user, seq in lists.items():
        for it in seq:
            if not isinstance(it, (int, str)) or isinstance(it, bool):
                raise InputError(
                    inter_path, f"user {user!r}: item {it!r} is not an ID", key_line(inter_text, user)
                )
    interactions = sequences_from_lists(lists)
    _require_content(inter_path, len(interactions), "interactions")

    def where(i: int) -> tuple[Path, int | None]:
        return inter_path, key_line(inter_text, interactions[i].user)

    return Parsed("json-lists", items, interactions, item_path, where)


# ---- recbole atomic files ------------------------------------------------------------------------


def iter_atomic(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {field name: value}) of a RecBole atomic file (tab-separated, typed header)."""
    lines = iter_lines(path)
    header: list[str] | None = None
    for n, text in lines:
        text = text.rstrip("\r\n")
        if header is None:
            if not text.strip():
                continue
            header = [h.partition(":")[0].strip() for h in text.split("\t")]
            if not all(header) or len(set(header)) != len(header):
                raise InputError(
                    path, "bad header: expected distinct 'name:type' fields separated by tabs", n
                )
            continue
        if not text.strip():
            continue
        values = text.split("\t")
        if len(values) != len(header):
            raise InputError(path, f"{len(values)} tab-separated fields, the header has {len(header)}", n)
        yield n, dict(zip(header, values, strict=True))


def _atomic_header(path: Path) -> list[str]:
    for _, text in iter_lines(path):
        if text.strip():
            return [h.partition(":")[0].strip() for h in text.rstrip("\r\n").split("\t")]
    raise InputError(path, "empty file")  # unreachable: iter_lines raises first


def _require_columns(path: Path, header: list[str], *names: str) -> None:
    for name in names:
        if name not in header:
            raise InputError(path, f"no {name!r} column (columns: {', '.join(header)})", 1)


def read_recbole(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    header = _atomic_header(inter_path)
    _require_columns(inter_path, header, "user_id", "item_id")
    has_time = "timestamp" in header
    interactions: list[RawInteraction] = []
    origins = _Origins()
    origins.file(inter_path)
    for n, row in iter_atomic(inter_path):
        ts = _timestamp(inter_path, n, row["timestamp"]) if has_time else 0.0
        interactions.append(RawInteraction(row["user_id"], row["item_id"], ts, n))
        origins.add(n)
    _require_content(inter_path, len(interactions), "interactions")

    header = _atomic_header(item_path)
    _require_columns(item_path, header, "item_id")
    if not _has_title({h: None for h in header}):
        raise InputError(item_path, f"no title column (one of {', '.join(TITLE_NAMES)})", 1)
    table = _ItemTable(item_path)
    for n, row in iter_atomic(item_path):
        key = row.pop("item_id")
        table.add(key, row, n)
    _require_content(item_path, len(table.items), "items")
    notes = {} if has_time else {"timestamps": "none: file order"}
    return Parsed("recbole", table.items, interactions, item_path, origins, notes=notes)


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

    header = _atomic_header(test)
    _require_columns(test, header, "user_id", "item_id_list", "item_id")
    interactions: list[RawInteraction] = []
    origins = _Origins()
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
    _require_content(test, len(interactions), "interactions")

    text_path = f["items"]
    header = _atomic_header(text_path)
    _require_columns(text_path, header, "item_id")
    title_col = "text" if "text" in header else None
    if title_col is None and not _has_title({h: None for h in header}):
        raise InputError(text_path, "no 'text' (or title) column", 1)
    table = _ItemTable(text_path)
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


# ---- generic -------------------------------------------------------------------------------------


def read_generic(loc: Located) -> Parsed:
    inter_path, item_path = loc.files["interactions"], loc.files["items"]
    interactions: list[RawInteraction] = []
    origins = _Origins()
    origins.file(inter_path)
    cols: tuple[str | None, str | None, str | None] | None = None
    has_time = False
    inter_csv, item_csv = _is_csv(inter_path), _is_csv(item_path)
    for n, row in iter_rows(inter_path):
        if cols is None or not inter_csv:
            cols = (_pick(row, USER_COLUMNS), _pick(row, ITEM_COLUMNS), _pick(row, TIME_COLUMNS))
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
        ts = _timestamp(inter_path, n, row[tcol]) if tcol is not None else 0.0
        user, item = row[ucol], row[icol]
        if user is None or item is None or str(user).strip() == "" or str(item).strip() == "":
            raise InputError(inter_path, "empty user or item", n)
        interactions.append(RawInteraction(str(user).strip(), str(item).strip(), ts, n))
        origins.add(n)
    _require_content(inter_path, len(interactions), "interactions")

    table = _ItemTable(item_path)
    for n, row in iter_rows(item_path):
        key_col = _pick(row, ITEM_COLUMNS)
        if key_col is None:
            raise InputError(
                item_path, f"no 'item' column/field (have: {', '.join(row)})", 1 if item_csv else n
            )
        if not _has_title(row):
            raise InputError(
                item_path, f"no title column/field (one of {', '.join(TITLE_NAMES)})", 1 if item_csv else n
            )
        attrs = dict(row)
        key = str(attrs.pop(key_col)).strip()
        if not key:
            raise InputError(item_path, "empty item key", n)
        table.add(key, attrs, n)
    _require_content(item_path, len(table.items), "items")
    notes = {} if has_time else {"timestamps": "none: file order"}
    return Parsed("generic", table.items, interactions, item_path, origins, notes=notes)


READERS: dict[str, Callable[[Located], Parsed]] = {
    "amazon-raw": read_amazon_raw,
    "recformer": read_recformer,
    "json-lists": read_json_lists,
    "recbole": read_recbole,
    "recbole-unisrec": read_recbole_unisrec,
    "generic": read_generic,
}

EXPECTED = {
    "amazon-raw": "{Cat}_5.json.gz or {Cat}.json.gz and meta_{Cat}.json.gz",
    "recformer": "train.json, val.json, test.json, smap.json and meta_data.json",
    "json-lists": "{Name}.inter.json and {Name}.item.json",
    "recbole": "{name}.inter and {name}.item",
    "recbole-unisrec": "{Name}.test.inter, {Name}.text and {Name}.item2index",
    "generic": "interactions.csv|jsonl and items.csv|jsonl",
}


# ---- detection -----------------------------------------------------------------------------------

_UNISREC_SPLITS = (".train.inter", ".valid.inter", ".test.inter")


def candidates(folder: Path) -> list[Located]:
    """Every dataset the folder's file names identify, in all formats."""
    names = {p.name: p for p in folder.iterdir() if p.is_file()}
    found: list[Located] = []
    # recformer
    need = ("train.json", "val.json", "test.json", "smap.json", "meta_data.json")
    if all(n in names for n in need):
        files = {
            "train": names["train.json"],
            "val": names["val.json"],
            "test": names["test.json"],
            "smap": names["smap.json"],
            "items": names["meta_data.json"],
        }
        if "umap.json" in names:
            files["umap"] = names["umap.json"]
        found.append(Located("recformer", files))
    for name, path in sorted(names.items()):
        # recbole-unisrec
        if name.endswith(".test.inter"):
            stem = name.removesuffix(".test.inter")
            if f"{stem}.text" in names and f"{stem}.item2index" in names:
                files = {
                    "interactions": path,
                    "items": names[f"{stem}.text"],
                    "item2index": names[f"{stem}.item2index"],
                }
                if f"{stem}.user2index" in names:
                    files["user2index"] = names[f"{stem}.user2index"]
                found.append(Located("recbole-unisrec", files, stem))
        # recbole
        elif name.endswith(".inter") and not name.endswith(_UNISREC_SPLITS):
            stem = name.removesuffix(".inter")
            if f"{stem}.item" in names:
                found.append(Located("recbole", {"interactions": path, "items": names[f"{stem}.item"]}, stem))
        # json-lists
        elif name.endswith(".inter.json"):
            stem = name.removesuffix(".inter.json")
            if f"{stem}.item.json" in names:
                found.append(
                    Located("json-lists", {"interactions": path, "items": names[f"{stem}.item.json"]}, stem)
                )
        # amazon-raw: meta_{Cat}.json[.gz] with {Cat}_5.json[.gz] (preferred) or {Cat}.json[.gz]
        elif name.startswith("meta_") and name.endswith((".json", ".json.gz")):
            ext = ".json.gz" if name.endswith(".gz") else ".json"
            cat = name.removeprefix("meta_").removesuffix(ext)
            for review in (
                f"{cat}_5{ext}",
                f"{cat}{ext}",
                f"{cat}_5.json",
                f"{cat}_5.json.gz",
                f"{cat}.json",
                f"{cat}.json.gz",
            ):
                if review in names:
                    found.append(Located("amazon-raw", {"interactions": names[review], "items": path}, cat))
                    break
    # generic
    inter = [n for n in ("interactions.csv", "interactions.jsonl") if n in names]
    items = [n for n in ("items.csv", "items.jsonl") if n in names]
    if inter and items:
        found.append(Located("generic", {"interactions": names[inter[0]], "items": names[items[0]]}))
    return found


def _check_format(fmt: str, where: Path) -> None:
    if fmt not in FORMATS:
        raise InputError(where, f"unknown format {fmt!r}; accepted formats: {ACCEPTED}")


def locate(path: Path, fmt: str | None = None) -> Located:
    """The dataset at `path` (a folder, or one of the dataset's files), in `fmt` or the detected format."""
    if fmt is not None:
        _check_format(fmt, path)
    if not path.exists():
        raise _missing(path)
    folder = path if path.is_dir() else path.parent
    found = candidates(folder)
    if path.is_file():
        found = [c for c in found if path.resolve() in {p.resolve() for p in c.files.values()}]
        if not found and fmt is None:
            raise InputError(
                path, f"not a file of a recognisable dataset; accepted formats: {ACCEPTED} (pass --format)"
            )
    if fmt is not None:
        found = [c for c in found if c.format == fmt]
        if not found:
            raise InputError(path, f"no {fmt} dataset here: expected {EXPECTED[fmt]}")
    if not found:
        raise InputError(
            path,
            f"no recognisable dataset files; accepted formats: {ACCEPTED} (pass --format or --items/--interactions)",
        )
    if len(found) > 1:
        listed = ", ".join(f"{c.format} {c.name}".strip() for c in found)
        raise InputError(path, f"several datasets here ({listed}): pass one of their files or --format")
    return found[0]


def detect_format(path: str | Path) -> str:
    """The format of the dataset at `path` (folder or file); InputError if none or several match."""
    return locate(Path(path)).format


def format_of_files(interactions: Path, items: Path) -> str:
    """The format that two explicitly named files are in, from their names."""
    i, m = interactions.name.lower(), items.name.lower()
    if i.endswith(".inter.json") or m.endswith(".item.json"):
        return "json-lists"
    if i.endswith(".test.inter") or m.endswith(".text"):
        return "recbole-unisrec"
    if i.endswith(".inter") or m.endswith(".item"):
        return "recbole"
    if m.startswith("meta_") or i.endswith(".json.gz"):
        return "amazon-raw"
    if i.removesuffix(".gz").endswith((".csv", ".jsonl")):
        return "generic"
    raise InputError(interactions, f"cannot tell the format from the file names; pass --format ({ACCEPTED})")


def locate_files(interactions: Path, items: Path, fmt: str | None = None) -> Located:
    """A dataset given as two files (--interactions, --items)."""
    if fmt is not None:
        _check_format(fmt, interactions)
    for p in (interactions, items):
        if not p.exists():
            raise _missing(p)
        if p.is_dir():
            raise InputError(p, "is a directory, expected a file")
    fmt = fmt or format_of_files(interactions, items)
    files = {"interactions": interactions, "items": items}
    if fmt == "recformer":
        raise InputError(
            interactions, "the recformer format needs its folder (train/val/test/smap/meta_data.json)"
        )
    if fmt == "recbole-unisrec":
        stem = interactions.name.removesuffix(".test.inter")
        index = interactions.parent / f"{stem}.item2index"
        if not index.exists():
            raise _missing(index)
        files["item2index"] = index
        users = interactions.parent / f"{stem}.user2index"
        if users.exists():
            files["user2index"] = users
    return Located(fmt, files)


def read(loc: Located) -> Parsed:
    return READERS[loc.format](loc)
