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
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

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
from st2si_cli.zoo.integrity import check_blob, stat_key
from st2si_cli.zoo.locks import FileLock, tmp_prefix
from st2si_cli.zoo.schema import connect, migrations, write_txn
from st2si_cli.zoo.views import build_view

KINDS = ("dataset", "catalog", "backbone", "head", "features", "run")
ENV_HOME = "ST2SI_HOME"
__all__ = [
    "KINDS",
    "Artifact",
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


class Zoo:
    """The local store. Cheap to open: creates the folders and applies pending migrations."""

    def __init__(self, root: str | Path | None = None):
        self.root = resolve_root(root)
        if self.root.exists() and not self.root.is_dir():
            raise ZooError(f"{self.root}: the zoo must be a folder, and this is a file")
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("blobs", "views", "tmp"):
            (self.root / sub).mkdir(exist_ok=True)
        self.db = connect(self.root)
        self._written: set[str] = set()  # blobs this process wrote (and so hashed) since the last put

    def close(self) -> None:
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
        return FileLock(self.root / "tmp" / f"{key}.lock")

    # ---- blobs -----------------------------------------------------------------------------------
    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / sha

    def _place(self, tmp: str | Path, sha: str) -> None:
        final = self.blob_path(sha)
        final.parent.mkdir(exist_ok=True)
        if final.exists():
            os.unlink(tmp)
        else:
            os.replace(tmp, final)
            self._written.add(sha)

    def _store_blob(self, source: Path | bytes, move: bool = False) -> tuple[str, int]:
        """Copy (or move) a file or bytes into blobs/, atomically. Returns (sha256, size)."""
        tmp_dir = self.root / "tmp"
        if isinstance(source, (bytes, bytearray)):
            sha = hashlib.sha256(source).hexdigest()
            if not self.blob_path(sha).exists():
                fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=tmp_prefix("blob"))
                with os.fdopen(fd, "wb") as f:
                    f.write(source)
                    f.flush()
                    os.fsync(f.fileno())
                self._place(tmp, sha)
            return sha, len(source)
        source = Path(source)
        size = source.stat().st_size
        if move and source.resolve().is_relative_to(tmp_dir.resolve()):
            sha = sha256_file(source)
            self._place(source, sha)
            return sha, size
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=tmp_prefix("blob"))
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        sha = h.hexdigest()
        self._place(tmp, sha)
        return sha, size

    def staging_dir(self, key: str) -> Path:
        """A folder under tmp/ for work in progress that a later run may resume (hold `claim(key)`)."""
        path = self.root / "tmp" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def private_dir(self, kind: str) -> Path:
        """A new folder under tmp/ that only this process uses (`KIND-PID-random`)."""
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
        if name and not replace_name and all(isinstance(v, (bytes, bytearray)) for v in files.values()):
            manifest = {f: hashlib.sha256(v).hexdigest() for f, v in sorted(files.items())}  # type: ignore[arg-type]
            self._name(name, kind, self.artifact_id(kind, manifest, identity), replace=False, check_only=True)
        with self.gc_lock(shared=True):
            self._written = set()
            stored = {fname: self._store_blob(src, move=move) for fname, src in files.items()}
            manifest = {fname: sha for fname, (sha, _) in sorted(stored.items())}
            art_id = self.artifact_id(kind, manifest, identity)
            blob_rows = []
            for sha, size in set(stored.values()):
                row = {"sha256": sha, "size": size, "mtime_ns": None, "inode": None}
                if sha in self._written:  # hashed as written: its stat is known good
                    _, row["mtime_ns"], row["inode"] = stat_key(self.blob_path(sha).stat())
                blob_rows.append(row)
            with write_txn(self.db):
                self._register(kind, art_id, manifest, meta, domain, blob_rows)
                if name:
                    self._name(name, kind, art_id, replace_name)
        return self.get(art_id)

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
    ) -> None:
        if not replace:
            sql = "SELECT artifact FROM names WHERE kind = ? AND name = ?"
            row = self.db.execute(sql, [kind, name]).fetchone()
            if row is not None and row[0] != art_id:
                raise NameTakenError(f"{kind} {name!r} already holds another artifact ({row[0][:12]})")
        if check_only:
            return
        self.db["names"].upsert(
            {"name": name, "artifact": art_id, "kind": kind, "updated": time.time()}, pk=("kind", "name")
        )

    def update_meta(self, art: Artifact, **changes: Any) -> Artifact:
        with write_txn(self.db):
            row = self.db.execute("SELECT meta FROM artifacts WHERE id = ?", [art.id]).fetchone()
            if row is None:
                raise ZooError(f"{art.kind} {art.name or art.short_id} was removed from the zoo")
            meta = {**json.loads(row[0]), **changes}
            self.db["artifacts"].update(art.id, {"meta": canonical_json(meta)})
        return self.get(art.id)

    def set_name(self, name: str, art: Artifact) -> None:
        with write_txn(self.db):
            self._name(name, art.kind, art.id)

    def _row_to_artifact(self, row: Mapping[str, Any]) -> Artifact:
        files = {r["name"]: r["blob"] for r in self.db["files"].rows_where("artifact = ?", [row["id"]])}
        names = self.names_of(row["id"])
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

    def _by_id(self, art_id: str) -> Artifact | None:
        row = next(self.db["artifacts"].rows_where("id = ?", [art_id]), None)
        return self._row_to_artifact(row) if row is not None else None

    def get(self, ref: str, kind: str | None = None) -> Artifact:
        """Find an artifact by name, full ID or unique ID prefix (>= 6 characters)."""
        art = self.find(ref, kind)
        if art is None:
            what = f"{kind} " if kind else ""
            others = sorted({k for (k,) in self.db.execute("SELECT kind FROM names WHERE name = ?", [ref])})
            hint = f" (there is a {' and a '.join(others)} with that name)" if kind and others else ""
            raise ZooError(f"no {what}artifact named {ref!r} in the zoo at {self.root}{hint}")
        return art

    def find(self, ref: str, kind: str | None = None) -> Artifact | None:
        """Names are per kind: without `kind`, a name that several kinds use is ambiguous."""
        sql, args = "SELECT kind, artifact FROM names WHERE name = ?", [ref]
        if kind:
            sql, args = sql + " AND kind = ?", [ref, kind]
        rows = self.db.execute(sql + " ORDER BY kind", args).fetchall()
        if len(rows) > 1:
            kinds = " and a ".join(k for k, _ in rows)
            raise ZooError(f"{ref!r} names a {kinds}: say which with --kind")
        if rows:
            art = self._by_id(rows[0][1])
            if art is not None:
                return art
        if len(ref) >= 6 and all(c in "0123456789abcdef" for c in ref):
            id_rows = list(self.db["artifacts"].rows_where("id LIKE ?", [ref + "%"]))
            if kind:
                id_rows = [r for r in id_rows if r["kind"] == kind]
            if len(id_rows) == 1:
                return self._row_to_artifact(id_rows[0])
            if len(id_rows) > 1:
                raise ZooError(f"ID prefix {ref!r} is ambiguous ({len(id_rows)} artifacts)")
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

    def names_of(self, art: Artifact | str) -> list[str]:
        """Every name that points at the artifact, most recently set first."""
        art_id = art if isinstance(art, str) else art.id
        rows = self.db["names"].rows_where("artifact = ?", [art_id], order_by="updated desc, name")
        return [r["name"] for r in rows]

    def dependents(self, art: Artifact) -> list[Artifact]:
        """Artifacts whose meta["inputs"] lists this one's ID."""
        return [a for a in self.ls() if a.id != art.id and art.id in input_ids(a.meta)]

    def newest(self, kind: str, domain: str) -> Artifact | None:
        arts = self.ls(kind=kind, domain=domain)
        return arts[0] if arts else None

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
        return json.loads(self.file(art, fname).read_text("utf-8"))

    def view(self, art: Artifact) -> Path:
        """A folder whose entries link (relatively) to the artifact's checked blobs (for `from_pretrained`)."""
        for fname, sha in art.files.items():
            self._checked(art, fname, sha)
        return build_view(self.root, art.id, art.files)

    # ---- removal, verification, pruning: st2si_cli.zoo.maintenance (functions taking the zoo) ----
    def iter_blob_files(self) -> Iterator[Path]:
        for sub in sorted((self.root / "blobs").iterdir()):
            if sub.is_dir():
                yield from sorted(sub.iterdir())

    def blobs_total_size(self) -> int:
        """Bytes that `verify` will read (the indexed size of every blob)."""
        return self.db.execute("SELECT COALESCE(SUM(size), 0) FROM blobs").fetchone()[0]

    def artifacts_using_blob(self, sha: str) -> list[str]:
        """IDs of the artifacts that list this blob, each once."""
        rows = self.db.execute("SELECT DISTINCT artifact FROM files WHERE blob = ? ORDER BY artifact", [sha])
        return [artifact for (artifact,) in rows.fetchall()]
