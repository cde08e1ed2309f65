"""Cross-process coordination for one zoo: lock files (fcntl) and staging names that carry their owner.

- `FileLock(path)`: an advisory `flock` on a lock file, exclusive or shared, released when the process
  dies, so a killed run never leaves a lock behind.
- `tmp_prefix(kind)`: `KIND-PID-` for temp files and folders under `tmp/`; `owner_pid(name)` reads the
  PID back, so `zoo prune` can tell a live process's work from a leftover.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path

_OWNED = re.compile(r"^[a-z]+-(\d+)-")


class FileLock:
    """`with FileLock(path):` holds an exclusive (or, with shared=True, a shared) lock on `path`."""

    def __init__(self, path: str | Path, *, shared: bool = False):
        self.path = Path(path)
        self.shared = shared
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, flags if blocking else flags | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:  # the file may have been removed (zoo prune) between open and flock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def is_locked(path: str | Path) -> bool:
    """Whether some process holds a lock on `path` (False when the file does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock
    return False


def tmp_prefix(kind: str) -> str:
    """`KIND-PID-`: the prefix of every temp file or folder this process makes under tmp/."""
    return f"{kind}-{os.getpid()}-"


def owner_pid(name: str) -> int | None:
    """The PID in a `KIND-PID-...` temp name, or None for names without one."""
    m = _OWNED.match(name)
    return int(m.group(1)) if m else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
