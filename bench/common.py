"""Helpers shared by the bench scripts: paths, machine description, provenance, child-process timing.

Nothing here is machine-specific: paths are relative to this file, the machine is described from
/proc/cpuinfo (or `platform`) at run time.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def cpu_model() -> str:
    """The CPU's model name (first processor in /proc/cpuinfo), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_count() -> int:
    """Cores this process may use (affinity), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_name() -> str:
    """A short file-name-safe description: CPU model + core count, e.g. 'amd-epyc-2c'."""
    model = cpu_model().lower()
    model = re.sub(r"\(r\)|\(tm\)|\bcpu\b|\bprocessor\b|@.*$|\d+-core", " ", model)
    slug = re.sub(r"[^a-z0-9]+", "-", model).strip("-")[:40].strip("-") or "cpu"
    return f"{slug}-{cpu_count()}c"


def cpu_bf16() -> bool | None:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX): the same model name can come with
    and without it, and it decides the fp32/bf16 timings. None where /proc/cpuinfo is not there."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def today() -> str:
    return time.strftime("%Y-%m-%d")


def command_line() -> str:
    """The command that is running, as a user would type it from the repository root
    (`python -m bench.quality ...` for a module run with -m)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name.removesuffix(".__main__"), *sys.argv[1:]])
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown = script.name
    return shlex.join(["python", shown, *sys.argv[1:]])


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the repository the bench runs from (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def provenance() -> dict[str, Any]:
    """What every result file records about where and how it was made."""
    import torch

    return {
        "command": command_line(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_name(),
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "cpu_bf16": cpu_bf16(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_state(),
    }


def result_path(out_dir: Path, part: str, tag: str | None = None, suffix: str = ".json") -> Path:
    """`<out>/<date>-<machine>-<part>[-<tag>].json`."""
    parts = [today(), machine_name(), part]
    if tag:
        parts.append(re.sub(r"[^A-Za-z0-9_.-]+", "-", tag))
    return out_dir / ("-".join(parts) + suffix)


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.1f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in body)])


@dataclass
class Timed:
    """One child process: what ran, how long, how much memory at peak, what it printed."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_mb: float | None
    rss_source: str
    stdout: str
    stderr: str

    def record(self) -> dict[str, Any]:
        return {
            "command": shown_command(self.argv),
            "returncode": self.returncode,
            "wall_s": round(self.wall_s, 3),
            "peak_rss_mb": None if self.peak_rss_mb is None else round(self.peak_rss_mb, 1),
            "rss_source": self.rss_source,
        }


def shown_command(argv: list[str]) -> str:
    """The command as a reader would type it: no interpreter or scratch paths of this machine."""
    import tempfile

    scratch = Path(tempfile.gettempdir())
    words = [shlex.quote(Path(argv[0]).name)]
    for w in argv[1:]:
        p = Path(w)
        if p.is_absolute() and p.is_relative_to(scratch) and p != scratch:
            rest = p.relative_to(scratch).parts[1:]  # drop the run's own temporary folder
            words.append("/".join(["$SCRATCH", *map(shlex.quote, rest)]))
        else:
            words.append(shlex.quote(w))
    return " ".join(words)


_MAXRSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


def run_timed(
    argv: list[str],
    *,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    check: bool = True,
    timeout: float | None = None,
) -> Timed:
    """Run a command; peak RSS from `/usr/bin/time -v` where present, else getrusage(RUSAGE_CHILDREN).

    The getrusage fallback reports the largest child so far of this process, so it is exact only
    when this child is the largest yet; the record says which source was used.
    """
    gnu_time = shutil.which("time", path="/usr/bin:/bin")
    full = [gnu_time, "-v", *argv] if gnu_time else list(argv)
    t0 = time.perf_counter()
    proc = subprocess.run(
        full, input=stdin, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout
    )
    wall = time.perf_counter() - t0
    stderr = proc.stderr
    peak, source = None, "none"
    if gnu_time:
        m = _MAXRSS.search(stderr)
        if m:
            peak, source = int(m.group(1)) / 1024, "/usr/bin/time -v"
            stderr = (
                stderr[: stderr.rfind("\tCommand being timed:")].rstrip()
                if "\tCommand being timed:" in stderr
                else stderr
            )
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        source = "getrusage(RUSAGE_CHILDREN)"
    rc = proc.returncode
    if check and rc != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"command failed ({rc}): {shlex.join(argv)}\n{tail}")
    return Timed(list(argv), rc, wall, peak, source, proc.stdout, stderr)


def st2si_argv(*args: str) -> list[str]:
    """The `st2si` entry point beside this interpreter (what a user runs), else `python -m st2si_cli`."""
    entry = Path(sys.executable).parent / "st2si"
    if entry.exists():
        return [str(entry), *args]
    return [sys.executable, "-m", "st2si_cli", *args]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ST2SI_NO_PROGRESS", "1")
    env.update(extra)
    return env


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
