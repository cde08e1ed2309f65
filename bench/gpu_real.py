"""Real data on a GPU: full tuning, top-K tuning and ILP heads with the real backbone, in one timed script.

    python bench/gpu_real.py --data DATA_DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out OUT --budget 480

Meant for a GPU machine lent for a few minutes, where every step must count. In a fresh zoo
(`--zoo`, default a temporary folder) it imports the backbone from the GGUF file, prepares the domain
from `--data`, then runs these st2si commands in order, each a child process on `--device`:

- `ilp`:   `adapt` (the paper's ILP on the frozen backbone), the same-hardware reference;
- `full`:  `pretrain` (full tuning: multi-query, ID alignment, every layer), early stopping on valid
           NDCG@10, and `--max-minutes` from what is left of the budget (the record says what stopped it);
- `topK`:  `pretrain --tune-layers K` (e.g. `top2`), the same with only the top K layers tuned;
- `trim`:  `adapt --trim-periods` (ILP; Amazon titles end in '.', so every query reads '..');
- `attrs`: `adapt --attributes title,brand,category` (ILP).

After every step it rewrites `OUT/gpu-real-<domain>.json` (each step's command, seconds, exit status,
test and valid metrics as st2si printed them) and `OUT/gpu-real-<domain>.log` (the children's stderr),
so a run cut short still leaves what it did. A step that does not fit in what is left of `--budget` is
skipped and recorded as skipped. All metrics are st2si's own: test, full ranking, pessimistic ties.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STEPS = ("ilp", "full", "top2", "trim", "attrs")
# Seconds a step needs at least, besides its training budget (loading, feature pass, final evaluation).
OVERHEAD = {"ilp": 60, "full": 90, "trim": 60, "attrs": 60}
TOP_OVERHEAD = 90


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return env


class Driver:
    """Runs st2si commands as children, times them and writes the record after each."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = self.out / f"gpu-real-{args.domain}.log"
        self.record: dict[str, Any] = {
            "command": " ".join(sys.argv),
            "domain": args.domain,
            "device": args.device,
            "budget_seconds": args.budget,
            "environment": environment(),
            "steps": [],
        }
        self.env = {**os.environ, "ST2SI_HOME": args.zoo, "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.args.budget - (time.time() - self.t0)

    def write(self) -> None:
        path = self.out / f"gpu-real-{self.args.domain}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1))
        os.replace(tmp, path)

    def st2si(self, step: str, argv: list[str], timeout: float) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "st2si_cli", *argv]
        entry: dict[str, Any] = {"step": step, "command": "st2si " + " ".join(argv)}
        print(f"[{time.time() - self.t0:6.0f}s] {step}: {entry['command']}", file=sys.stderr, flush=True)
        s0 = time.time()
        with self.log.open("a") as log:
            log.write(f"\n==== {step}: {entry['command']}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=self.env, timeout=max(timeout, 1)
                )
                entry["returncode"] = proc.returncode
                stdout = proc.stdout
            except subprocess.TimeoutExpired as e:
                entry["returncode"] = "timeout"
                stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        entry["seconds"] = round(time.time() - s0, 1)
        lines = _json_records(stdout)
        if lines:
            entry["output"] = lines
        self.record["steps"].append(entry)
        self.write()
        print(
            f"[{time.time() - self.t0:6.0f}s] {step}: exit {entry['returncode']} after {entry['seconds']} s"
            + "".join(f"; test {_short(x)}" for x in lines if "metrics" in x),
            file=sys.stderr,
            flush=True,
        )
        return entry

    def skip(self, step: str, why: str) -> None:
        self.record["steps"].append({"step": step, "skipped": why})
        self.write()
        print(f"[{time.time() - self.t0:6.0f}s] {step}: skipped ({why})", file=sys.stderr, flush=True)


def _json_records(stdout: str) -> list[dict[str, Any]]:
    """The JSON a command printed: one document (possibly indented) or one object per line."""
    try:
        whole = json.loads(stdout)
        return whole if isinstance(whole, list) else [whole]
    except ValueError:
        pass
    out = []
    for x in stdout.splitlines():
        try:
            out.append(json.loads(x))
        except ValueError:
            continue
    return out


def _short(line: dict[str, Any]) -> str:
    m = line.get("metrics") or {}
    return ", ".join(f"{k} {m[k]:.4f}" for k in ("NDCG@10", "Recall@10", "MRR") if k in m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the domain's raw data folder (as for st2si prepare)")
    ap.add_argument("--gguf", required=True, help="the backbone's .gguf file")
    ap.add_argument("--backbone", default="smollm2-135m", help="the backbone's name in the zoo")
    ap.add_argument("--domain", default="amazon-scientific")
    ap.add_argument("--out", required=True)
    ap.add_argument("--zoo", default=None, help="zoo folder (default: a new temporary one)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole script")
    ap.add_argument(
        "--steps", default=",".join(STEPS), help=f"in order, from {', '.join(STEPS)} (topK: any K)"
    )
    ap.add_argument(
        "--full-share",
        type=float,
        default=0.45,
        help="share of the budget left at its start that full tuning may take",
    )
    ap.add_argument("--top-share", type=float, default=0.5, help="likewise for each top-K run")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="pretrain samples per step (64: on an H200 a SmolLM2-135M train step took 0.133 s at batch 16 and at 64)",
    )
    ap.add_argument("--patience", type=int, default=2, help="pretrain early-stopping patience")
    args = ap.parse_args()
    args.zoo = args.zoo or tempfile.mkdtemp(prefix="st2si-gpu-zoo-")
    d = Driver(args)
    d.write()
    dev = ["--device", args.device]
    dom = ["--domain", args.domain]
    if (
        d.st2si("pull", ["zoo", "pull", args.gguf, "--name", args.backbone, "--json"], d.left())["returncode"]
        != 0
    ):
        return 1
    if d.st2si("prepare", ["prepare", args.data, *dom, "--json"], d.left())["returncode"] != 0:
        return 1
    for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
        left = d.left()
        if step in ("ilp", "trim", "attrs"):
            if left < OVERHEAD[step]:
                d.skip(step, f"{left:.0f} s left")
                continue
            extra = {
                "ilp": [],
                "trim": ["--trim-periods"],
                "attrs": ["--attributes", "title,brand,category"],
            }[step]
            d.st2si(step, ["adapt", *dom, *extra, "--name", f"gpu-{step}", *dev, "--json"], left)
        elif step == "full" or step.startswith("top"):
            k = 0 if step == "full" else int(step[3:])
            overhead = OVERHEAD["full"] if step == "full" else TOP_OVERHEAD
            minutes = (left * (args.full_share if step == "full" else args.top_share) - overhead) / 60
            if minutes < 0.5:
                d.skip(step, f"{left:.0f} s left")
                continue
            argv = ["pretrain", *dom, "--backbone", args.backbone, "--out", f"gpu-{step}", "--epochs", "30"]
            argv += ["--patience", str(args.patience), "--batch-size", str(args.batch_size)]
            argv += ["--max-minutes", f"{minutes:.2f}", *dev, "--json"]
            if k:
                argv += ["--tune-layers", str(k)]
            d.st2si(step, argv, left)
        else:
            d.skip(step, "unknown step")
    d.record["total_seconds"] = round(time.time() - d.t0, 1)
    d.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
