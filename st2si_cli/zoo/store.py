"""The zoo: artifacts (datasets, catalogs, backbones, heads, feature caches, runs) on local disk.

Layout under the root:

    index.db                SQLite index (sqlite-utils), schema by named migrations
    blobs/ab/abcdef...      file contents, stored once by sha256
    views/<artifact id>/    folders of links to blobs, for loaders that want a directory
    manifests/ab/abcdef.json  each artifact's index rows as a file: what the index is rebuilt from
    tmp/                    staging for atomic writes and resumable work

An artifact is a set of named files plus metadata (config, inputs, versions, metrics). Its ID is the
sha256 of its kind, its file manifest and an optional identity dict, so the same content gives the
same ID. Names point at artifacts (one artifact per name; a name can move to a newer artifact).
Blobs are written to a temp file and renamed; index rows are written in one transaction.

Only writing commands make a zoo (`Zoo(root)`); reading ones open it with `create=False`, which
creates nothing (a missing zoo reads as empty) and reads a zoo in a folder it may not write without
any lock. A folder that holds blobs but no valid index is damaged: it is refused, never reset.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from st2si_cli.errors import ZooError
from st2si_cli.zoo import blobs, manifests
from st2si_cli.zoo.artifact import (
    Artifact,
    RemovalPlan,
    VerifyReport,
    canonical_json,
    input_ids,
    is_sha256,
)
from st2si_cli.zoo.integrity import check_blob, stat_key
from st2si_cli.zoo.locks import FileLock, tmp_prefix
from st2si_cli.zoo.lookup import PIN_KIND, Lookups
from st2si_cli.zoo.schema import DamagedIndexError, migrations, open_index, write_txn
from st2si_cli.zoo.views import build_private_view, build_view

KINDS = ("dataset", "catalog", "backbone", "head", "features", "run")
ENV_HOME = "ST2SI_HOME"
__all__ = [
    "KINDS",
    "Artifact",
    "DamagedIndexError",
    "RemovalPlan",
    "VerifyReport",
    "Zoo",
    "input_ids",
    "migrations",
    "resolve_root",
]


class NameTakenError(ZooError):
    """A name of this kind already points at another artifact, and moving it was not asked for."""


def default_root() -> Path:
    from platformdirs import user_data_dir

    return Path(user_data_dir("st2si", appauthor=False))


def resolve_root(path: str | Path | None = None) -> Path:
    """`--zoo PATH` > `$ST2SI_HOME` > the platform's user data dir."""
    # Absolute, so that the links under views/ still resolve when the caller changes directory.
    if path:
        return Path(path).expanduser().absolute()
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env).expanduser().absolute()
    return default_root().absolute()


class Zoo(Lookups):
    """The local store. Cheap to open: `Zoo(root)` creates the folders and applies pending migrations.

    `create=False` (the reading commands, and rm/prune/verify): nothing is created. A missing zoo reads
    as an empty one; a zoo in a folder this process may not write is opened read-only, with no lock,
    and the writing methods refuse with one line.
    """

    def __init__(self, root: str | Path | None = None, *, create: bool = True):
        self.root = resolve_root(root)
        if self.root.exists() and not self.root.is_dir():
            raise ZooError(f"{self.root}: the zoo must be a folder, and this is a file")
        self._written: set[str] = set()  # blobs this process wrote (and so hashed) since the last put
        self._held: dict[str, FileLock] = {}  # artifacts this process uses as inputs (see `hold`)
        self.db, self.exists, self.read_only = open_index(self.root, create=create)

    def require_writable(self, what: str) -> None:
        """Refuse, in one line, to `what` in a zoo this process may not (or must not) change."""
        if not self.read_only:
            return
        if not self.exists:
            raise ZooError(f"there is no zoo at {self.root}: nothing to {what}")
        raise ZooError(f"the zoo at {self.root} is read-only: cannot {what}")

    def release_holds(self) -> None:
        """Drop this process's claims on its inputs (`hold`); closing the zoo does it too."""
        for lock in self._held.values():
            lock.release()
        self._held.clear()

    def close(self) -> None:
        self.release_holds()
        self.db.close()

    def __enter__(self) -> Zoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- locks -----------------------------------------------------------------------------------
    def gc_lock(self, *, shared: bool) -> FileLock:
        """Shared while blobs are written and indexed (put), exclusive while unindexed ones are
        deleted (rm, prune): a blob written for a put that has not committed yet is never deleted."""
        return FileLock(self.root / "gc.lock", shared=shared)

    def claim(self, key: str) -> FileLock:
        """The lock of the shared work `key` (its staging folder tmp/KEY): hold it while computing."""
        self.require_writable("compute and store new work")
        return FileLock(self.root / "tmp" / f"{key}.lock")

    def hold_lock(self, art_id: str) -> FileLock:
        """The lock a process holds (shared) on an artifact it uses as an input; `zoo rm` takes it
        exclusively, so an input in use is not removed."""
        return FileLock(self.root / "tmp" / f"input-{art_id}.lock", shared=True)

    def hold(self, *arts: Artifact) -> None:
        """Claim artifacts as inputs of this process's work until the zoo is closed (or the process
        ends): `zoo rm` refuses to remove them meanwhile. An artifact removed before the claim was
        taken raises ZooError. A read-only zoo cannot be changed by anyone: nothing to claim."""
        if self.read_only:
            return
        for art in arts:
            if art.id in self._held:
                continue
            lock = self.hold_lock(art.id)
            lock.acquire()
            self._held[art.id] = lock
            if self._by_id(art.id) is None:
                self._held.pop(art.id).release()
                raise ZooError(
                    f"{art.kind} {art.name or art.short_id} was removed from the zoo while this command ran"
                )

    # ---- blobs -----------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        return blobs.blob_path(self.root, sha)

    def _store_blob(self, source: Path | bytes, move: bool = False) -> tuple[str, int]:
        sha, size, written = blobs.store_blob(self.root, source, move)
        if written:
            self._written.add(sha)
        return sha, size

    def staging_dir(self, key: str) -> Path:
        """A folder under tmp/ for work in progress that a later run may resume (hold `claim(key)`)."""
        self.require_writable("stage work")
        path = self.root / "tmp" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def private_dir(self, kind: str) -> Path:
        """A new folder under tmp/ that only this process uses (`KIND-PID-random`)."""
        self.require_writable("stage work")
        return Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix=tmp_prefix(kind)))

    # ---- artifacts -------------------------------------------------------------------------------
    def put(
        self,
        kind: str,
        files: Mapping[str, Path | bytes],
        meta: Mapping[str, Any],
        *,
        name: str | None = None,
        domain: str | None = None,
        identity: Mapping[str, Any] | None = None,
        move: bool = False,
        replace_name: bool = True,
    ) -> Artifact:
        """Store files and register an artifact (and its name) in one transaction.

        With replace_name=False a name that already points at another artifact of this kind is not
        moved: NameTakenError, and nothing is registered.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        self.require_writable(f"store a {kind}")
        if name and not replace_name and all(isinstance(v, (bytes, bytearray)) for v in files.values()):
            manifest = {f: hashlib.sha256(v).hexdigest() for f, v in sorted(files.items())}  # type: ignore[arg-type]
            self._name(name, kind, self.artifact_id(kind, manifest, identity), replace=False, check_only=True)
        with self.gc_lock(shared=True):
            self._written = set()
            try:
                stored = {fname: self._store_blob(src, move=move) for fname, src in files.items()}
            except OSError as e:
                raise blobs.write_error(self.root, e) from e
            manifest = {fname: sha for fname, (sha, _) in sorted(stored.items())}
            art_id = self.artifact_id(kind, manifest, identity)
            blob_rows = []
            for sha, size in set(stored.values()):
                row = {"sha256": sha, "size": size, "mtime_ns": None, "inode": None}
                if sha in self._written:  # hashed as written: its stat is known good
                    _, row["mtime_ns"], row["inode"] = stat_key(self.blob_path(sha).stat())
                blob_rows.append(row)
            with write_txn(self.db):
                self._check_inputs(meta)
                self._register(kind, art_id, manifest, meta, domain, blob_rows)
                displaced = self._name(name, kind, art_id, replace_name) if name else None
            self._sync_manifests(art_id, displaced)
        return self.get(art_id)

    def _check_inputs(self, meta: Mapping[str, Any]) -> None:
        """Inside the put's transaction: every input the meta names must still be in the zoo (`zoo rm`
        checks dependents in its own transaction, so an input and its dependent never cross)."""
        for ref in sorted(input_ids(meta)):
            if not is_sha256(ref):
                continue
            if self.db.execute("SELECT 1 FROM artifacts WHERE id = ?", [ref]).fetchone() is None:
                raise ZooError(
                    f"an input of this command ({ref[:12]}) was removed from the zoo while it ran; "
                    "nothing was stored"
                )

    def _sync_manifests(self, *ids: str | None) -> None:
        try:
            manifests.sync(self.root, self.db, [i for i in ids if i])
        except OSError as e:
            raise blobs.write_error(self.root, e) from e

    @staticmethod
    def artifact_id(kind: str, manifest: Mapping[str, str], identity: Mapping[str, Any] | None) -> str:
        """sha256 of the kind, the {file name: blob sha256} manifest and the identity dict."""
        spec = {"kind": kind, "files": dict(sorted(manifest.items())), "identity": identity}
        return hashlib.sha256(canonical_json(spec).encode()).hexdigest()

    def _register(
        self,
        kind: str,
        art_id: str,
        manifest: Mapping[str, str],
        meta: Mapping[str, Any],
        domain: str | None,
        blob_rows: list[dict[str, Any]],
    ) -> None:
        self.db["blobs"].insert_all(blob_rows, pk="sha256", ignore=True)
        if self.db.execute("SELECT 1 FROM artifacts WHERE id = ?", [art_id]).fetchone():
            return
        size = sum(next(r["size"] for r in blob_rows if r["sha256"] == sha) for sha in manifest.values())
        self.db["artifacts"].insert(
            {
                "id": art_id,
                "kind": kind,
                "domain": domain,
                "created": time.time(),
                "size": size,
                "meta": canonical_json(dict(meta)),
            }
        )
        self.db["files"].insert_all(
            [{"artifact": art_id, "name": fname, "blob": sha} for fname, sha in manifest.items()]
        )

    def _name(
        self, name: str, kind: str, art_id: str, replace: bool = True, check_only: bool = False
    ) -> str | None:
        """Point the name at the artifact; the ID of the artifact it pointed at before, if another."""
        row = self.db.execute(
            "SELECT artifact FROM names WHERE kind = ? AND name = ?", [kind, name]
        ).fetchone()
        if not replace and row is not None and row[0] != art_id:
            raise NameTakenError(f"{kind} {name!r} already holds another artifact ({row[0][:12]})")
        if check_only:
            return None
        self.db["names"].upsert(
            {"name": name, "artifact": art_id, "kind": kind, "updated": time.time()}, pk=("kind", "name")
        )
        return row[0] if row is not None and row[0] != art_id else None

    def update_meta(self, art: Artifact, **changes: Any) -> Artifact:
        self.require_writable(f"change {art.kind} {art.name or art.short_id}")
        with write_txn(self.db):
            row = self.db.execute("SELECT meta FROM artifacts WHERE id = ?", [art.id]).fetchone()
            if row is None:
                raise ZooError(f"{art.kind} {art.name or art.short_id} was removed from the zoo")
            meta = {**json.loads(row[0]), **changes}
            self.db["artifacts"].update(art.id, {"meta": canonical_json(meta)})
        self._sync_manifests(art.id)
        return self.get(art.id)

    def set_name(self, name: str, art: Artifact) -> None:
        self.require_writable(f"name {art.kind} {art.short_id}")
        with write_txn(self.db):
            displaced = self._name(name, art.kind, art.id)
        self._sync_manifests(art.id, displaced)

    def pin_head(self, domain: str, head: Artifact | None) -> Artifact | None:
        """Pin `head` as `domain`'s default head (None: unpin); the head pinned before, if another."""
        self.require_writable(f"change the default head of {domain}")
        with write_txn(self.db):
            row = self.db.execute(
                "SELECT artifact FROM names WHERE kind = ? AND name = ?", [PIN_KIND, domain]
            ).fetchone()
            before = row[0] if row is not None else None
            if head is None:
                self.db.execute("DELETE FROM names WHERE kind = ? AND name = ?", [PIN_KIND, domain])
            else:
                self._name(domain, PIN_KIND, head.id)
        self._sync_manifests(before, head.id if head is not None else None)
        return self._by_id(before) if before and (head is None or before != head.id) else None

    def _checked(self, art: Artifact, fname: str, sha: str) -> Path:
        def describe() -> str:
            return f"{art.kind} {art.name or art.short_id} ({art.short_id}, file {fname})"

        return check_blob(self.db, sha, self.blob_path(sha), describe)

    def file(self, art: Artifact, fname: str) -> Path:
        """The blob of one of the artifact's files, checked against its sha256 (see `integrity`)."""
        try:
            sha = art.files[fname]
        except KeyError:
            gone = " (it was removed from the zoo)" if self._by_id(art.id) is None else ""
            raise ZooError(f"{art.kind} {art.name or art.short_id} has no file {fname!r}{gone}") from None
        return self._checked(art, fname, sha)

    def read_json(self, art: Artifact, fname: str) -> Any:
        """A JSON file of the artifact; bytes that no longer decode are a ZooError naming it."""
        from st2si_cli.zoo.decoding import decoding

        path = self.file(art, fname)
        with decoding(art, fname):
            return json.loads(path.read_text("utf-8"))

    def view(self, art: Artifact) -> Path:
        """A folder whose entries link (relatively) to the artifact's checked blobs (for `from_pretrained`)."""
        for fname, sha in art.files.items():
            self._checked(art, fname, sha)
        if self.read_only:
            return build_private_view(self.root, art.id, art.files)
        return build_view(self.root, art.id, art.files)

    # ---- removal, verification, pruning: st2si_cli.zoo.maintenance (functions taking the zoo) ----
    def iter_blob_files(self) -> Iterator[Path]:
        return blobs.iter_blob_files(self.root)

    def links(self) -> list[Path]:
        return blobs.links(self.root)
