"""The zoo's SQLite index: schema (named migrations), opening it from many processes, write transactions.

Several processes may open one zoo at once, a fresh one included. Opening takes `index.lock` (an
fcntl lock) around `PRAGMA journal_mode=WAL` and the migrations, so racing first opens run them one
after the other. Every write runs in `write_txn` (`BEGIN IMMEDIATE`): the write lock is taken before
the first read, so a transaction never has to upgrade a read lock (which SQLite cannot wait for), and
the busy timeout makes writers queue instead of failing with "database is locked".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils
from sqlite_utils.migrations import Migrations

from st2si_cli.zoo.locks import FileLock

BUSY_TIMEOUT_S = 120.0

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


def connect(root: Path) -> sqlite_utils.Database:
    """Open `root/index.db` (WAL, busy timeout) and apply pending migrations under `root/index.lock`."""
    conn = sqlite3.connect(str(root / "index.db"), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    db = sqlite_utils.Database(conn)
    with FileLock(root / "index.lock"):
        if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            db.execute("PRAGMA journal_mode=WAL")
        if migrations.pending(db):
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
