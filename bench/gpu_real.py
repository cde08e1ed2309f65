"""Real data on a GPU: full tuning, top-K tuning and ILP heads with the real backbone, in one timed script.

    python -m bench.gpu_real --data DATA_DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out OUT --budget 480
    python -m bench.gpu_real --data SLICE --gguf tiny-llama --backbone tiny --out OUT --device cpu   # smoke

Meant for a GPU machine lent for a few minutes, where every step must count. In a fresh zoo
(`--zoo`, default a temporary folder) it imports the backbone (`st2si zoo pull`: a GGUF file, or any
ref it takes, such as tiny-llama for a smoke run), prepares the domain from `--data`, then runs these
steps in order, each a child process on `--device`:

- `full`:    `pretrain` (full tuning: multi-query, ID alignment, every layer) with the authors' settings
             by default (AdamW lr 5e-5, 100 warm-up steps, cosine, effective batch 128 as 64 x 2 micro-
             batches), early stopping on valid NDCG@10, and `--max-minutes` from what is left of the
             budget (the record says what stopped it);
- `topK`:    `pretrain --tune-layers K` (e.g. `top2`), the same with only the top K layers tuned;
- `ilp`:     `adapt` (the paper's ILP on the frozen backbone), the same-hardware reference;
- `trim`:    `adapt --trim-periods` (ILP; Amazon titles end in '.', so every query reads '..');
- `attrs`:   `adapt --attributes title,brand,category` (ILP);
- `quality`: `python -m bench.quality` on the heads the steps before made (no RecBole): per-user test ranks,
             history unmasked and masked, from st2si's metric code, for paired intervals against the
             baselines measured elsewhere on the same split (`bench/gpu_compare.py`).

A `pretrain` step's epoch lines go to the log; its record (history, timings, metrics) is read back with
`st2si zoo info`. After every step it rewrites `OUT/gpu-real-<domain>.json` (each step's command, seconds,
exit status and record) and `OUT/gpu-real-<domain>.log` (the children's output), so a run cut short still
leaves what it did. A step that does not fit in what is left of `--budget` is skipped and recorded as
skipped. All metrics are st2si's own: full ranking, pessimistic ties.
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

from bench.common import command_line

STEPS = ("full", "quality", "ilp", "trim", "attrs", "top2")
# Seconds a step needs at least, besides its training budget (loading, feature pass, final evaluation).
OVERHEAD = {"ilp": 60, "full": 90, "trim": 60, "attrs": 60, "quality": 60}
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
            "command": command_line(),
            "domain": args.domain,
            "device": args.device,
            "budget_seconds": args.budget,
            "paths": {"ZOO": str(args.zoo), "OUT": str(args.out), "DATA": str(args.data)},
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

    def st2si(
        self, step: str, argv: list[str], timeout: float, stdout_to_log: bool = False
    ) -> dict[str, Any]:
        return self.child(step, [sys.executable, "-m", "st2si_cli", *argv], timeout, stdout_to_log)

    def child(self, step: str, cmd: list[str], timeout: float, stdout_to_log: bool = False) -> dict[str, Any]:
        """Run one command; stderr (and stdout if `stdout_to_log`) to the log, else its JSON into the record."""
        argv = cmd[3:] if cmd[1:3] == ["-m", "st2si_cli"] else cmd[1:]
        prog = "st2si" if cmd[1:3] == ["-m", "st2si_cli"] else "python"
        entry: dict[str, Any] = {"step": step, "command": f"{prog} " + " ".join(argv)}
        print(f"[{time.time() - self.t0:6.0f}s] {step}: {entry['command']}", file=sys.stderr, flush=True)
        s0 = time.time()
        with self.log.open("a") as log:
            log.write(f"\n==== {step}: {entry['command']}\n")
            log.flush()
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=log if stdout_to_log else subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=self.env,
                    timeout=max(timeout, 1),
                )
                entry["returncode"] = proc.returncode
                stdout = proc.stdout or ""
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


# What a pretrain step keeps of its run record (`st2si zoo info run/NAME`; the head's record repeats it).
RECORD_KEYS = ("metrics", "history", "timings", "best_epoch", "best_step", "stopped_by", "early_stopped")
RECORD_KEYS += ("config", "flags")


def pretrain_step(d: Driver, step: str, made: list[str]) -> None:
    """`full` or `topK`: pretrain with epoch lines in the log, then its run record."""
    args = d.args
    k = 0 if step == "full" else int(step[3:])
    left = d.left()
    overhead = OVERHEAD["full"] if step == "full" else TOP_OVERHEAD
    minutes = (left * (args.full_share if step == "full" else args.top_share) - overhead) / 60
    if minutes < 0.5:
        d.skip(step, f"{left:.0f} s left")
        return
    name = f"gpu-{step}"
    argv = ["pretrain", "--domain", args.domain, "--backbone", args.backbone, "--out", name]
    argv += ["--epochs", str(args.epochs), "--patience", str(args.patience), "--lr", str(args.lr)]
    argv += ["--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size)]
    argv += ["--grad-accum", str(args.grad_accum), "--eval-batch-tokens", str(args.eval_batch_tokens)]
    argv += ["--max-minutes", f"{minutes:.2f}", "--device", args.device]
    if k:
        argv += ["--tune-layers", str(k)]
    entry = d.st2si(step, argv, left, stdout_to_log=True)
    if entry["returncode"] != 0:
        return
    made.append(f"{args.domain}/{name}")
    info = d.st2si(f"{step}-record", ["zoo", "info", f"run/{name}", "--json"], 60)
    meta = (info.get("output") or [{}])[0].get("meta", {})
    info["output"] = [{key: meta[key] for key in RECORD_KEYS if key in meta}]
    d.write()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the domain's raw data folder (as for st2si prepare)")
    ap.add_argument(
        "--gguf", required=True, help="the backbone's .gguf file, or any `st2si zoo pull` ref (tiny-llama)"
    )
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
        default=0.7,
        help="share of the budget left at its start that full tuning may take",
    )
    ap.add_argument("--top-share", type=float, default=0.5, help="likewise for each top-K run")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="pretrain samples per micro-batch (64: padded to the longest of 64 random samples, at most "
        "65k tokens on amazon-scientific; an H200 ran a SmolLM2-135M train step in 0.133 s at batch 16 "
        "and at 64)",
    )
    ap.add_argument(
        "--grad-accum", type=int, default=2, help="micro-batches per step (64 x 2: the authors' 128)"
    )
    ap.add_argument("--lr", type=float, default=5e-5, help="pretrain learning rate (the authors': 5e-5)")
    ap.add_argument("--warmup-steps", type=int, default=100, help="the authors': 100")
    ap.add_argument("--epochs", type=int, default=30, help="pretrain epoch cap (the cosine spans it)")
    ap.add_argument(
        "--patience", type=int, default=5, help="pretrain early-stopping patience (the authors': 5)"
    )
    ap.add_argument("--eval-batch-tokens", type=int, default=65536, help="padded tokens per validation batch")
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
    made: list[str] = []  # heads the steps stored, for `quality`
    for step in [s.strip() for s in args.steps.split(",") if s.strip()]:
        left = d.left()
        if step in ("ilp", "trim", "attrs", "quality") and left < OVERHEAD[step]:
            d.skip(step, f"{left:.0f} s left")
        elif step in ("ilp", "trim", "attrs"):
            extra = {
                "ilp": [],
                "trim": ["--trim-periods"],
                "attrs": ["--attributes", "title,brand,category"],
            }[step]
            argv = [
                "adapt",
                *dom,
                "--head",
                "ilp",
                "--backbone",
                args.backbone,
                *extra,
                "--name",
                f"gpu-{step}",
                *dev,
                "--json",
            ]
            entry = d.st2si(step, argv, left)
            if entry["returncode"] == 0:
                made.append((entry.get("output") or [{}])[0].get("head", f"gpu-{step}"))
        elif step == "quality":
            if not made:
                d.skip(step, "no heads to score")
                continue
            cmd = [sys.executable, "-m", "bench.quality", *dom, "--models", ""]  # from the repository root
            cmd += ["--zoo", args.zoo, "--compute-features", *dev, "--out", args.out, "--tag", "gpu"]
            cmd += ["--summary", str(Path(args.out) / "quality-summary-gpu.json")]
            for head in made:
                cmd += ["--head", head]
            d.child(step, cmd, left, stdout_to_log=True)
        elif step == "full" or (step.startswith("top") and step[3:].isdigit()):
            pretrain_step(d, step, made)
        else:
            d.skip(step, "unknown step")
    d.record["total_seconds"] = round(time.time() - d.t0, 1)
    d.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
