"""Time to the first `st2si recommend` answer through a FIFO: the line written at once, or after a delay.

    python -m bench.first_line --zoo ZOO --domain DOMAIN [--head REF] [--delay SECONDS] [--history ID ...]
        [--rounds N] [--vs-transformers] [--vs-torch] [--summary [--out DIR] [--note TEXT]]

Prints the seconds from process start to the first answer line, and from the write to the answer (with a
delay, the model has loaded meanwhile, so the second figure is what a waiting stream sees), for each of
`--rounds` runs and their median and minimum. `--vs-transformers` runs, in turn with each round, the same
request with the backbone loaded through transformers (`ST2SI_NO_FAST_LOAD=1`, the load before the fast
start) and reports the ratio of medians. `--vs-torch` does the same with the torch forward in place of
the numpy one (`ST2SI_NO_NUMPY=1`: the backbone memory-mapped into torch, as before the numpy path).
`--summary` merges `first_line_seconds` (median, minimum, with the
command, machine and load average) into `<out>/speed-summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def one_run(args: argparse.Namespace, extra_env: dict[str, str]) -> dict[str, float]:
    fifo = os.path.join(tempfile.mkdtemp(), "in.fifo")
    os.mkfifo(fifo)
    env = {**os.environ, "ST2SI_NO_PROGRESS": "1", **extra_env}
    cmd = [sys.executable, "-m", "st2si_cli", "--zoo", args.zoo, "recommend", "--domain", args.domain]
    if args.head:
        cmd += ["--head", args.head]
    t0 = time.monotonic()
    proc = subprocess.Popen([*cmd, "--user-history", fifo, "-k", "3"], stdout=subprocess.PIPE, env=env)
    with open(fifo, "w") as w:
        time.sleep(args.delay)
        t_write = time.monotonic()
        w.write(json.dumps({"user": "a", "history": args.history}) + "\n")
        w.flush()
        if not select.select([proc.stdout], [], [], 600)[0]:
            sys.exit("no answer within 600 s")
        proc.stdout.readline()
        t1 = time.monotonic()
    proc.wait()
    os.unlink(fifo)
    os.rmdir(os.path.dirname(fifo))
    return {"first_line_seconds": round(t1 - t0, 3), "after_write_seconds": round(t1 - t_write, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--head", help="head reference (default: the domain's newest head)")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds between opening the FIFO and writing")
    ap.add_argument("--history", nargs="+", default=["1", "2"], help="catalog item IDs of the one history")
    ap.add_argument("--rounds", type=int, default=1, help="runs (each with its --vs-transformers run)")
    ap.add_argument("--vs-transformers", action="store_true", help="also time the transformers load, in turn")
    ap.add_argument(
        "--vs-torch", action="store_true", help="also time the torch forward (ST2SI_NO_NUMPY=1), in turn"
    )
    ap.add_argument("--summary", action="store_true", help="merge first_line_seconds into the speed summary")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument(
        "--note", default="", help="a note stored with the summary figure (other jobs running...)"
    )
    args = ap.parse_args()
    from bench.common import REPO_ROOT, load_average, provenance

    prov = provenance() if args.summary else {"load_average_start": load_average()}
    runs: dict[str, list[dict[str, float]]] = {"fast": [], "transformers": [], "torch": []}
    for _ in range(args.rounds):
        runs["fast"].append(one_run(args, {}))
        if args.vs_transformers:
            runs["transformers"].append(one_run(args, {"ST2SI_NO_FAST_LOAD": "1"}))
        if args.vs_torch:
            runs["torch"].append(one_run(args, {"ST2SI_NO_NUMPY": "1"}))
    result: dict[str, object] = {"delay_seconds": args.delay, "rounds": args.rounds}
    for name, rs in runs.items():
        if rs:
            fl = [r["first_line_seconds"] for r in rs]
            result[name] = {
                "first_line_seconds": {"median": round(statistics.median(fl), 2), "min": round(min(fl), 2)},
                "after_write_seconds": round(statistics.median(r["after_write_seconds"] for r in rs), 2),
                "runs": rs,
            }
    if runs["transformers"]:
        pairs = [
            t["first_line_seconds"] / f["first_line_seconds"]
            for f, t in zip(runs["fast"], runs["transformers"])
        ]
        result["transformers_over_fast"] = round(statistics.median(pairs), 2)
    if runs["torch"]:
        pairs = [
            t["first_line_seconds"] / f["first_line_seconds"] for f, t in zip(runs["fast"], runs["torch"])
        ]
        result["torch_over_fast"] = round(statistics.median(pairs), 2)
    result["load_average_start"] = prov["load_average_start"]
    result["load_average_end"] = load_average()
    print(json.dumps(result))
    if args.summary:
        from bench.speed import SUMMARY, merge_summary

        fl = [r["first_line_seconds"] for r in runs["fast"]]
        figure = {
            "value": round(statistics.median(fl), 2),
            "min": round(min(fl), 2),
            "what": "st2si recommend: process start to the first output line",
            "scope": f"one history, domain {args.domain}" + (f", head {args.head}" if args.head else ""),
            "rounds": args.rounds,
        }
        if "transformers" in result:
            figure["transformers_load_seconds"] = result["transformers"]["first_line_seconds"]  # type: ignore[index]
        if "torch" in result:
            figure["torch_forward_seconds"] = result["torch"]["first_line_seconds"]  # type: ignore[index]
        out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results"
        merge_summary(out / SUMMARY, {"first_line_seconds": figure}, prov, args.note)


if __name__ == "__main__":
    main()
