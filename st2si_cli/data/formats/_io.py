"""Reading input files: text, JSON, JSON lines, CSV and RecBole atomic files.

Every problem is an `InputError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from st2si_cli.errors import InputError

# The longest line an input file may have. No item or interaction needs anything near it (an item's text
# is read to 32 tokens per attribute); refusing longer lines bounds what one line can cost in memory.
MAX_LINE_BYTES = 16 << 20

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
# A surrogate escape with the low half that may follow it: a lone one is a match without a pair.
_SURROGATE_PAIR = re.compile(r"\\u([dD][89a-fA-F][0-9a-fA-F]{2})(\\u[dD][c-fC-F][0-9a-fA-F]{2})?")


def lone_surrogate(obj: Any) -> str | None:
    """The first string (value or key) anywhere in a parsed JSON value that holds a lone surrogate
    (JSON `"\\ud800"` with no partner: not Unicode text, so it can be neither stored nor tokenised);
    None if there is none."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if _SURROGATE.search(x):
                return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None


def surrogate_message(text: str) -> str:
    """What to say about a string that `lone_surrogate` found."""
    found = _SURROGATE.search(text)
    code = f"\\u{ord(found.group()):04x}" if found else "a surrogate"
    return f"lone surrogate {code} in a string: not valid Unicode text"


def may_hold_surrogate(text: str) -> bool:
    """Whether a JSON text has a surrogate escape (cheap: only then is the parsed value searched)."""
    return "\\u" in text and _SURROGATE_ESCAPE.search(text) is not None


def _lone_escape_line(text: str) -> int | None:
    """The line of the first surrogate escape in a JSON text that is not half of a pair."""
    for m in _SURROGATE_PAIR.finditer(text):
        if m.group(2) is None or m.group(1)[1] not in "89abAB":
            return text.count("\n", 0, m.start()) + 1
    return None


def missing(path: Path) -> InputError:
    return InputError(path, "no such file or directory")


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text with its newline) of a UTF-8 text file, gunzipped on the fly for `.gz`.

    Streams: the file is never held in memory. Raises InputError for a missing or empty file, a line
    over `MAX_LINE_BYTES`, bytes that are not UTF-8, and a truncated or corrupt gzip stream.
    """
    gz = path.name.endswith(".gz")
    n = 0
    content = False
    try:
        f = gzip.open(path, "rb") if gz else open(path, "rb")
    except FileNotFoundError:
        raise missing(path) from None
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        with f:
            for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise InputError(
                        path, f"line longer than {_mib(MAX_LINE_BYTES)} (the most one line may hold)", n
                    )
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


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def read_text(path: Path) -> str:
    """A whole UTF-8 text file (for formats that are one JSON document)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise missing(path) from None
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


# ---- JSON ----------------------------------------------------------------------------------------


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
        data = json.loads(text, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise InputError(path, f"malformed JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except _DuplicateKey as e:
        raise InputError(
            path, f"key {e.key!r} appears twice with different values", key_line(text, e.key, 2)
        ) from None
    except RecursionError:
        raise InputError(path, "JSON nested too deeply") from None
    bad = lone_surrogate(data) if may_hold_surrogate(text) else None
    if bad is not None:
        raise InputError(path, surrogate_message(bad), _lone_escape_line(text))
    return data, text


def json_object(path: Path, what: str) -> tuple[dict[str, Any], str]:
    """A non-empty JSON object (mapping `what`) and its text."""
    data, text = read_json(path)
    if not isinstance(data, dict):
        raise InputError(path, f"expected a JSON object mapping {what}, found {type(data).__name__}", 1)
    if not data:
        raise InputError(path, "empty file (no entries)", 1)
    return data, text


def index_lists(path: Path) -> tuple[dict[str, list[Any]], str]:
    """A JSON object mapping users to item lists (a lone item counts as a list of one), and its text."""
    data, text = json_object(path, "user indices to item lists")
    out: dict[str, list[Any]] = {}
    for user, items in data.items():
        if isinstance(items, (int, str)):
            items = [items]
        if not isinstance(items, list):
            raise InputError(path, f"user {user!r}: expected a list of item indices", key_line(text, user))
        out[str(user)] = items
    return out, text


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
        except RecursionError:
            raise InputError(path, "JSON nested too deeply", n) from None
        bad = lone_surrogate(obj) if may_hold_surrogate(s) else None
        if bad is not None:
            raise InputError(path, surrogate_message(bad), n)
        if not isinstance(obj, dict):
            raise InputError(path, f"expected a JSON object, found {type(obj).__name__}", n)
        yield n, obj


# ---- CSV and RecBole atomic files ----------------------------------------------------------------


def iter_csv(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV file with a header; keys are the lower-cased column names.

    Strict: a quoted field that never closes is an error at the line where it opened, not a row that
    silently swallows the rest of the file."""
    reader = csv.reader((text for _, text in iter_lines(path)), strict=True)
    start = 1  # the line the row being read starts on
    try:
        header = [h.strip().lower() for h in next(reader)]
        if len(set(header)) != len(header):
            raise InputError(path, f"repeated column name in the header {header}", 1)
        start = reader.line_num + 1
        for row in reader:
            if not row or not any(c.strip() for c in row):
                start = reader.line_num + 1
                continue
            if len(row) != len(header):
                raise InputError(path, f"{len(row)} fields, the header has {len(header)}", reader.line_num)
            yield reader.line_num, dict(zip(header, row, strict=True))
            start = reader.line_num + 1
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise InputError(
                path, "malformed CSV: a quoted field opens here and never closes", start
            ) from None
        raise InputError(path, f"malformed CSV: {e}", reader.line_num) from None


def is_csv(path: Path) -> bool:
    return path.name.lower().removesuffix(".gz").endswith(".csv")


def iter_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a CSV or JSON-lines file, by extension."""
    if is_csv(path):
        return iter_csv(path)
    if path.name.lower().removesuffix(".gz").endswith((".jsonl", ".json")):
        return iter_json_lines(path)
    raise InputError(path, "unsupported file type: expected .csv or .jsonl")


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


def atomic_header(path: Path) -> list[str]:
    """The field names of a RecBole atomic file's header (types dropped)."""
    for _, text in iter_lines(path):
        if text.strip():
            return [h.partition(":")[0].strip() for h in text.rstrip("\r\n").split("\t")]
    raise InputError(path, "empty file")  # unreachable: iter_lines raises first


def require_columns(path: Path, header: list[str], *names: str) -> None:
    for name in names:
        if name not in header:
            raise InputError(path, f"no {name!r} column (columns: {', '.join(header)})", 1)
