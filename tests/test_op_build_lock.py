"""The JIT op build lock (st2si_cli/pretrain/distributed/op_lock.py): a lock a killed build left behind
fails at once with how to clear it; one a live build holds is announced at once and waited on for a
bounded time; and `st2si pretrain --deepspeed` says so instead of hanging in torch's FileBaton.

Holders are small Python processes that create the lock the way torch's FileBaton does (O_CREAT|O_EXCL,
kept open). TORCH_EXTENSIONS_DIR points at a temporary folder, so nothing here builds an op.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import build_zoo, cli_command, cli_env, run_cli, synthetic_dataset

from st2si_cli.errors import St2siError
from st2si_cli.pretrain.distributed import op_lock

HAS_PROC = Path("/proc/self/fd").is_dir()
needs_proc = pytest.mark.skipif(not HAS_PROC, reason="lock holders are read from /proc")

HOLD = """
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL)
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
os.close(fd)
os.remove(sys.argv[1])
"""


@pytest.fixture
def ext_dir(tmp_path, monkeypatch):
    root = tmp_path / "torch-ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.delenv(op_lock.WAIT_ENV, raising=False)
    return root


def planted(root: Path, op: str = op_lock.SHM_COMM_OP) -> Path:
    """A lock as a killed build leaves it: the file, and no process with it open."""
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    return lock


class Holder:
    """A process holding `lock` open for `seconds` (then releasing it, as FileBaton.release does)."""

    def __init__(self, lock: Path, seconds: float = 120):
        lock.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def holders():
    started: list[Holder] = []

    def start(lock: Path, seconds: float = 120) -> Holder:
        started.append(Holder(lock, seconds))
        return started[-1]

    yield start
    for h in started:
        h.kill()


# ---- the path torch uses -------------------------------------------------------------------------------


def test_lock_path_is_the_one_torch_builds_in(tmp_path, monkeypatch):
    cpp = pytest.importorskip("torch.utils.cpp_extension")
    torch_dir = getattr(cpp, "_get_build_directory", None)
    if torch_dir is None:
        pytest.skip("torch no longer has _get_build_directory")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "given"))
    assert op_lock.build_dir("some_op") == Path(torch_dir("some_op", False))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr(cpp, "get_default_build_root", lambda: str(tmp_path / "default"))
    assert op_lock.build_dir("some_op") == Path(torch_dir("some_op", False))
    assert op_lock.lock_path("some_op") == Path(torch_dir("some_op", False)) / "lock"


def test_deepspeed_builds_its_shm_comm_op_on_cpu(monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from st2si_cli.pretrain.distributed.processes import import_deepspeed

    import_deepspeed()
    import deepspeed.comm.comm as ds_comm

    if ds_comm.cdb is not None:
        pytest.skip("a DeepSpeed process group runs in this process")
    assert op_lock.deepspeed_jit_ops() in ([op_lock.SHM_COMM_OP], [])  # [] where installed prebuilt


# ---- waiting ---------------------------------------------------------------------------------------------


def test_no_lock_no_wait_no_line(ext_dir):
    lines: list[str] = []
    assert op_lock.wait_for_lock(op_lock.lock_path("x"), wait_s=30, notify=lines.append) < 1
    assert lines == []


@needs_proc
def test_a_lock_no_process_holds_fails_at_once_with_how_to_clear_it(ext_dir):
    lock = planted(ext_dir)
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(St2siError) as e:
        op_lock.wait_for_lock(lock, wait_s=60, notify=lines.append)
    assert time.monotonic() - t0 < 5
    assert str(e.value) == (
        f"the DeepSpeed op build lock at {lock} was left by a build that ended; "
        f"remove it (rm {lock}) and run again"
    )
    assert lines == []  # the error is the one line


@needs_proc
def test_a_live_holder_is_named_at_once_and_waited_on_for_the_bound(ext_dir, holders):
    lock = op_lock.lock_path(op_lock.SHM_COMM_OP)
    h = holders(lock)
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(St2siError, match=rf"lock at {lock} is still held by pid {h.pid} \(.*\) after 1.5s"):
        op_lock.wait_for_lock(lock, wait_s=1.5, notify=lambda s: lines.append((time.monotonic() - t0, s)))
    assert 1.5 <= time.monotonic() - t0 < 10
    [(at, line)] = lines
    assert at < 2
    assert line.startswith(f"Waiting for the DeepSpeed op build lock at {lock}, held by pid {h.pid} (")
    assert op_lock.WAIT_ENV in line


@needs_proc
def test_the_wait_ends_when_the_build_releases_the_lock(ext_dir, holders):
    lock = op_lock.lock_path(op_lock.SHM_COMM_OP)
    holders(lock, seconds=1.5)
    lines: list[str] = []
    waited = op_lock.wait_for_lock(lock, wait_s=60, notify=lines.append)
    assert 0.5 < waited < 30 and not lock.exists()
    assert len(lines) == 1 and "held by pid" in lines[0]


@needs_proc
def test_a_builder_killed_during_the_wait_makes_the_lock_stale(ext_dir, holders):
    lock = op_lock.lock_path(op_lock.SHM_COMM_OP)
    h = holders(lock)
    threading.Timer(1.0, h.kill).start()
    t0 = time.monotonic()
    with pytest.raises(St2siError, match="was left by a build that ended; remove it"):
        op_lock.wait_for_lock(lock, wait_s=60, notify=lambda s: None)
    assert time.monotonic() - t0 < 10 and lock.exists()


@needs_proc
def test_a_build_folder_still_changing_delays_the_stale_verdict(ext_dir):
    lock = planted(ext_dir)
    (lock.parent / "shm.o").touch()  # written just now: perhaps by a build this system cannot show
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(St2siError, match="was left by a build that ended"):
        op_lock.wait_for_lock(lock, wait_s=60, notify=lines.append, quiet_s=1.0, poll_s=0.1)
    assert 0.8 <= time.monotonic() - t0 < 10
    [line] = lines
    assert "held by no process (the build folder changed 0s ago)" in line


def test_holders_that_cannot_be_seen_are_waited_on_for_the_bound(ext_dir, tmp_path):
    lock = planted(ext_dir)
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(St2siError) as e:
        op_lock.wait_for_lock(lock, wait_s=1, notify=lines.append, proc=tmp_path / "no-proc")
    assert 1 <= time.monotonic() - t0 < 10
    assert str(e.value) == (
        f"the DeepSpeed op build lock at {lock} is still there after 1s and no process shown holds it; "
        f"if no build is running, remove it (rm {lock}) and run again"
    )
    [line] = lines
    assert "held by a process this system does not show; up to 1s" in line


def test_the_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(op_lock.WAIT_ENV, raising=False)
    assert op_lock.wait_seconds() == op_lock.DEFAULT_WAIT_S
    monkeypatch.setenv(op_lock.WAIT_ENV, "2.5")
    assert op_lock.wait_seconds() == 2.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(op_lock.WAIT_ENV, bad)
        with pytest.raises(St2siError, match=rf"{op_lock.WAIT_ENV} must be a number of seconds"):
            op_lock.wait_seconds()


@needs_proc
def test_check_op_locks_notes_a_first_build_and_fails_on_a_stale_lock(ext_dir):
    lines: list[str] = []
    op_lock.check_op_locks(["some_op"], notify=lines.append, wait_s=5)
    assert lines == [
        f"Building DeepSpeed's some_op op in {ext_dir / 'some_op'} (first use only; a minute or two)"
    ]
    lines.clear()
    (ext_dir / "some_op").mkdir(parents=True)
    (ext_dir / "some_op" / "some_op.so").touch()
    os.utime(ext_dir / "some_op" / "some_op.so", (time.time() - 600, time.time() - 600))  # built long ago
    op_lock.check_op_locks(["some_op"], notify=lines.append, wait_s=5)
    assert lines == []
    lock = planted(ext_dir, "some_op")
    with pytest.raises(St2siError, match=f"lock at {lock} was left"):
        op_lock.check_op_locks(["some_op"], notify=lines.append, wait_s=60)


# ---- pretrain, in this process and on the command line ----------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("lockzoo"), {"toy": synthetic_dataset(n_users=10)})


@needs_proc
@pytest.mark.deepspeed
def test_pretrain_deepspeed_fails_before_the_process_group_starts(zoo, ext_dir, monkeypatch):
    """The library call: a St2siError before DeepSpeed's init_distributed, and no launcher variables left."""
    pytest.importorskip("deepspeed")
    import torch

    from st2si_cli.pretrain.config import PretrainConfig
    from st2si_cli.pretrain.distributed.processes import import_deepspeed
    from st2si_cli.pretrain.full import pretrain

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for k in LAUNCHER_VARS:
        monkeypatch.delenv(k, raising=False)
    import_deepspeed()
    if not op_lock.deepspeed_jit_ops():
        pytest.skip("DeepSpeed's comm op is already loaded (or prebuilt) in this process")
    planted(ext_dir)
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(epochs=1), deepspeed="zero0")
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)  # without the check it would wait forever
    worker.start()
    worker.join(timeout=60)
    assert outcome, "pretrain is still waiting on the lock"
    [e] = outcome
    assert isinstance(e, St2siError) and "was left by a build that ended" in str(e)
    assert not torch.distributed.is_initialized()
    assert [k for k in LAUNCHER_VARS if k in os.environ] == []


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PRETRAIN = ("pretrain", "--domain", "toy", "--backbone", "tiny-opt", "--epochs", "1", "--deepspeed", "zero0")


def cli_lock_env(ext: Path, wait: float) -> dict[str, str]:
    return {
        "TORCH_EXTENSIONS_DIR": str(ext),
        op_lock.WAIT_ENV: str(wait),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
    }


@needs_proc
@pytest.mark.deepspeed
def test_pretrain_deepspeed_with_a_stale_lock_says_how_to_clear_it_and_exits(zoo, tmp_path):
    pytest.importorskip("deepspeed")
    ext = tmp_path / "torch-ext"
    lock = planted(ext)
    t0 = time.monotonic()
    r = run_cli(zoo, *PRETRAIN, env=cli_lock_env(ext, 30), timeout=60)
    assert r.returncode == 1, r.stderr
    assert time.monotonic() - t0 < 60
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert errors == [
        f"Error: the DeepSpeed op build lock at {lock} was left by a build that ended; "
        f"remove it (rm {lock}) and run again"
    ], r.stderr
    assert sorted(p.name for p in lock.parent.iterdir()) == ["lock"]  # no build started
    assert r.stdout == ""


@needs_proc
@pytest.mark.deepspeed
def test_pretrain_deepspeed_names_a_live_build_at_once_and_gives_up_after_the_bound(zoo, tmp_path, holders):
    pytest.importorskip("deepspeed")
    ext = tmp_path / "torch-ext"
    lock = ext / op_lock.SHM_COMM_OP / "lock"
    h = holders(lock)
    cmd = cli_command(zoo, *PRETRAIN)
    t0 = time.monotonic()
    p = subprocess.Popen(
        cmd,
        env=cli_env(cli_lock_env(ext, 3)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[tuple[float, str]] = []

    def read() -> None:  # as lines come, to time the first line about the lock
        for line in p.stderr:
            seen.append((time.monotonic() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        p.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("pretrain is still waiting on the lock after 60s")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(timeout=10)
    text = "\n".join(s for _, s in seen)
    assert p.returncode == 1, text
    waiting = [(at, s) for at, s in seen if s.startswith("Waiting for the DeepSpeed op build lock")]
    assert len(waiting) == 1, text
    at, line = waiting[0]
    assert at < 20 and f"lock at {lock}, held by pid {h.pid} (" in line
    errors = [s for _, s in seen if s.startswith("Error:")]
    assert len(errors) == 1 and f"lock at {lock} is still held by pid {h.pid}" in errors[0], text
    assert lock.exists() and sorted(q.name for q in lock.parent.iterdir()) == ["lock"]
