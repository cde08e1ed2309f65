"""One whole feature pass, timed: `st2si adapt --domain D --head ilp` on every user of a domain, from a zoo
that holds no feature cache for it, so the run computes the pass it reports.

    python -m bench.whole_pass --zoo ZOO --domain amazon-scientific [--summary] [--note TEXT]
    python -m bench.whole_pass --zoo ZOO --domain amazon-scientific --time-log LOG --adapt-json J \\
        --ran 'st2si adapt --domain amazon-scientific --head ilp --json'      # a run made by hand

The first form runs the command itself (wall time and peak RSS from `/usr/bin/time -v`). The second
records a run already made: LOG is its `/usr/bin/time -v` output (stderr), J its `--json` output, and
`--ran` the command as it was typed. Either way the figures are read from the run and from the zoo:
the feature cache's own timings (tokens, padded tokens, batches, seconds of the pass) and the head's
training seconds. `adapt_vs_pass` is the command's wall time over the pass inside it, so what `adapt`
adds to one forward pass over the whole dataset (loading, the ILP's training, evaluation, storing; and
the backbone's conversion from GGUF when the zoo had none) shows on the whole dataset, not on a
subset. `--summary` merges `feature_pass_whole` and `adapt_vs_pass_whole` into
`<out>/speed-summary.json`; the record goes to `<out>/<date>-<machine>-whole-pass-<domain>.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from bench.common import child_env, log, provenance, result_path, run_timed, st2si_argv, write_json

_WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\):\s*(?:(\d+):)?(\d+):([\d.]+)")
_MAXRSS = re.compile(r"Maximum resident set size \(kbytes\):\s*(\d+)")


def time_log_figures(text: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) from `/usr/bin/time -v` output."""
    wall, rss = _WALL.search(text), _MAXRSS.search(text)
    if not wall or not rss:
        raise SystemExit("the time log holds no '/usr/bin/time -v' figures")
    h, m, s = wall.groups()
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) / 1024


def feature_ids(zoo: str) -> set[str]:
    from st2si_cli import Zoo

    return {a.id for a in Zoo(Path(zoo)).ls(kind="features")}


def run_record(zoo: str, head_id: str) -> dict[str, Any]:
    """The head's and its feature cache's figures, read from the zoo."""
    from st2si_cli import Zoo

    z = Zoo(Path(zoo))
    head = z.get(head_id)
    feats = z.get(head.meta["inputs"]["features"])
    t = feats.meta["timings"]
    return {
        "head": {
            "id": head.id,
            "name": head.name,
            "training_seconds": head.meta["timings"]["training_seconds"],
            "test_ndcg10": head.meta["metrics"]["test"]["NDCG@10"],
        },  # fmt: skip
        "features": {
            "id": feats.id,
            "dtype": feats.meta["dtype"],
            "samples": feats.meta["samples"],
            "positions": feats.meta["positions"],
            **{
                k: t[k]
                for k in ("tokens", "tokens_computed", "padded_tokens", "batches", "seconds", "tokens_per_s")
            },
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--time-log", help="record a run made by hand: its /usr/bin/time -v output")
    ap.add_argument("--adapt-json", help="with --time-log: the run's --json output")
    ap.add_argument("--ran", help="with --time-log: the command as it was typed")
    ap.add_argument("--summary", action="store_true", help="merge the figures into the speed summary")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--note", default="", help="stored with the figures (what else ran on the machine)")
    args = ap.parse_args()
    from bench.common import REPO_ROOT

    prov = provenance()
    if args.time_log:
        if not (args.adapt_json and args.ran):
            raise SystemExit("--time-log needs --adapt-json and --ran")
        wall, rss = time_log_figures(Path(args.time_log).read_text())
        out_json = json.loads(Path(args.adapt_json).read_text())
        command, before = args.ran, None
    else:
        before = feature_ids(args.zoo)
        argv = st2si_argv("--zoo", args.zoo, "adapt", "--domain", args.domain, "--head", "ilp", "--json")
        log("running: " + " ".join(argv))
        timed = run_timed(argv, env=child_env())
        wall, rss = timed.wall_s, timed.peak_rss_mb
        out_json = json.loads(timed.stdout)
        command = timed.record()["command"]
    rec = run_record(args.zoo, out_json["head_id"])
    if before is not None and rec["features"]["id"] in before:
        raise SystemExit("the feature cache was there before the run: remove it (st2si zoo rm) and run again")
    pass_s = rec["features"]["seconds"]
    result = {
        "domain": args.domain,
        "adapt": {"command": command, "wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1)},
        **rec,
        "adapt_vs_pass": round(wall / pass_s, 3),
        "outside_the_pass_s": round(wall - pass_s, 2),
        "provenance": prov,
        "note": args.note,
    }
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results"
    path = write_json(result_path(out, "whole-pass", args.domain), result)
    log(f"wrote {path}")
    f = rec["features"]
    print(
        f"{args.domain}: pass {f['tokens']:,} tokens in {pass_s:,.0f} s ({f['tokens_per_s']:,.0f} tokens/s, "
        f"{f['dtype']}); adapt {wall:,.0f} s = {wall / pass_s:.3f}x the pass; peak RSS {rss:,.0f} MB"
    )
    if args.summary:
        from bench.speed import SUMMARY, merge_summary

        scope = f"{args.domain}, every user ({f['samples']:,} samples, {f['tokens']:,} tokens), {f['dtype']}"
        figures = {
            "feature_pass_whole": {
                "value": f["tokens_per_s"],
                "seconds": pass_s,
                "scope": scope,
                "what": "feature pass tokens/s, the pass inside st2si adapt",
            },  # fmt: skip
            "adapt_vs_pass_whole": {
                "value": result["adapt_vs_pass"],
                "scope": scope,
                "numerator": "st2si adapt --head ilp wall seconds",
                "denominator": "the feature pass inside that run (its cache's own timer)",
            },  # fmt: skip
        }
        prov_summary = {**prov, "command": f"{command}; then {prov['command']}" if args.time_log else command}
        merge_summary(out / SUMMARY, figures, prov_summary, args.note)


if __name__ == "__main__":
    sys.exit(main())
