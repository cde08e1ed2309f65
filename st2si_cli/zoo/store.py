"""The zoo: artifacts (datasets, catalogs, backbones, heads, feature caches, runs) on local disk.

Layout under the root:

    index.db                SQLite index (sqlite-utils), schema by named migrations
    blobs/ab/abcdef...      file contents, stored once by sha256
    views/<artifact id>/    folders of links to blobs, for loaders that want a directory
    tmp/                    staging for atomic writes and resumable work

An artifact is a set of named files plus metadata (config, inputs, versions, metrics). Its ID is the
sha256 of its kind, its file manifest and an optional identity dict, so the same content gives the
same ID. Names point at artifacts (one artifact per name; a name can move to a newer artifact).
Blobs are written to a temp file and renamed; index rows are written in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.migrations import Migrations

from st2si_cli.errors import ZooError
from st2si_cli.zoo.artifact import (
    CHUNK,
    Artifact,
    RemovalPlan,
    VerifyReport,
    canonical_json,
    input_ids,
    sha256_file,
)

KINDS = ("dataset", "catalog", "backbone", "head", "features", "run")
ENV_HOME = "ST2SI_HOME"

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


class Zoo:
    """The local store. Cheap to open: creates the folders and applies pending migrations."""

    def __init__(self, root: str | Path | None = None):
        self.root = resolve_root(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("blobs", "views", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        self.db = sqlite_utils.Database(self.root / "index.db")
        self.db.execute("PRAGMA journal_mode=WAL")
        migrations.apply(self.db)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Zoo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- blobs -----------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def _store_blob(self, source: Path | bytes, move: bool = False) -> tuple[str, int]:
        """Copy (or move) a file or bytes into blobs/, atomically. Returns (sha256, size)."""
        tmp_dir = self.root / "tmp"
        if isinstance(source, (bytes, bytearray)):
            sha = hashlib.sha256(source).hexdigest()
            size = len(source)
            final = self.blob_path(sha)
            if not final.exists():
                final.parent.mkdir(exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="blob-")
                with os.fdopen(fd, "wb") as f:
                    f.write(source)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            return sha, size
        source = Path(source)
        size = source.stat().st_size
        same_fs_tmp = source.resolve().is_relative_to(tmp_dir.resolve())
        if move and same_fs_tmp:
            sha = sha256_file(source)
            final = self.blob_path(sha)
            final.parent.mkdir(exist_ok=True)
            if final.exists():
                source.unlink()
            else:
                os.replace(source, final)
            return sha, size
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix="blob-")
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha = h.hexdigest()
        final = self.blob_path(sha)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            os.unlink(tmp)
        else:
            os.replace(tmp, final)
        return sha, size

    def staging_dir(self, key: str) -> Path:
        """A folder under tmp/ for work in progress that a later run may resume."""
        path = self.root / "tmp" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

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
    ) -> Artifact:
        """Store files and register an artifact (and its name) in one transaction."""
        if kind not in KINDS:
            raise ValueError(f"unknown artifact kind {kind!r}")
        stored = {fname: self._store_blob(src, move=move) for fname, src in files.items()}
        manifest = {fname: sha for fname, (sha, _) in sorted(stored.items())}
        art_id = hashlib.sha256(
            canonical_json({"kind": kind, "files": manifest, "identity": identity}).encode()
        ).hexdigest()
        size = sum(s for _, s in stored.values())
        now = time.time()
        # db.atomic(), not `with db.conn`: sqlite-utils commits each write made outside an open
        # transaction, so only an explicit BEGIN makes these rows land together or not at all.
        with self.db.atomic():
            self.db["blobs"].insert_all(
                [{"sha256": sha, "size": s} for sha, s in stored.values()], pk="sha256", ignore=True
            )
            existing = self.db["artifacts"].count_where("id = ?", [art_id])
            if not existing:
                self.db["artifacts"].insert(
                    {
                        "id": art_id,
                        "kind": kind,
                        "domain": domain,
                        "created": now,
                        "size": size,
                        "meta": canonical_json(dict(meta)),
                    }
                )
                self.db["files"].insert_all(
                    [{"artifact": art_id, "name": fname, "blob": sha} for fname, sha in manifest.items()]
                )
            if name:
                self.db["names"].upsert(
                    {"name": name, "artifact": art_id, "kind": kind, "updated": now}, pk="name"
                )
        return self.get(art_id)

    def update_meta(self, art: Artifact, **changes: Any) -> Artifact:
        meta = dict(art.meta)
        meta.update(changes)
        with self.db.atomic():
            self.db["artifacts"].update(art.id, {"meta": canonical_json(meta)})
        return self.get(art.id)

    def set_name(self, name: str, art: Artifact) -> None:
        with self.db.atomic():
            self.db["names"].upsert(
                {"name": name, "artifact": art.id, "kind": art.kind, "updated": time.time()}, pk="name"
            )

    def _row_to_artifact(self, row: Mapping[str, Any]) -> Artifact:
        files = {r["name"]: r["blob"] for r in self.db["files"].rows_where("artifact = ?", [row["id"]])}
        names = [
            r["name"]
            for r in self.db["names"].rows_where("artifact = ?", [row["id"]], order_by="updated desc")
        ]
        return Artifact(
            id=row["id"],
            kind=row["kind"],
            name=names[0] if names else None,
            domain=row["domain"],
            created=row["created"],
            size=row["size"],
            meta=json.loads(row["meta"]),
            files=files,
        )

    def get(self, ref: str, kind: str | None = None) -> Artifact:
        """Find an artifact by name, full ID or unique ID prefix (>= 6 characters)."""
        art = self.find(ref, kind)
        if art is None:
            what = f"{kind} " if kind else ""
            raise ZooError(f"no {what}artifact named {ref!r} in the zoo at {self.root}")
        return art

    def find(self, ref: str, kind: str | None = None) -> Artifact | None:
        row = next(self.db["names"].rows_where("name = ?", [ref]), None)
        if row is not None:
            art = self._row_to_artifact(self.db["artifacts"].get(row["artifact"]))
            if kind is None or art.kind == kind:
                return art
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            rows = list(self.db["artifacts"].rows_where("id LIKE ?", [ref + "%"]))
            if kind:
                rows = [r for r in rows if r["kind"] == kind]
            if len(rows) == 1:
                return self._row_to_artifact(rows[0])
            if len(rows) > 1:
                raise ZooError(f"ID prefix {ref!r} is ambiguous ({len(rows)} artifacts)")
        return None

    def ls(self, kind: str | None = None, domain: str | None = None) -> list[Artifact]:
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if domain:
            where.append("domain = ?")
            args.append(domain)
        rows = self.db["artifacts"].rows_where(" AND ".join(where) or None, args, order_by="created desc, id")
        return [self._row_to_artifact(r) for r in rows]

    def names_of(self, art: Artifact) -> list[str]:
        """Every name that points at the artifact, most recently set first."""
        rows = self.db["names"].rows_where("artifact = ?", [art.id], order_by="updated desc, name")
        return [r["name"] for r in rows]

    def dependents(self, art: Artifact) -> list[Artifact]:
        """Artifacts whose meta["inputs"] lists this one's ID."""
        return [a for a in self.ls() if a.id != art.id and art.id in input_ids(a.meta)]

    def newest(self, kind: str, domain: str) -> Artifact | None:
        arts = self.ls(kind=kind, domain=domain)
        return arts[0] if arts else None

    def file(self, art: Artifact, fname: str) -> Path:
        try:
            return self.blob_path(art.files[fname])
        except KeyError:
            raise ZooError(f"artifact {art.name or art.short_id} has no file {fname!r}") from None

    def read_json(self, art: Artifact, fname: str) -> Any:
        return json.loads(self.file(art, fname).read_text("utf-8"))

    def view(self, art: Artifact) -> Path:
        """A folder whose entries link to the artifact's blobs (for `from_pretrained` and friends)."""
        target = self.root / "views" / art.id
        if target.is_dir():
            return target
        tmp = Path(tempfile.mkdtemp(dir=self.root / "tmp", prefix="view-"))
        for fname, sha in art.files.items():
            dest = tmp / fname
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(self.blob_path(sha), dest)
        try:
            os.replace(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    # ---- removal ---------------------------------------------------------------------------------
    def plan_rm(self, ref: str) -> RemovalPlan:
        art = self.get(ref)
        names = self.names_of(art)
        blobs = []
        for sha in sorted(set(art.files.values())):
            users = self.db.execute(
                "SELECT COUNT(DISTINCT artifact) FROM files WHERE blob = ? AND artifact != ?", [sha, art.id]
            ).fetchone()[0]
            if users == 0:
                row = self.db["blobs"].get(sha)
                blobs.append((sha, row["size"]))
        return RemovalPlan(artifact=art, names=names, blobs=blobs, dependents=self.dependents(art))

    def execute_rm(self, plan: RemovalPlan) -> list[str]:
        """Remove the planned artifact. Returns the blobs whose files were deleted.

        A blob is deleted only if no artifact uses it once this one is gone, checked again inside the
        transaction: an artifact put since the plan was made may have started sharing one.
        """
        art = plan.artifact
        freed: list[str] = []
        with self.db.atomic():
            self.db.execute("DELETE FROM names WHERE artifact = ?", [art.id])
            self.db.execute("DELETE FROM files WHERE artifact = ?", [art.id])
            self.db.execute("DELETE FROM artifacts WHERE id = ?", [art.id])
            for sha, _ in plan.blobs:
                if self.db.execute("SELECT 1 FROM files WHERE blob = ? LIMIT 1", [sha]).fetchone():
                    continue
                self.db.execute("DELETE FROM blobs WHERE sha256 = ?", [sha])
                freed.append(sha)
        # Files go after the index commit: a crash leaves orphans (reported by verify), never dangling rows.
        shutil.rmtree(self.root / "views" / art.id, ignore_errors=True)
        for sha in freed:
            self.blob_path(sha).unlink(missing_ok=True)
        return freed

    # ---- verification ----------------------------------------------------------------------------
    def iter_blob_files(self) -> Iterator[Path]:
        for sub in sorted((self.root / "blobs").iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())

    def blobs_total_size(self) -> int:
        """Bytes that `verify` will read (the indexed size of every blob)."""
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def verify(self, progress: Callable[[int], Any] | None = None) -> VerifyReport:
        """Re-hash every indexed blob. `progress(n_bytes)` is called as bytes are read (and with a
        missing blob's indexed size), so the calls add up to about `blobs_total_size()`."""
        rows = list(self.db["blobs"].rows_where(order_by="sha256"))
        known = {r["sha256"] for r in rows}
        mismatched, missing = [], []
        for row in rows:
            path = self.blob_path(row["sha256"])
            if not path.is_file():
                missing.append(row["sha256"])
                if progress is not None:
                    progress(row["size"])
            elif sha256_file(path, on_chunk=progress) != row["sha256"]:
                mismatched.append(row["sha256"])
        orphans = [p.name for p in self.iter_blob_files() if p.name not in known]
        return VerifyReport(checked=len(rows), mismatched=mismatched, missing=missing, orphans=orphans)

    def artifacts_using_blob(self, sha: str) -> list[str]:
        """IDs of the artifacts that list this blob, each once."""
        rows = self.db.execute("SELECT DISTINCT artifact FROM files WHERE blob = ? ORDER BY artifact", [sha])
        return [artifact for (artifact,) in rows.fetchall()]
