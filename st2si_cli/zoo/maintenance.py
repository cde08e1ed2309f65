"""Removing, verifying, repairing and pruning a zoo (the `Zoo` methods of the same names call these).

Deletion of blob files always happens under the zoo's exclusive gc lock, after the index commit:
a crash leaves orphan files (which `prune` removes), never index rows without files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from st2si_cli.errors import ZooError
from st2si_cli.zoo.artifact import Artifact, RemovalPlan, VerifyReport, sha256_file
from st2si_cli.zoo.integrity import record_stats
from st2si_cli.zoo.locks import is_locked, owner_pid, pid_alive
from st2si_cli.zoo.schema import write_txn
from st2si_cli.zoo.views import broken_views

if TYPE_CHECKING:
    from st2si_cli.zoo.store import Zoo

# A tmp/ entry with no owner recorded in its name counts as stale once nothing in it changed for this long.
UNOWNED_STALE_S = 3600.0


def _label(art: Artifact) -> str:
    return f"{art.kind} {art.name or art.short_id} ({art.short_id})"


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
        shutil.rmtree(zoo.root / "views" / art.id, ignore_errors=True)
        for sha in freed:
            zoo.blob_path(sha).unlink(missing_ok=True)
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
    record_stats(zoo.db, good)  # the fast path of the check on load trusts these stats from now on
    orphans = [p.name for p in zoo.iter_blob_files() if p.name not in known]
    files: dict[str, dict[str, str]] = {}
    for art_id, fname, sha in zoo.db.execute("SELECT artifact, name, blob FROM files"):
        files.setdefault(art_id, {})[fname] = sha
    return VerifyReport(
        checked=len(rows),
        mismatched=mismatched,
        missing=missing,
        orphans=orphans,
        broken_views=broken_views(zoo.root, files),
    )


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
    bad = set(report.mismatched) | set(report.missing)
    ids = sorted({a for sha in bad for a in zoo.artifacts_using_blob(sha)})
    dropped = []
    with zoo.gc_lock(shared=False):
        for art_id in ids:
            art = zoo._by_id(art_id)
            if art is None:
                continue
            with write_txn(zoo.db):
                freed = _drop_rows(zoo, art.id, sorted(set(art.files.values())))
            for sha in freed:
                zoo.blob_path(sha).unlink(missing_ok=True)
            dropped.append((art, rebuild_hint(art)))
        for sha in bad:  # a corrupted blob shared by nothing left: its file goes too
            if not zoo.artifacts_using_blob(sha):
                zoo.blob_path(sha).unlink(missing_ok=True)
    for name in report.broken_views:  # views are rebuilt on use
        shutil.rmtree(zoo.root / "views" / name, ignore_errors=True)
    return dropped


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


def _tmp_status(tmp: Path, entry: Path, now: float) -> str | None:
    """Why a tmp/ entry is stale, or None while some live process may still use it."""
    pid = owner_pid(entry.name)
    if pid is not None:
        return None if pid_alive(pid) else f"left by process {pid}, which has ended"
    if entry.suffix == ".lock":
        if is_locked(entry) or (tmp / entry.stem).exists():
            return None
        return "unused lock file"
    lock = tmp / f"{entry.name}.lock"
    if lock.exists():
        return None if is_locked(lock) else "unfinished work of a run that has ended (its lock is free)"
    _, newest = _tree(entry)
    if now - newest < UNOWNED_STALE_S:
        return None
    return f"no owner recorded and unchanged for {int((now - newest) // 3600)}h or more"


def plan_prune(zoo: Zoo) -> PrunePlan:
    plan = PrunePlan()
    known = {sha for (sha,) in zoo.db.execute("SELECT sha256 FROM blobs")}
    for path in zoo.iter_blob_files():
        if path.name not in known:
            plan.remove.append(PruneItem(path, path.lstat().st_size, "orphan blob (no artifact uses it)"))
    now = time.time()
    tmp = zoo.root / "tmp"
    for entry in sorted(tmp.iterdir()):
        why = _tmp_status(tmp, entry, now)
        size, _ = _tree(entry)
        (plan.kept if why is None else plan.remove).append(PruneItem(entry, size, why or "in use"))
    return plan


def execute_prune(zoo: Zoo, plan: PrunePlan) -> int:
    """Remove what the plan lists, checking each item again under the gc lock. Returns bytes freed."""
    freed = 0
    now = time.time()
    tmp = zoo.root / "tmp"
    with zoo.gc_lock(shared=False):
        known = {sha for (sha,) in zoo.db.execute("SELECT sha256 FROM blobs")}
        for item in plan.remove:
            if not item.path.exists() and not item.path.is_symlink():
                continue
            if item.path.parent.parent == zoo.root / "blobs":
                if item.path.name in known:
                    continue
            elif _tmp_status(tmp, item.path, now) is None:
                continue
            size, _ = _tree(item.path)
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
            freed += size
    return freed
