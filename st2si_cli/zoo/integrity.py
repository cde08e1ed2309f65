"""Blobs are checked against their sha256 when a command first opens them.

Hashing every load would cost seconds for a backbone, so the check has a fast path: the index records
each blob file's size, mtime_ns and inode when its hash was last found right (at write and at verify).
A blob whose stat still matches is trusted; one whose stat changed is hashed again, and recorded again
if it is intact. Within one process a checked blob is not checked again while its stat is unchanged.
Bytes changed without any change of size, mtime or inode slip past the fast path: `st2si zoo verify`
hashes everything.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import sqlite_utils

from st2si_cli.errors import ZooError
from st2si_cli.zoo.artifact import sha256_file
from st2si_cli.zoo.schema import write_txn

# Checked in this process: blob path -> the (size, mtime_ns, inode) it had when its hash was right.
_checked: dict[str, tuple[int, int, int]] = {}


class IntegrityError(ZooError):
    """A stored blob no longer hashes to its ID."""


def stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def record_stat(db: sqlite_utils.Database, sha: str, path: Path) -> None:
    """Remember the blob file's stat as known good (call right after its hash was found right)."""
    record_stats(db, [(sha, path)])


def record_stats(db: sqlite_utils.Database, blobs: list[tuple[str, Path]]) -> None:
    """`record_stat` for many blobs in one transaction (blob files gone meanwhile are skipped)."""
    keys = []
    for sha, path in blobs:
        try:
            keys.append((sha, path, stat_key(path.stat())))
        except FileNotFoundError:
            continue
    try:
        with write_txn(db):
            for sha, _, (_, mtime_ns, inode) in keys:
                db.execute(
                    "UPDATE blobs SET mtime_ns = ?, inode = ? WHERE sha256 = ?", [mtime_ns, inode, sha]
                )
    except sqlite3.OperationalError as e:  # a read-only zoo: the check holds for this process only
        if "readonly" not in str(e).replace("-", "").replace(" ", ""):
            raise
    for _, path, key in keys:
        _checked[str(path)] = key


def check_blob(db: sqlite_utils.Database, sha: str, path: Path, describe: Callable[[], str]) -> Path:
    """`path` if the blob is present and intact, else a one-line ZooError naming `describe()`."""
    try:
        key = stat_key(path.stat())
    except FileNotFoundError:
        raise ZooError(
            f"{describe()} is gone from the zoo: its blob {sha[:12]} was removed (by `st2si zoo rm` "
            "in another process?) or lost; see `st2si zoo verify`"
        ) from None
    if _checked.get(str(path)) == key:
        return path
    row = db.execute("SELECT size, mtime_ns, inode FROM blobs WHERE sha256 = ?", [sha]).fetchone()
    if row is None:
        raise ZooError(f"{describe()} was removed from the zoo while this command ran")
    if tuple(row) != key:
        if sha256_file(path) != sha:
            raise IntegrityError(
                f"{describe()} is corrupted: its blob {sha[:12]} no longer matches its sha256; "
                "run `st2si zoo verify --repair`"
            )
        record_stat(db, sha, path)
    _checked[str(path)] = key
    return path


def forget_checks() -> None:
    """Drop this process's memory of checked blobs (for tests that change blobs in place)."""
    _checked.clear()
