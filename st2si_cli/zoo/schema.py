"""The zoo's SQLite index: schema (named migrations), opening it from many processes, write transactions.

Several processes may open one zoo at once, a fresh one included. Opening takes `index.lock` (an
fcntl lock) around `PRAGMA journal_mode=WAL` and the migrations, so racing first opens run them one
after the other. Every write runs in `write_txn` (`BEGIN IMMEDIATE`): the write lock is taken before
the first read, so a transaction never has to upgrade a read lock (which SQLite cannot wait for), and
the busy timeout makes writers queue instead of failing with "database is locked".
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import sqlite_utils
from sqlite_utils.migrations import Migrations

from st2si_cli.errors import ZooError
from st2si_cli.zoo.locks import FileLock

BUSY_TIMEOUT_S = 120.0
INDEX = "index.db"

migrations = Migrations("st2si.zoo")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["artifacts"].create(
        {"id": str, "kind": str, "domain": str, "created": float, "size": int, "meta": str},
        pk="id",
    )
    db["files"].create({"artifact": str, "name": str, "blob": str}, pk=("artifact", "name"))
    db["blobs"].create({"sha256": str, "size": int}, pk="sha256")
    db["names"].create({"name": str, "artifact": str, "kind": str, "updated": float}, pk="name")
    db["artifacts"].create_index(["kind", "domain"])
    db["files"].create_index(["blob"])


@migrations()
def m002_blob_stat(db: sqlite_utils.Database) -> None:
    """The blob file's stat when its hash was last checked: the fast path of the check on load."""
    db["blobs"].add_column("mtime_ns", int)
    db["blobs"].add_column("inode", int)


@migrations()
def m003_names_per_kind(db: sqlite_utils.Database) -> None:
    """A name is unique within its kind: a dataset and a backbone may both be called `tiny`."""
    db["names"].transform(pk=("kind", "name"))
    db["names"].create_index(["artifact"])


class DamagedIndexError(ZooError):
    """The zoo holds blobs or manifests but its index is missing, empty or not a SQLite database.

    Nothing is written to such a zoo: an empty index would make every blob look unreferenced."""

    def __init__(self, root: Path, why: str):
        self.root = root
        super().__init__(
            f"the zoo at {root} is damaged: {why}; nothing was changed. "
            "Rebuild the index from the artifacts' manifests with `st2si zoo verify --repair`"
        )


def holds_content(root: Path) -> bool:
    """Whether the folder has any blob or manifest file: then it is a zoo, whatever its index says."""
    for sub in ("blobs", "manifests"):
        folder = root / sub
        if not folder.is_dir() or folder.is_symlink():
            continue
        for d in folder.iterdir():
            if d.is_file() or (d.is_dir() and any(True for _ in d.iterdir())):
                return True
    return False


def _tables(db: sqlite_utils.Database, root: Path) -> set[str]:
    """The index's table names; DamagedIndexError if the file is not a readable SQLite database."""
    try:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if names:
            problem = db.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "locked" in str(e):
            raise
        raise DamagedIndexError(
            root, f"its index {root / INDEX} is not a valid SQLite database ({e})"
        ) from None
    return names


def _empty_index_check(names: set[str], root: Path) -> None:
    if "artifacts" not in names and holds_content(root):
        raise DamagedIndexError(root, f"it holds blobs but its index {root / INDEX} is empty")


def _open_file(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if not read_only:
        return sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except sqlite3.OperationalError:
        # A WAL index in a folder nobody may write: SQLite cannot make its shared-memory file. Nobody
        # can change the index either, so it may be read as immutable.
        conn.close()
        conn = sqlite3.connect(uri + "&immutable=1", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    return conn


def connect(root: Path, *, read_only: bool = False, rebuild: bool = False) -> sqlite_utils.Database:
    """Open `root/index.db` (WAL, busy timeout) and apply pending migrations under `root/index.lock`.

    `read_only`: open the existing index without any lock or write (a zoo in a folder this process may
    not write, or one a reading command must not change); migrations must then be applied already.
    A zoo that holds blobs but whose index is empty or not a database raises DamagedIndexError
    (`rebuild`: a new, empty index is wanted there, to be filled from the manifests).
    """
    path = root / INDEX
    if (
        not rebuild and not path.exists() and holds_content(root)
    ):  # checked before SQLite makes an empty file there
        raise DamagedIndexError(root, f"it holds blobs but has no index ({path} is missing)")
    conn = _open_file(path, read_only=read_only)
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    db = sqlite_utils.Database(conn)
    try:
        if read_only:
            names = _tables(db, root)
            _empty_index_check(names, root)
            if "artifacts" not in names:
                raise DamagedIndexError(root, f"its index {path} is empty")
            if migrations.pending(db):
                raise ZooError(
                    f"the zoo at {root} was written by an older st2si and this command may not upgrade it: "
                    "run a writing command (e.g. `st2si zoo prune --dry-run` where the folder is writable)"
                )
            return db
        with FileLock(root / "index.lock"):
            names = _tables(db, root)
            if not rebuild:
                _empty_index_check(names, root)
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            if migrations.pending(db):
                migrations.apply(db)
    except BaseException:
        db.close()
        raise
    return db


def empty_index() -> sqlite_utils.Database:
    """An in-memory index with the current schema: what a reading command sees where no zoo exists."""
    db = sqlite_utils.Database(memory=True)
    migrations.apply(db)
    return db


@contextmanager
def write_txn(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """One write transaction, `BEGIN IMMEDIATE`: everything inside commits together or not at all."""
    if db.conn.in_transaction:  # nested: a savepoint of the enclosing transaction
        with db.atomic():
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.conn.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def may_write(root: Path) -> bool:
    """Whether this process may change the zoo: write its folder and its index."""
    index = root / INDEX
    return os.access(root, os.W_OK) and (not index.exists() or os.access(index, os.W_OK))


def open_index(root: Path, *, create: bool) -> tuple[sqlite_utils.Database, bool, bool]:
    """(index, whether the zoo exists, whether it is read-only) for `Zoo(root, create=...)`.

    create=True makes the zoo's folders and index where there are none (writing commands). create=False
    makes nothing: no zoo reads as an empty in-memory index; a zoo this process may not write is opened
    read-only, without locks. A folder that holds blobs but no valid index raises DamagedIndexError.
    """
    exists = (root / INDEX).exists()
    if not create and not exists:
        if root.is_dir() and holds_content(root):
            raise DamagedIndexError(root, f"it holds blobs but has no index ({root / INDEX})")
        return empty_index(), False, True
    if not create and not may_write(root):
        return connect(root, read_only=True), True, True
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("blobs", "views", "tmp"):
        folder = root / sub
        if folder.exists() and (folder.is_symlink() or not folder.is_dir()):
            what = "a link" if folder.is_symlink() else "not a folder"
            raise ZooError(f"{folder} is {what}: the zoo's {sub}/ must be a folder inside it; move it away")
        folder.mkdir(exist_ok=True)
    db = connect(root)
    if not (root / "manifests").exists():
        from st2si_cli.zoo.manifests import backfill

        with FileLock(root / "index.lock"):
            backfill(root, db)
    return db, True, False
