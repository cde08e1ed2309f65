"""The raw input formats that `st2si prepare` accepts: finding a dataset's files, and reading them.

Each format is one module of this package, defining its reader and its `Format` record (name, expected
files, how its files are found, how they are read); the formats are registered below. Readers parse
their files into item attributes and `RawInteraction`s (a `Parsed`) that `build_dataset` canonicalises,
so the same data in two formats gives the same dataset hash. Every problem with the input is an
`InputError` naming the file and, where there is one, the line.

To add a format: write its module (a reader and a `FORMAT`), then add it to `REGISTRY` and, where file
names identify it, to `PRIORITY`.
"""

from __future__ import annotations

from pathlib import Path

from st2si_cli.data.formats import amazon_raw, generic, json_lists, recbole, recbole_unisrec, recformer
from st2si_cli.data.formats._io import missing
from st2si_cli.data.formats.base import Format, Located, Names, Parsed
from st2si_cli.errors import InputError

__all__ = [
    "ACCEPTED",
    "FORMATS",
    "PRIORITY",
    "REGISTRY",
    "Format",
    "Located",
    "Parsed",
    "candidates",
    "detect_format",
    "format_of_files",
    "locate",
    "locate_files",
    "read",
]

# The formats, in the order that messages and `--help` list them.
REGISTRY: tuple[Format, ...] = (
    amazon_raw.FORMAT,
    recformer.FORMAT,
    json_lists.FORMAT,
    recbole.FORMAT,
    recbole_unisrec.FORMAT,
    generic.FORMAT,
)
# The order in which file names are matched against formats: the more specific names first (json-lists'
# `.inter.json` and recbole-unisrec's `.test.inter` before recbole's `.inter`). It is also the order in
# which `candidates` lists the datasets it finds.
PRIORITY: tuple[Format, ...] = (
    recformer.FORMAT,
    json_lists.FORMAT,
    recbole_unisrec.FORMAT,
    recbole.FORMAT,
    amazon_raw.FORMAT,
    generic.FORMAT,
)

FORMATS = tuple(f.name for f in REGISTRY)
ACCEPTED = ", ".join(FORMATS)
_BY_NAME = {f.name: f for f in REGISTRY}


def _by_file(fmts: list[Format], names: Names) -> list[Located]:
    """The datasets that the folder's file names identify, in file-name order."""
    found: list[Located] = []
    for name in sorted(names):
        for f in fmts:
            loc = f.detect_file(name, names) if f.detect_file is not None else None
            if loc is not None:
                found.append(loc)
                break
    return found


def candidates(folder: Path) -> list[Located]:
    """Every dataset the folder's file names identify, in all formats.

    In `PRIORITY` order, except that consecutive formats found by a file name are scanned together, so
    their datasets are listed in the order of the file names that identify them.
    """
    names = {p.name: p for p in folder.iterdir() if p.is_file()}
    found: list[Located] = []
    run: list[Format] = []  # consecutive formats found by a file name, not scanned yet
    for f in PRIORITY:
        if f.detect_file is not None:
            run.append(f)
            continue
        found += _by_file(run, names)
        run = []
        loc = f.detect_folder(names) if f.detect_folder is not None else None
        if loc is not None:
            found.append(loc)
    return found + _by_file(run, names)


def _check_format(fmt: str, where: Path) -> None:
    if fmt not in _BY_NAME:
        raise InputError(where, f"unknown format {fmt!r}; accepted formats: {ACCEPTED}")


def locate(path: Path, fmt: str | None = None) -> Located:
    """The dataset at `path` (a folder, or one of the dataset's files), in `fmt` or the detected format."""
    if fmt is not None:
        _check_format(fmt, path)
    if not path.exists():
        raise missing(path)
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
            raise InputError(path, f"no {fmt} dataset here: expected {_BY_NAME[fmt].expected}")
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
    """The format that two explicitly named files are in, from their names (the first in `PRIORITY`)."""
    i, m = interactions.name.lower(), items.name.lower()
    for f in PRIORITY:
        if f.claims_pair is not None and f.claims_pair(i, m):
            return f.name
    raise InputError(interactions, f"cannot tell the format from the file names; pass --format ({ACCEPTED})")


def locate_files(interactions: Path, items: Path, fmt: str | None = None) -> Located:
    """A dataset given as two files (--interactions, --items)."""
    if fmt is not None:
        _check_format(fmt, interactions)
    for p in (interactions, items):
        if not p.exists():
            raise missing(p)
        if p.is_dir():
            raise InputError(p, "is a directory, expected a file")
    fmt = fmt or format_of_files(interactions, items)
    return Located(fmt, _BY_NAME[fmt].pair_files(interactions, items))


def read(loc: Located) -> Parsed:
    """Parse a located dataset's files with its format's reader."""
    return _BY_NAME[loc.format].read(loc)
