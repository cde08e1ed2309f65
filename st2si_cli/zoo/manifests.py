"""`manifests/<id[:2]>/<id>.json`: every artifact's index rows, also kept as a file of its own.

The index (`index.db`) is the truth the commands read; the manifests are what it can be rebuilt from
when it is lost, emptied or damaged (`st2si zoo verify --repair`), and a second witness for `zoo prune`:
a blob that some manifest lists is never deleted, even when the index does not know it.

A manifest holds the artifact's kind, domain, creation time, meta, files ({name: blob sha256}) and the
names pointing at it with the time each was set. It is written (temp file + rename) after the index
transaction that registered or changed the artifact commits, and removed after the one that dropped it:
a crash in between leaves an artifact without a manifest (verify reports it, --repair writes it), or a
manifest without an artifact (its blobs are kept; --repair registers the artifact again).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from st2si_cli.zoo.artifact import is_sha256
from st2si_cli.zoo.locks import tmp_prefix

FOLDER = "manifests"


def manifest_path(root: Path, art_id: str) -> Path:
    return root / FOLDER / art_id[:2] / f"{art_id}.json"


def record_of(db: sqlite_utils.Database, art_id: str) -> dict[str, Any] | None:
    """The artifact's rows as one JSON-ready record, None if the index does not hold it."""
    row = db.execute(
        "SELECT kind, domain, created, size, meta FROM artifacts WHERE id = ?", [art_id]
    ).fetchone()
    if row is None:
        return None
    kind, domain, created, size, meta = row
    files = dict(db.execute("SELECT name, blob FROM files WHERE artifact = ? ORDER BY name", [art_id]))
    names = [
        {"kind": k, "name": n, "updated": u}
        for k, n, u in db.execute(
            "SELECT kind, name, updated FROM names WHERE artifact = ? ORDER BY name", [art_id]
        )
    ]
    return {
        "format": 1,
        "id": art_id,
        "kind": kind,
        "domain": domain,
        "created": created,
        "size": size,
        "meta": json.loads(meta),
        "files": files,
        "names": names,
    }


def _write_json(path: Path, record: dict[str, Any], tmp_dir: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=tmp_prefix("manifest"))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sync(root: Path, db: sqlite_utils.Database, ids: Iterable[str]) -> None:
    """Make each artifact's manifest match the index: written where it holds the artifact, removed where not."""
    for art_id in dict.fromkeys(ids):
        record = record_of(db, art_id)
        path = manifest_path(root, art_id)
        if record is None:
            path.unlink(missing_ok=True)
        else:
            _write_json(path, record, root / "tmp")


def backfill(root: Path, db: sqlite_utils.Database) -> None:
    """Write the manifests of a zoo made before they existed (once: the folder appears whole, by rename)."""
    if (root / FOLDER).exists():
        return
    staging = Path(tempfile.mkdtemp(dir=root / "tmp", prefix=tmp_prefix("manifests")))
    try:
        for (art_id,) in db.execute("SELECT id FROM artifacts").fetchall():
            record = record_of(db, art_id)
            if record is not None:
                _write_json(staging / art_id[:2] / f"{art_id}.json", record, root / "tmp")
        try:
            os.rename(staging, root / FOLDER)
        except OSError:  # another process made it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@dataclass
class Manifest:
    path: Path
    record: dict[str, Any] | None  # None: unreadable or not a manifest

    @property
    def id(self) -> str:
        return self.path.stem

    @property
    def blobs(self) -> set[str]:
        files = (self.record or {}).get("files") or {}
        return {sha for sha in files.values() if isinstance(sha, str)}


def read_all(root: Path) -> Iterator[Manifest]:
    """Every manifest file (links are not followed)."""
    folder = root / FOLDER
    if not folder.is_dir() or folder.is_symlink():
        return
    for sub in sorted(folder.iterdir()):
        if not sub.is_dir() or sub.is_symlink():
            continue
        for path in sorted(sub.glob("*.json")):
            if path.is_symlink():
                continue
            try:
                record = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError):
                record = None
            ok = (
                isinstance(record, dict)
                and record.get("id") == path.stem
                and isinstance(record.get("files"), dict)
            )
            yield Manifest(path, record if ok else None)


def listed_blobs(root: Path) -> set[str]:
    """Every blob some manifest lists."""
    out: set[str] = set()
    for m in read_all(root):
        out |= m.blobs
    return out


@dataclass
class Rebuild:
    """What `rebuild_index` did."""

    registered: list[str] = field(default_factory=list)  # artifact IDs put back into the index
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (manifest path, why)
    moved_aside: str | None = None  # where the damaged index went


def register(db: sqlite_utils.Database, root: Path, manifests: Iterable[Manifest], rebuild: Rebuild) -> None:
    """Insert the artifacts of these manifests into the index (inside the caller's transaction). An
    artifact whose blob files are not all present is skipped, and so is an unreadable manifest; a name
    several manifests claim goes to the one that set it last."""
    claims: dict[tuple[str, str], tuple[float, str]] = {}
    for m in manifests:
        rec = m.record
        if rec is None:
            rebuild.skipped.append((str(m.path), "not a readable manifest"))
            continue
        files = rec["files"]
        if not all(is_sha256(sha) for sha in files.values()):
            rebuild.skipped.append((str(m.path), "lists a malformed blob name"))
            continue
        paths = {sha: root / "blobs" / sha[:2] / sha for sha in files.values()}
        absent = [sha for sha, p in paths.items() if not p.is_file() or p.is_symlink()]
        if absent:
            rebuild.skipped.append((str(m.path), f"{len(absent)} of its blobs are missing"))
            continue
        if db.execute("SELECT 1 FROM artifacts WHERE id = ?", [m.id]).fetchone():
            continue
        db["blobs"].insert_all(
            [
                {"sha256": sha, "size": p.stat().st_size, "mtime_ns": None, "inode": None}
                for sha, p in paths.items()
            ],
            pk="sha256",
            ignore=True,
        )
        db["artifacts"].insert(
            {
                "id": m.id,
                "kind": rec.get("kind"),
                "domain": rec.get("domain"),
                "created": rec.get("created") or time.time(),
                "size": rec.get("size") or sum(p.stat().st_size for p in paths.values()),
                "meta": json.dumps(
                    rec.get("meta") or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
                ),
            }
        )
        db["files"].insert_all([{"artifact": m.id, "name": n, "blob": sha} for n, sha in files.items()])
        for claim in rec.get("names") or []:
            if not isinstance(claim, dict):
                continue
            key = (str(claim.get("kind") or rec.get("kind")), str(claim.get("name")))
            updated = float(claim.get("updated") or 0.0)
            if key not in claims or claims[key][0] < updated:
                claims[key] = (updated, m.id)
        rebuild.registered.append(m.id)
    for (kind, name), (updated, art_id) in claims.items():
        held = db.execute("SELECT updated FROM names WHERE kind = ? AND name = ?", [kind, name]).fetchone()
        if held is None or held[0] < updated:
            db["names"].upsert(
                {"name": name, "artifact": art_id, "kind": kind, "updated": updated}, pk=("kind", "name")
            )
