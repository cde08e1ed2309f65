"""What every format shares: `Located`, `Parsed`, the `Format` record, and helpers for readers.

A reader parses its files into item attributes and `RawInteraction`s (a `Parsed`); `build_dataset`
then canonicalises them, so the same data in two formats gives the same dataset hash. Readers parse
the whole input before anything is written anywhere, and every problem with the input is an
`InputError` naming the file and, where there is one, the line.
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.data.dataset import ATTRIBUTE_ALIASES, RawInteraction, canonical_attributes
from st2si_cli.errors import InputError

# Item keys for item indices that the index file does not map (cannot collide with a real item key).
UNMAPPED = "<unmapped index {}>"

TITLE_NAMES = sorted(k for k, v in ATTRIBUTE_ALIASES.items() if v == "title")
USER_COLUMNS = ("user", "user_id", "userid", "reviewerid")
ITEM_COLUMNS = ("item", "item_id", "itemid", "asin", "id")
TIME_COLUMNS = ("timestamp", "time", "unixreviewtime")

Names = Mapping[str, Path]  # a folder's files, by file name


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


def two_files(interactions: Path, items: Path) -> dict[str, Path]:
    """The files of a dataset given as an interaction file and an item file, by role."""
    return {"interactions": interactions, "items": items}


@dataclass(frozen=True)
class Format:
    """One input format: the files that identify it, how to find them, and how to read them.

    A format is detected either by fixed file names (`detect_folder`) or by the name of one of its
    files, which implies the names of the others (`detect_file`); exactly one of the two is set.
    """

    name: str
    description: str  # one line
    expected: str  # the files that identify it (for messages)
    read: Callable[[Located], Parsed]
    # A dataset with fixed file names among a folder's files (at most one per folder), or None.
    detect_folder: Callable[[Names], Located | None] | None = None
    # (file name, the folder's files) -> the dataset that file name identifies, or None. The names
    # that formats take are disjoint: a name never identifies datasets of two formats.
    detect_file: Callable[[str, Names], Located | None] | None = None
    # Whether an interaction file and an item file (lower-cased names) look like this format; None:
    # never told from two file names.
    claims_pair: Callable[[str, str], bool] | None = None
    # (interactions, items) -> the dataset's files by role, when given as two files.
    pair_files: Callable[[Path, Path], dict[str, Path]] = two_files

    def __post_init__(self) -> None:
        if (self.detect_folder is None) == (self.detect_file is None):
            raise ValueError(f"format {self.name}: set exactly one of detect_folder and detect_file")


# ---- helpers for readers -------------------------------------------------------------------------


class Origins:
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


def pick(row: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
    """The key of `row` that is the first of `names` present, case-insensitively (None if none is)."""
    lower = {k.lower(): k for k in row}
    for n in names:
        if n in lower:
            return lower[n]
    return None


def has_title(attrs: Mapping[str, Any]) -> bool:
    return any(ATTRIBUTE_ALIASES.get(k.lower()) == "title" for k in attrs)


def timestamp(path: Path, line: int, value: Any) -> float:
    """A timestamp as a float: a finite number (NaN and infinities would order a history arbitrarily)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        t = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(path, f"timestamp {value!r} is not a number", line) from None
    if not math.isfinite(t):
        raise InputError(path, f"timestamp {value!r} is not a finite number", line)
    return t


class ItemTable:
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

    def add_row(self, row: Mapping[str, Any], line: int, csv: bool) -> str:
        """Add one row of an item file (an item key column and a title); returns the item's key. A missing
        column is reported at the header (line 1) of a CSV, at the row itself in JSONL."""
        key_col = pick(row, ITEM_COLUMNS)
        if key_col is None:
            raise InputError(
                self.path, f"no 'item' column/field (have: {', '.join(row)})", 1 if csv else line
            )
        if not has_title(row):
            raise InputError(
                self.path, f"no title column/field (one of {', '.join(TITLE_NAMES)})", 1 if csv else line
            )
        attrs = dict(row)
        key = str(attrs.pop(key_col)).strip()
        if not key:
            raise InputError(self.path, "empty item key", line)
        self.add(key, attrs, line)
        return key


def require_content(path: Path, rows: int, what: str) -> None:
    if rows == 0:
        raise InputError(path, f"no {what} in the file")
