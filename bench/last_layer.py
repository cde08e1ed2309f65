"""Top-K tuning with the last layer at the query positions only, against the whole last layer, in turn.

    python -m bench.last_layer --zoo ZOO --domain D [--backbone B] --tune-layers 1 --epochs 2 --rounds 2 [--threads 2]

Each round runs `st2si pretrain --domain D --tune-layers K --epochs E --patience E --json` twice, first
as it is (the last layer at the queries only), then with `ST2SI_WHOLE_LAST_LAYER=1` (the layer's own
forward at every position). The activation cache is built by the first run and found by the others
(its key does not depend on the switch), so what differs is the epochs: training and validation
seconds per epoch are read from each run's history, and the ratio of the medians is printed with
the two runs' training losses and validation NDCG@10 side by side (the same arithmetic: they agree up
to float summation order). `--cache-dtype fp32` (the default here) lets the final evaluation read the
cache too, so a run is the epochs plus little else. The record goes to `<out>/<date>-<machine>-last-layer-<domain>-k<K>.json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench.common import child_env, log, provenance, result_path, run_timed, st2si_argv, write_json


def one_run(args: argparse.Namespace, name: str, whole: bool) -> dict[str, Any]:
    argv = st2si_argv(
        "--zoo", args.zoo, "pretrain", "--domain", args.domain, "--backbone", args.backbone, "--tune-layers", str(args.tune_layers),
        "--epochs", str(args.epochs), "--patience", str(args.epochs), "--cache-dtype", args.cache_dtype,
        "--out", name, "--json",
    )  # fmt: skip
    extra = {"OMP_NUM_THREADS": str(args.threads)}
    if whole:
        extra["ST2SI_WHOLE_LAST_LAYER"] = "1"
    timed = run_timed(argv, env=child_env(**extra))
    rec = json.loads(timed.stdout.strip().splitlines()[-1])
    ends = [r for r in rec["history"] if r.get("end")]
    return {
        "variant": "whole last layer" if whole else "last layer at the queries",
        **timed.record(),
        "train_seconds": [r["train_seconds"] for r in ends],
        "valid_seconds": [r["valid_seconds"] for r in ends],
        "loss": [r["loss"] for r in ends],
        "valid_ndcg10": [r["valid_NDCG@10"] for r in ends],
        "activation_cache": rec["timings"].get("activation_cache"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--tune-layers", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--cache-dtype", default="fp32", help="fp32 (default): the final evaluation reads the cache too"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    from bench.common import REPO_ROOT

    prov = provenance()
    runs = []
    for r in range(args.rounds):
        for whole in (False, True):
            name = f"last-layer-k{args.tune_layers}-{'whole' if whole else 'queries'}-{r}"
            runs.append(one_run(args, name, whole))
            log(json.dumps({k: runs[-1][k] for k in ("variant", "train_seconds", "valid_seconds", "loss")}))

    def median(key: str, whole: bool) -> float:
        return statistics.median(
            s for x in runs if (x["variant"] == "whole last layer") == whole for s in x[key]
        )

    result = {
        "domain": args.domain,
        "tune_layers": args.tune_layers,
        "train_whole_over_queries": round(median("train_seconds", True) / median("train_seconds", False), 3),
        "valid_whole_over_queries": round(median("valid_seconds", True) / median("valid_seconds", False), 3),
        "median_train_seconds": {
            "queries": median("train_seconds", False),
            "whole": median("train_seconds", True),
        },
        "median_valid_seconds": {
            "queries": median("valid_seconds", False),
            "whole": median("valid_seconds", True),
        },
        "runs": runs,
        "provenance": prov,
        "note": args.note,
    }
    out = Path(args.out) if args.out else REPO_ROOT / "bench" / "results"
    path = write_json(result_path(out, "last-layer", f"{args.domain}-k{args.tune_layers}"), result)
    log(f"wrote {path}")
    print(json.dumps({k: result[k] for k in list(result)[:6]}))


if __name__ == "__main__":
    main()
