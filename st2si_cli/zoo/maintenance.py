"""Removing, verifying, repairing and pruning a zoo (the `Zoo` methods of the same names call these).

Deletion of blob files always happens under the zoo's exclusive gc lock, after the index commit:
a crash leaves orphan files (which `prune` removes), never index rows without files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from st2si_cli.errors import ZooError
from st2si_cli.zoo import manifests
from st2si_cli.zoo.artifact import Artifact, RemovalPlan, VerifyReport, input_ids, is_sha256, sha256_file
from st2si_cli.zoo.integrity import record_stats
from st2si_cli.zoo.locks import FileLock, is_locked, owner_pid, pid_alive
from st2si_cli.zoo.schema import connect, write_txn
from st2si_cli.zoo.views import broken_views

if TYPE_CHECKING:
    from st2si_cli.zoo.store import Zoo

# A tmp/ entry with no owner recorded in its name counts as stale once nothing in it changed for this long.
UNOWNED_STALE_S = 3600.0


def _label(art: Artifact) -> str:
    return f"{art.kind} {art.name or art.short_id} ({art.short_id})"


def _inside(zoo: Zoo, path: Path, folder: str) -> bool:
    """Whether `path`'s folder is really `root/folder/<xx>` (or `root/folder`): no link on the way
    leads out of the zoo, so deleting `path` deletes nothing elsewhere."""
    real_parent = Path(os.path.realpath(path.parent))
    base = Path(os.path.realpath(zoo.root)) / folder
    return real_parent == base or real_parent.parent == base


def _unlink_blob(zoo: Zoo, sha: str) -> None:
    path = zoo.blob_path(sha)
    if path.is_symlink() or not _inside(zoo, path, "blobs"):
        return  # never through a link: `zoo verify` reports it
    path.unlink(missing_ok=True)


def _remove_view(zoo: Zoo, art_id: str) -> None:
    folder = zoo.root / "views" / art_id
    if folder.is_symlink():
        folder.unlink()
    elif (zoo.root / "views").is_dir() and not (zoo.root / "views").is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


# ---- rm -------------------------------------------------------------------------------------------
def plan_rm(zoo: Zoo, ref: str, kind: str | None = None) -> RemovalPlan:
    art = zoo.get(ref, kind)
    blobs = []
    for sha in sorted(set(art.files.values())):
        users = zoo.db.execute(
            "SELECT COUNT(DISTINCT artifact) FROM files WHERE blob = ? AND artifact != ?", [sha, art.id]
        ).fetchone()[0]
        if users == 0:
            row = zoo.db.execute("SELECT size FROM blobs WHERE sha256 = ?", [sha]).fetchone()
            blobs.append((sha, row[0] if row else 0))
    return RemovalPlan(artifact=art, names=zoo.names_of(art), blobs=blobs, dependents=zoo.dependents(art))


def _drop_rows(zoo: Zoo, art_id: str, candidates: list[str]) -> list[str]:
    """Delete the artifact's rows and those of `candidates` blobs nothing else uses (inside a txn)."""
    zoo.db.execute("DELETE FROM names WHERE artifact = ?", [art_id])
    zoo.db.execute("DELETE FROM files WHERE artifact = ?", [art_id])
    zoo.db.execute("DELETE FROM artifacts WHERE id = ?", [art_id])
    freed = []
    for sha in candidates:
        if zoo.db.execute("SELECT 1 FROM files WHERE blob = ? LIMIT 1", [sha]).fetchone():
            continue
        zoo.db.execute("DELETE FROM blobs WHERE sha256 = ?", [sha])
        freed.append(sha)
    return freed


def execute_rm(zoo: Zoo, plan: RemovalPlan, *, force: bool = False) -> list[str]:
    """Remove the planned artifact. Refused while another artifact lists it as an input, unless `force`.

    A blob is deleted only if no artifact uses it once this one is gone, checked again inside the
    transaction: an artifact put since the plan was made may have started sharing one.
    """
    art = plan.artifact
    zoo.require_writable(f"remove {_label(art)}")
    in_use = FileLock(zoo.hold_lock(art.id).path)  # exclusive: refused while a process holds it shared
    if not in_use.acquire(blocking=False):
        raise ZooError(
            f"{_label(art)} is in use as an input by a running command (adapt, pretrain, ...): "
            "try again when it has ended"
        )
    try:
        with zoo.gc_lock(shared=False):
            with write_txn(zoo.db):
                if not force:
                    users = [d for d in zoo.dependents(art)]
                    if users:
                        names = ", ".join(_label(d) for d in users[:5]) + (" ..." if len(users) > 5 else "")
                        raise ZooError(
                            f"{_label(art)} is an input of {len(users)} other artifact(s): {names}; "
                            "remove those first or pass --force"
                        )
                freed = _drop_rows(zoo, art.id, [sha for sha, _ in plan.blobs])
            manifests.sync(zoo.root, zoo.db, [art.id])
            _remove_view(zoo, art.id)
            for sha in freed:
                _unlink_blob(zoo, sha)
    finally:
        in_use.release()
    return freed


# ---- verify and repair -----------------------------------------------------------------------------
def verify(zoo: Zoo, progress: Callable[[int], Any] | None = None) -> VerifyReport:
    rows = zoo.db.execute("SELECT sha256, size FROM blobs ORDER BY sha256").fetchall()
    known = {sha for sha, _ in rows}
    mismatched, missing, good = [], [], []
    for sha, size in rows:
        path = zoo.blob_path(sha)
        if not path.is_file():
            missing.append(sha)
            if progress is not None:
                progress(size)
        elif sha256_file(path, on_chunk=progress) != sha:
            mismatched.append(sha)
        else:
            good.append((sha, path))
    if not zoo.read_only:
        record_stats(zoo.db, good)  # the fast path of the check on load trusts these stats from now on
    orphans = [p.name for p in zoo.iter_blob_files() if p.name not in known]
    files: dict[str, dict[str, str]] = {}
    for art_id, fname, sha in zoo.db.execute("SELECT artifact, name, blob FROM files"):
        files.setdefault(art_id, {})[fname] = sha
    indexed = {art_id for (art_id,) in zoo.db.execute("SELECT id FROM artifacts")}
    found = list(manifests.read_all(zoo.root))
    on_disk = {m.id for m in found if m.record is not None}
    views = zoo.root / "views"
    return VerifyReport(
        checked=len(rows),
        mismatched=mismatched,
        missing=missing,
        orphans=orphans,
        broken_views=broken_views(zoo.root, files) if views.is_dir() and not views.is_symlink() else [],
        links=[str(p) for p in zoo.links()],
        dangling=dangling_inputs(zoo),
        unindexed=sorted(m.id for m in found if m.record is not None and m.id not in indexed),
        bad_manifests=sorted(str(m.path) for m in found if m.record is None),
        unmanifested=sorted(indexed - on_disk) if zoo.exists else [],
    )


def dangling_inputs(zoo: Zoo) -> list[tuple[str, str]]:
    """(artifact ID, input ID) for every input an artifact lists that the zoo no longer holds."""
    indexed = {art_id for (art_id,) in zoo.db.execute("SELECT id FROM artifacts")}
    out = []
    for art_id, meta in zoo.db.execute("SELECT id, meta FROM artifacts ORDER BY id"):
        try:
            refs = input_ids(json.loads(meta))
        except ValueError:
            continue
        for ref in sorted(refs):
            if is_sha256(ref) and ref not in indexed:
                out.append((art_id, ref))
    return out


def rebuild_hint(art: Artifact) -> str:
    """How to make a damaged artifact again."""
    if art.kind == "dataset":
        return f"st2si prepare SOURCE --domain {art.name or art.domain}"
    if art.kind == "backbone":
        src = art.meta.get("source") or {}
        return f"st2si zoo pull {src.get('repo') or src.get('path') or art.name or 'REF'}"
    if art.kind == "features":
        return "nothing: the next adapt or eval computes the features again"
    if art.kind == "head":
        return f"st2si adapt --domain {art.domain} --backbone {art.meta.get('backbone_name') or 'BACKBONE'}"
    return "run the command that made it again"


def repair(zoo: Zoo, report: VerifyReport) -> list[tuple[Artifact, str]]:
    """Drop every artifact with a corrupted or missing blob (and the bad blob files), and broken views.
    Returns (artifact, how to rebuild it) for each dropped artifact."""
    zoo.require_writable("repair it")
    bad = set(report.mismatched) | set(report.missing)
    with zoo.gc_lock(shared=False):
        if report.unindexed:  # artifacts the index lost: registered again from their manifests
            wanted = set(report.unindexed)
            rebuilt = manifests.Rebuild()
            with write_txn(zoo.db):
                manifests.register(
                    zoo.db, zoo.root, [m for m in manifests.read_all(zoo.root) if m.id in wanted], rebuilt
                )
            manifests.sync(zoo.root, zoo.db, rebuilt.registered)
        ids = {a for sha in bad for a in zoo.artifacts_using_blob(sha)} | {a for a, _ in dangling_inputs(zoo)}
        dropped = []
        for art_id in sorted(ids):
            art = zoo._by_id(art_id)
            if art is None:
                continue
            with write_txn(zoo.db):
                freed = _drop_rows(zoo, art.id, sorted(set(art.files.values())))
            manifests.sync(zoo.root, zoo.db, [art.id])
            for sha in freed:
                _unlink_blob(zoo, sha)
            dropped.append((art, rebuild_hint(art)))
        for sha in bad:  # a corrupted blob shared by nothing left: its file goes too
            if not zoo.artifacts_using_blob(sha):
                _unlink_blob(zoo, sha)
        manifests.sync(zoo.root, zoo.db, report.unmanifested)
    for name in report.broken_views:  # views are rebuilt on use
        _remove_view(zoo, name)
    return dropped


def rebuild_index(root: Path) -> manifests.Rebuild:
    """A new index from the manifests, for a zoo whose index is missing, empty or damaged. The old
    index file is moved aside (`index.db.damaged-<time>`), never deleted; blobs are hashed again on
    first use (their stats are unknown)."""
    rebuilt = manifests.Rebuild()
    with FileLock(root / "gc.lock"):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = root / f"index.db{suffix}"
            if old.exists():
                aside = root / f"index.db.damaged-{stamp}{suffix}"
                os.replace(old, aside)
                if not suffix:
                    rebuilt.moved_aside = str(aside)
        db = connect(root, rebuild=True)
        try:
            with write_txn(db):
                manifests.register(db, root, manifests.read_all(root), rebuilt)
            manifests.sync(root, db, rebuilt.registered)
        finally:
            db.close()
    return rebuilt


# ---- prune -----------------------------------------------------------------------------------------
@dataclass
class PruneItem:
    path: Path
    size: int
    reason: str


@dataclass
class PrunePlan:
    remove: list[PruneItem] = field(default_factory=list)
    kept: list[PruneItem] = field(default_factory=list)  # tmp/ entries a live process owns

    @property
    def bytes_freed(self) -> int:
        return sum(i.size for i in self.remove)


def _tree(path: Path) -> tuple[int, float]:
    """(bytes, newest mtime) of a file or folder (links are not followed)."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    for dirpath, _, names in os.walk(path):
        for n in names:
            try:
                s = os.lstat(os.path.join(dirpath, n))
            except FileNotFoundError:
                continue
            size += s.st_size
            newest = max(newest, s.st_mtime)
    return size, newest


def _tmp_status(
    tmp: Path, entry: Path, now: float, going: set[str] | frozenset[str] = frozenset()
) -> str | None:
    """Why a tmp/ entry is stale, or None while some live process may still use it. `going`: entries
    this prune removes, so the lock of unfinished work goes in the same pass as the work."""
    pid = owner_pid(entry.name)
    if pid is not None:
        return None if pid_alive(pid) else f"left by process {pid}, which has ended"
    if entry.suffix == ".lock":
        if is_locked(entry) or ((tmp / entry.stem).exists() and entry.stem not in going):
            return None
        return "unused lock file"
    lock = tmp / f"{entry.name}.lock"
    if lock.exists():
        return None if is_locked(lock) else "unfinished work of a run that has ended (its lock is free)"
    _, newest = _tree(entry)
    if now - newest < UNOWNED_STALE_S:
        return None
    return f"no owner recorded and unchanged for {int((now - newest) // 3600)}h or more"


def _referenced(zoo: Zoo) -> set[str]:
    """Blobs that the index or any manifest lists: prune never deletes one of these."""
    known = {sha for (sha,) in zoo.db.execute("SELECT sha256 FROM blobs")}
    return known | manifests.listed_blobs(zoo.root)


def plan_prune(zoo: Zoo) -> PrunePlan:
    plan = PrunePlan()
    if not zoo.exists:
        return plan
    known = {sha for (sha,) in zoo.db.execute("SELECT sha256 FROM blobs")}
    listed = manifests.listed_blobs(zoo.root)
    for path in zoo.iter_blob_files():
        if path.name in listed and path.name not in known:
            plan.kept.append(
                PruneItem(
                    path,
                    path.lstat().st_size,
                    "a manifest lists it but the index does not: run `st2si zoo verify --repair`",
                )
            )
        elif path.name not in known:
            plan.remove.append(PruneItem(path, path.lstat().st_size, "orphan blob (no artifact uses it)"))
    for link in zoo.links():
        plan.kept.append(PruneItem(link, 0, "a link: never followed nor removed (see `st2si zoo verify`)"))
    now = time.time()
    tmp = zoo.root / "tmp"
    if not tmp.is_dir() or tmp.is_symlink():
        return plan
    going: set[str] = set()
    for entry in sorted(tmp.iterdir(), key=lambda e: (e.suffix == ".lock", e.name)):  # work before its lock
        if entry.is_symlink():
            continue
        why = _tmp_status(tmp, entry, now, going)
        size, _ = _tree(entry)
        (plan.kept if why is None else plan.remove).append(PruneItem(entry, size, why or "in use"))
        if why is not None:
            going.add(entry.name)
    return plan


def execute_prune(zoo: Zoo, plan: PrunePlan) -> int:
    """Remove what the plan lists, checking each item again under the gc lock. Returns bytes freed."""
    zoo.require_writable("prune it")
    freed = 0
    now = time.time()
    tmp = zoo.root / "tmp"
    with zoo.gc_lock(shared=False):
        known = _referenced(zoo)
        for item in plan.remove:
            if item.path.is_symlink() or not item.path.exists():
                continue  # links are never removed nor followed
            if item.path.parent.parent == zoo.root / "blobs":
                if item.path.name in known or not _inside(zoo, item.path, "blobs"):
                    continue
            elif not _inside(zoo, item.path, "tmp") or _tmp_status(tmp, item.path, now) is None:
                continue
            size, _ = _tree(item.path)
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
            freed += size
    return freed
