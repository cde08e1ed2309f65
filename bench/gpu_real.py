"""Real data on a GPU: full tuning, top-K tuning, tuning variants and ILP heads with the real backbone, in
one timed script.

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
- variants:  `BASE+MOD+...`, a `pretrain` whose options are read from the step's name. BASE is `full`,
             `topK` or `loraR` (LoRA of rank R on every layer, i.e. `full+loraR`); each MOD is one of
             `dropoutP` (`--dropout P`), `loraR` (`--lora R`), `headlrX` (`--head-lr X`), `lrX` (`--lr X`
             instead of the script's `--lr`) and `init` (`--init-head` with the head the `ilp` step made:
             that step must come earlier in `--steps`, and a variant whose `ilp` step failed or was skipped
             is skipped). E.g. `full+dropout0.1+init`, `lora8+init`, `full+headlr1e-3`, `top2+lora4+lr1e-4`.
             Each stores the backbone `gpu-<step with + as ->` and the head `<domain>/gpu-...`;
- `ilp`:     `adapt` (the paper's ILP on the frozen backbone), the same-hardware reference;
- `trim`:    `adapt --trim-periods` (ILP; Amazon titles end in '.', so every query reads '..');
- `attrs`:   `adapt --attributes title,brand,category` (ILP);
- `quality`: `python -m bench.quality` on the heads the steps before made (no RecBole): per-user test ranks,
             history unmasked and masked, from st2si's metric code, for paired intervals against the
             baselines measured elsewhere on the same split (`bench/gpu_compare.py`,
             `bench/tuning_summary.py`). Each tuned backbone costs it one feature pass.

An unknown step, a repeated one, or `+init` without an `ilp` step before it stop the script before it starts.

Time: `full` may take `--full-share` of the budget left at its start, each `topK` `--top-share` (less
their overhead). A variant takes an equal share of what is left once the later steps' needs are set aside
(the ILP steps' and `quality`'s minimum, plus one feature pass per tuned backbone for `quality`): with
three variants and `quality` after them, the first gets a third of that. `pretrain` checks its
`--max-minutes` only at validation points, so a run ends up to one validation interval past it;
`--valid-every N` (passed to every `pretrain` step) keeps that interval short, and a run from `--init-head`
that only gets worse stops after `--patience` points, leaving its time to the steps after it.

A `pretrain` step's epoch lines go to the log; its record (history, timings, metrics) is read back with
`st2si zoo info`, and the step's entry says which variant it ran (`variant`), the head it stored (`head`)
and its `max_minutes`. After every step it rewrites `OUT/gpu-real-<domain>.json` (each step's command,
seconds, exit status and record; `quality` adds its `result_file`) and `OUT/gpu-real-<domain>.log` (the
children's output), so a run cut short still leaves what it did. A step that does not fit in what is left of
`--budget` is skipped and recorded as skipped. All metrics are st2si's own: full ranking, pessimistic ties.
"""

from __future__ import annotations

import argparse
import importlib.util
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
from bench.gpu_steps import (
    ADAPT_STEPS,
    OVERHEAD,
    STEPS,
    TOP_OVERHEAD,
    VARIANT_OVERHEAD,
    VARIANT_SYNTAX,
    parse_variant,
    plan_steps,
    reserved_after,
)


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


def pretrain_step(d: Driver, steps: list[str], index: int, made: list[str], heads: dict[str, str]) -> None:
    """`full`, `topK` or a variant: pretrain with epoch lines in the log, then its run record."""
    args = d.args
    step = steps[index]
    v = parse_variant(step)
    assert v is not None
    init_head = heads.get("ilp") if v.init else None
    if v.init and init_head is None:
        d.skip(step, "no ILP head to start from: the ilp step failed or was skipped")
        return
    if v.lora and importlib.util.find_spec("peft") is None:  # pretrain would fail after loading
        d.skip(step, "peft is not installed (pip install 'st2si[lora]')")
        return
    left = d.left()
    if v.plain:
        overhead = OVERHEAD["full"] if step == "full" else TOP_OVERHEAD
        minutes = (left * (args.full_share if step == "full" else args.top_share) - overhead) / 60
        timeout = left
    else:
        held = reserved_after(steps, index)
        share = (left - held) / (1 + sum(parse_variant(s) is not None for s in steps[index + 1 :]))
        minutes = (share - VARIANT_OVERHEAD) / 60
        timeout = left - held  # what the later steps need is never spent here
    if minutes < 0.5:
        d.skip(step, f"{left:.0f} s left")
        return
    lr = v.lr if v.lr is not None else args.lr
    argv = ["pretrain", "--domain", args.domain, "--backbone", args.backbone, "--out", v.name]
    argv += ["--epochs", str(args.epochs), "--patience", str(args.patience), "--lr", str(lr)]
    argv += ["--warmup-steps", str(args.warmup_steps), "--batch-size", str(args.batch_size)]
    argv += ["--grad-accum", str(args.grad_accum), "--eval-batch-tokens", str(args.eval_batch_tokens)]
    argv += ["--max-minutes", f"{minutes:.2f}", "--device", args.device]
    if v.tune_layers:
        argv += ["--tune-layers", str(v.tune_layers)]
    if v.lora:
        argv += ["--lora", str(v.lora)]
    if v.dropout:
        argv += ["--dropout", str(v.dropout)]
    if v.head_lr is not None:
        argv += ["--head-lr", str(v.head_lr)]
    if init_head:
        argv += ["--init-head", init_head]
    if args.valid_every:
        argv += ["--valid-every", str(args.valid_every)]
    entry = d.st2si(step, argv, timeout, stdout_to_log=True)
    entry.update(variant=v.record(init_head), head=f"{args.domain}/{v.name}", max_minutes=round(minutes, 2))
    d.write()
    if entry["returncode"] != 0:
        return
    made.append(f"{args.domain}/{v.name}")
    info = d.st2si(f"{step}-record", ["zoo", "info", f"run/{v.name}", "--json"], 60)
    meta = (info.get("output") or [{}])[0].get("meta", {})
    info["output"] = [{key: meta[key] for key in RECORD_KEYS if key in meta}]
    d.write()


def quality_step(d: Driver, made: list[str]) -> None:
    """Per-user ranks of every head made so far (`bench.quality`, no RecBole); the entry names its file."""
    args = d.args
    cmd = [sys.executable, "-m", "bench.quality", "--domain", args.domain, "--models", ""]  # repo root
    cmd += [
        "--zoo",
        args.zoo,
        "--compute-features",
        "--device",
        args.device,
        "--out",
        args.out,
        "--tag",
        "gpu",
    ]
    cmd += ["--summary", str(Path(args.out) / "quality-summary-gpu.json")]
    for head in made:
        cmd += ["--head", head]
    started = time.time()
    entry = d.child("quality", cmd, d.left(), stdout_to_log=True)
    written = [p for p in d.out.glob(f"*-quality-{args.domain}-gpu.json") if p.stat().st_mtime >= started]
    if written:
        entry["result_file"] = max(written, key=lambda p: p.stat().st_mtime).name
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
        "--steps",
        default=",".join(STEPS),
        help=f"in order, from {', '.join(STEPS)} (topK: any K) and pretrain variants {VARIANT_SYNTAX}",
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
    ap.add_argument(
        "--valid-every",
        type=int,
        default=0,
        help="passed to every pretrain step: also validate every N optimizer steps (0: epoch ends only)",
    )
    args = ap.parse_args()
    try:
        steps = plan_steps(args.steps)
    except ValueError as e:
        ap.error(str(e))
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
    heads: dict[str, str] = {}  # the head each ILP step made, for `+init`
    for index, step in enumerate(steps):
        left = d.left()
        if step in (*ADAPT_STEPS, "quality") and left < OVERHEAD[step]:
            d.skip(step, f"{left:.0f} s left")
        elif step in ADAPT_STEPS:
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
                heads[step] = (entry.get("output") or [{}])[0].get("head", f"gpu-{step}")
                made.append(heads[step])
        elif step == "quality":
            if not made:
                d.skip(step, "no heads to score")
                continue
            quality_step(d, made)
        else:
            pretrain_step(d, steps, index, made, heads)
    d.record["total_seconds"] = round(time.time() - d.t0, 1)
    d.write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
