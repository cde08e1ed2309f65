"""The lock guarding a JIT op build: say who holds it, wait a bounded time, and name a lock left behind.

torch builds a JIT extension (DeepSpeed's ops are built this way) in `<extensions root>/<op>/` and
guards the build with the file `lock` there (`torch.utils.file_baton.FileBaton`): created with
O_CREAT|O_EXCL, held open by the building process while it builds, removed when the build ends. A
build that is killed leaves the file behind, and every later process then polls for it to vanish,
with no timeout and no output: `st2si pretrain --deepspeed` on CPU, where DeepSpeed builds its
shared-memory comm op when the process group starts, hangs silently.

So before DeepSpeed starts its process group, `check_deepspeed_op_locks` looks at the lock of each op
DeepSpeed is about to build:

    no lock                                 ->  go on (a note on stderr when the op was never built)
    lock held open by a live process        ->  one line on stderr at once, then wait for it to go,
                                                at most ST2SI_OP_BUILD_WAIT_S seconds (default 300)
    lock no process holds, build folder     ->  St2siError at once: the lock was left by a build that
      quiet                                     ended; remove it (rm PATH) and run again
    holders unknowable (no /proc, other     ->  one line on stderr, wait at most the bound, then
      users' processes hidden)                  St2siError naming the lock and how to clear it

"Held" is read from /proc/<pid>/fd on Linux: the builder keeps the lock file open for the whole
build, so a lock that no process has open, and that stays so on a second look, belongs to a build
that ended. A build running in another PID namespace (another container sharing the cache folder)
cannot be seen this way; files it writes in the build folder keep the verdict at "wait" while they
change, and the bound ends the wait otherwise.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from st2si_cli.errors import St2siError

WAIT_ENV = "ST2SI_OP_BUILD_WAIT_S"
DEFAULT_WAIT_S = 300.0
QUIET_S = 10.0  # a build folder unchanged this long, with no holder of the lock: nothing is building
POLL_S = 0.5
RECHECK_S = 0.2  # a second look before calling a lock stale (the builder closes it just before removing it)
SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU shared-memory comm op, built by init_distributed

Notify = Callable[[str], None]


def stderr_line(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- where torch builds ---------------------------------------------------------------------------------


def extensions_root() -> Path:
    """The folder torch builds JIT extensions under, as `torch.utils.cpp_extension._get_build_directory`
    computes it (without creating it): $TORCH_EXTENSIONS_DIR as given, else the user cache folder's
    `torch_extensions/py<XY>_<accelerator>`."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is not None:
        return Path(root)
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def build_dir(op: str) -> Path:
    return extensions_root() / op


def lock_path(op: str) -> Path:
    """The file torch's FileBaton creates while `op` builds (the same for every version of the op)."""
    return build_dir(op) / "lock"


# ---- who holds a lock ------------------------------------------------------------------------------------


@dataclass
class Holder:
    pid: int
    command: str


@dataclass
class LockState:
    """One look at a lock file: who has it open, whether that answer is complete, and the folder's age."""

    path: Path
    inode: tuple[int, int]
    holders: list[Holder] = field(default_factory=list)
    conclusive: bool = True  # every process that could hold the file was inspected
    quiet_for: float = 0.0  # seconds since anything else in the build folder changed

    def stale(self, quiet_s: float) -> bool:
        return not self.holders and self.conclusive and self.quiet_for >= quiet_s


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    text = " ".join(raw.decode(errors="replace").replace("\0", " ").split()) or "?"  # one line
    return text if len(text) <= 80 else text[:77] + "..."


def lock_holders(path: Path, inode: tuple[int, int], proc: Path = Path("/proc")) -> tuple[list[Holder], bool]:
    """Processes with the file `inode` (st_dev, st_ino) at `path` open, and whether the scan was complete.

    Incomplete when there is no /proc, or when a process owned by the lock's owner (or any process, for
    a lock of another user) could not be inspected."""
    if not (proc / "self" / "fd").is_dir():
        return [], False
    real = os.path.realpath(path)
    me = os.geteuid() if hasattr(os, "geteuid") else -1
    owner = _owner(path)
    holders: list[Holder] = []
    complete = True
    with os.scandir(proc) as it:
        entries = list(it)
    for entry in entries:
        if not entry.name.isdigit():
            continue
        fd_dir = os.path.join(entry.path, "fd")
        try:
            fds = os.listdir(fd_dir)
        except FileNotFoundError:
            continue  # the process ended
        except PermissionError:
            try:
                uid = os.stat(entry.path).st_uid
            except OSError:
                continue
            if uid in (owner, me):
                complete = False
            continue
        except OSError:
            continue
        for fd in fds:
            link = os.path.join(fd_dir, fd)
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target == real or (os.path.basename(target) == "lock" and _same_file(link, inode)):
                holders.append(Holder(int(entry.name), _command(int(entry.name))))
                break
    return holders, complete


def _owner(path: Path) -> int:
    try:
        return os.stat(path).st_uid
    except OSError:
        return -1


def _same_file(link: str, inode: tuple[int, int]) -> bool:
    try:
        st = os.stat(link)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == inode


def _quiet_for(folder: Path, skip: Path, now: float) -> float:
    """Seconds since the newest change to a file in `folder` other than `skip` (the lock itself)."""
    newest = 0.0
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return float("inf")
    for e in entries:
        if e.name == skip.name:
            continue
        try:
            newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
        except OSError:
            continue
    return float("inf") if newest == 0.0 else max(0.0, now - newest)


def inspect_lock(path: Path, proc: Path = Path("/proc")) -> LockState | None:
    """The lock's state now, or None where there is no lock."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    inode = (st.st_dev, st.st_ino)
    holders, conclusive = lock_holders(path, inode, proc)
    return LockState(
        path=path,
        inode=inode,
        holders=holders,
        conclusive=conclusive,
        quiet_for=_quiet_for(path.parent, path, time.time()),
    )


# ---- waiting ---------------------------------------------------------------------------------------------


def wait_seconds() -> float:
    """The bound on waiting for another process's op build: $ST2SI_OP_BUILD_WAIT_S, default 300."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise St2siError(f"{WAIT_ENV} must be a number of seconds (0 or more), not {raw!r}")
    return value


def _who(state: LockState) -> str:
    if state.holders:
        return ", ".join(f"pid {h.pid} ({h.command})" for h in state.holders)
    if not state.conclusive:
        return "a process this system does not show"
    return f"no process (the build folder changed {state.quiet_for:.0f}s ago)"


def stale_message(what: str, path: Path) -> str:
    return (
        f"the {what} lock at {path} was left by a build that ended; "
        f"remove it (rm {shlex.quote(str(path))}) and run again"
    )


def wait_for_lock(
    path: Path,
    *,
    what: str = "DeepSpeed op build",
    wait_s: float | None = None,
    notify: Notify | None = stderr_line,
    quiet_s: float = QUIET_S,
    poll_s: float = POLL_S,
    proc: Path = Path("/proc"),
) -> float:
    """Return once no lock is at `path` (the seconds waited); raise St2siError for a lock left by a
    build that ended (at once) or one still there after `wait_s` seconds (default: $ST2SI_OP_BUILD_WAIT_S).

    `notify` gets one line, at once, when there is a lock to wait for (not for a stale one: that is the
    error's one line)."""
    bound = wait_seconds() if wait_s is None else wait_s
    start = time.monotonic()
    announced = False
    stale_inode: tuple[int, int] | None = None
    while True:
        state = inspect_lock(path, proc)
        if state is None:
            return time.monotonic() - start
        if state.stale(quiet_s):
            if stale_inode == state.inode:
                raise St2siError(stale_message(what, path))
            stale_inode = state.inode
            time.sleep(RECHECK_S)
            continue
        stale_inode = None
        waited = time.monotonic() - start
        if not announced and notify is not None:
            notify(
                f"Waiting for the {what} lock at {path}, held by {_who(state)}; "
                f"up to {bound:g}s ({WAIT_ENV} sets the limit)"
            )
        announced = True
        if waited >= bound:
            if state.holders:
                raise St2siError(
                    f"the {what} lock at {path} is still held by {_who(state)} after {bound:g}s; "
                    f"let that build finish (or set {WAIT_ENV} higher) and run again"
                )
            raise St2siError(
                f"the {what} lock at {path} is still there after {bound:g}s and no process shown holds "
                f"it; if no build is running, remove it (rm {shlex.quote(str(path))}) and run again"
            )
        time.sleep(max(0.0, min(poll_s, bound - waited)))


# ---- DeepSpeed's ops -------------------------------------------------------------------------------------


def deepspeed_jit_ops() -> list[str]:
    """The ops `deepspeed.init_distributed` is about to JIT-build in this process: its shared-memory
    comm op where the accelerator has one, unless installed prebuilt, already loaded, or the comm
    backend already runs. Call with DeepSpeed imported (and DS_ACCELERATOR set)."""
    try:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import accelerator_name, installed_ops

        if ds_comm.cdb is not None:
            return []
        accelerator = get_accelerator()
        builder = accelerator.create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return []
        if builder.name in getattr(type(builder), "_loaded_ops", {}):
            return []
        if installed_ops.get(builder.name, False) and accelerator_name == accelerator._name:
            return []
        return [builder.name]
    except Exception:  # DeepSpeed moved things: look at the lock of the op it builds today anyway
        return [SHM_COMM_OP]


def check_op_locks(
    ops: list[str], *, notify: Notify | None = stderr_line, wait_s: float | None = None
) -> None:
    """Before building `ops`: wait (bounded) for other builds' locks, fail on stale ones, and note a
    first build (it takes a minute or two, silently)."""
    for op in ops:
        path = lock_path(op)
        wait_for_lock(path, what="DeepSpeed op build", wait_s=wait_s, notify=notify)
        folder = path.parent
        if notify is not None and not any(folder.glob(f"{op}*.so")):
            notify(f"Building DeepSpeed's {op} op in {folder} (first use only; a minute or two)")


def check_deepspeed_op_locks(notify: Notify | None = stderr_line, wait_s: float | None = None) -> None:
    """`check_op_locks` for the ops `deepspeed.init_distributed` is about to build."""
    check_op_locks(deepspeed_jit_ops(), notify=notify, wait_s=wait_s)
