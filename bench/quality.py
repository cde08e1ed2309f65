"""Quality side by side: st2si heads against converged RecBole SASRec / GRU4Rec, same split, same metric code.

    python -m bench.quality --domain amazon-scientific --models sasrec,gru4rec

1. The domain's dataset is exported to RecBole atomic files (user = st2si user index, item = st2si item
   index, timestamp = position in the user's sequence, so RecBole's order is exactly st2si's; the
   RecBole dataset is named `st2si_<domain>`, never `ml-100k`, which RecBole would swap for its own copy).
2. Each RecBole model trains in RecBole's own virtual environment (bench/setup_recbole.sh) through
   bench/recbole_runner.py until early stopping fires: `stopping_step 10` on valid NDCG@10,
   `train_batch_size 256`, `learning_rate 0.001`, at most 300 epochs, no wall-clock cap. Training
   state is saved after every epoch under --work, so a killed run resumes where it stopped; a finished
   run is reused. A model that reached the epoch cap without early stopping is "not converged" and
   no claim is made against it.
3. The split is proved identical: for every user, RecBole's test (and validation) target equals
   st2si's, and its input history equals st2si's history truncated to the newest 50 items. Any
   difference stops the run.
4. Every model's metrics (st2si's heads and RecBole's) come from `st2si_cli.metrics` on full-ranking
   ranks with pessimistic ties, history unmasked and again masked: NDCG@10, Recall@10, MRR (whole list),
   MRR@10. Paired per-user differences of NDCG@10 get a 95% bootstrap interval.

st2si rows: every head of the domain (or those given with --head), scored from the feature cache of
its backbone. "st2si_best" is the head with the best validation NDCG@10 (the choice never sees test);
"st2si_ilp" the paper-faithful ILP (random init, the authors' constant learning rate, no sweep) on the
default backbone.
Writes `<out>/<date>-<machine>-quality-<domain>.json`, updates `<out>/quality-summary.json`, prints the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, RESULTS_DIR, load_average, log, provenance, result_path, write_json
from bench.quality_recbole import (
    MAX_LEN,
    RECBOLE_MODELS,
    RECBOLE_SETTINGS,
    export_atomic,
    recbole_name,
    recbole_row,
    run_recbole,
)
from bench.quality_st2si import st2si_heads, st2si_row
from bench.quality_stats import bootstrap_ci, ndcg_gains, paired_diff
from bench.quality_tables import table, update_summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $ST2SI_HOME, else the user data dir)")
    ap.add_argument("--domain", required=True)
    ap.add_argument(
        "--models", default="sasrec,gru4rec", help="RecBole models, comma-separated ('' for none)"
    )
    ap.add_argument("--recbole-venv", default=str(BENCH_DIR / ".venv-recbole"))
    ap.add_argument(
        "--head", action="append", default=[], help="st2si head to score (repeat; default: all of the domain)"
    )
    ap.add_argument(
        "--compute-features",
        action="store_true",
        help="run a forward pass where a head's features are not cached (may take long)",
    )
    ap.add_argument("--device", default="cpu", help="device of that forward pass (cpu, cuda, cuda:N)")
    ap.add_argument("--seed", type=int, default=2020, help="RecBole seed")
    ap.add_argument(
        "--epoch-cap",
        type=int,
        default=RECBOLE_SETTINGS["epochs"],
        help="most RecBole epochs (smoke runs of the instrument only: a model stopped by the cap "
        "is printed NOT CONVERGED)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for RecBole (default: one per core; 1 is faster on a busy machine)",
    )
    ap.add_argument(
        "--check-splits",
        default="test,valid",
        help="which of RecBole's splits must be st2si's, user by user (test alone: only its test rows are "
        "compared, e.g. on a cold split where RecBole's validation leaves out some 3-item users)",
    )
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    ap.add_argument("--summary", default=None, help="summary file (default: <out>/quality-summary.json)")
    ap.add_argument("--tag", default=None, help="added to the result file name (e.g. smoke)")
    ap.add_argument(
        "--work",
        default=None,
        help="RecBole's files: resumable training state, logs, score matrices (default: bench/.work/<domain>)",
    )
    args = ap.parse_args()

    from st2si_cli import Zoo, load_dataset

    RECBOLE_SETTINGS["epochs"] = args.epoch_cap  # recorded in the result's settings
    t_start = time.time()
    prov = provenance()
    zoo = Zoo(args.zoo)
    dataset_art = zoo.get(args.domain, kind="dataset")
    ds = load_dataset(zoo, dataset_art.id)
    log(
        f"Dataset {args.domain}: {ds.n_users} users, {ds.n_items} items, "
        f"{sum(len(s) for s in ds.sequences)} interactions"
    )

    rows: list[dict[str, Any]] = []
    models = [RECBOLE_MODELS.get(m.strip().lower(), m.strip()) for m in args.models.split(",") if m.strip()]
    work = Path(args.work) if args.work else BENCH_DIR / ".work" / args.domain
    if models:
        python = Path(args.recbole_venv) / "bin" / "python"
        if not python.exists():
            raise SystemExit(
                f"no RecBole environment at {args.recbole_venv}: run `bash bench/setup_recbole.sh`"
            )
        name = recbole_name(args.domain)
        export_atomic(ds, work / "data", name)
        for model in models:
            out = work / model
            result = run_recbole(python, model, work / "data", name, ds.n_items, out, args.seed, args.threads)
            rows.append(recbole_row(ds, out, result, model, tuple(args.check_splits.split(","))))
            log(
                f"RecBole {model}: split identical to st2si's for all {ds.n_users} users (test and valid); "
                f"{rows[-1]['stopped']}"
            )

    heads = st2si_heads(zoo, args.domain, args.head)
    if not heads:
        log(f"No st2si head for {args.domain}: run `st2si adapt --domain {args.domain}` for the st2si rows")
    for head in heads:
        row = st2si_row(zoo, head, ds, dataset_art, args.device if args.compute_features else None)
        if row is not None:
            rows.append(row)

    baselines = [r for r in rows if r["source"] == "recbole"]
    for r in rows:
        r["ndcg_ci"] = bootstrap_ci(ndcg_gains(r["ranks"]))
        r["ndcg_ci_masked"] = bootstrap_ci(ndcg_gains(r["ranks_masked"]))
        if r["source"] == "st2si":
            r["diff"] = {b["method"]: paired_diff(r["ranks"], b["ranks"]) for b in baselines}
            r["diff_masked"] = {
                b["method"]: paired_diff(r["ranks_masked"], b["ranks_masked"]) for b in baselines
            }
    reference = next((b for b in baselines if b["method"] == "SASRec"), baselines[0] if baselines else None)
    texts = {"unmasked": table(rows, False, reference), "masked": table(rows, True, reference)}
    record = {
        "part": "quality",
        "domain": args.domain,
        "dataset": {
            "id": dataset_art.id,
            "users": ds.n_users,
            "items": ds.n_items,
            "interactions": sum(len(s) for s in ds.sequences),
        },
        "protocol": {
            "split": "leave-one-out (last = test, second to last = valid; valid item in the test input)",
            "ranking": "full, all items",
            "ties": "pessimistic",
            "mask_history": "both (unmasked, masked)",
            "metric_code": "st2si_cli.metrics",
            "recbole_max_len": MAX_LEN,
            "ci": "95% percentile bootstrap over users, 2000 resamples; differences paired per user",
        },
        "settings": {
            "models": models,
            "recbole": RECBOLE_SETTINGS,
            "seed": args.seed,
            "recbole_threads": args.threads,
        },
        "provenance": {
            **prov,
            "load_average_end": load_average(),
            "wall_seconds": round(time.time() - t_start, 1),
        },
        "rows": rows,
        "table": texts["unmasked"],
        "table_masked": texts["masked"],
    }
    for r in rows:  # per-user ranks (user order) as one string each: a list of ints takes a line per user
        for key in ("ranks", "ranks_masked"):
            r[key] = " ".join(map(str, r[key]))
    record["protocol"]["ranks"] = (
        "per row: space-separated 1-based test ranks, one per user in st2si user order"
    )
    out_dir = Path(args.out)
    path = write_json(result_path(out_dir, f"quality-{args.domain}", args.tag), record)
    summary_path = Path(args.summary) if args.summary else out_dir / "quality-summary.json"
    entry = update_summary(summary_path, args.domain, rows, record)
    print(
        f"\nQuality on {args.domain} ({ds.n_users} users, {ds.n_items} items; full ranking, pessimistic ties, "
        f"st2si_cli.metrics)\ncommand: {prov['command']}\n"
    )
    print("History unmasked:\n" + texts["unmasked"])
    print("\nHistory masked:\n" + texts["masked"])
    best = entry.get("st2si_best")
    if best and best.get("ratio_to_sasrec") is not None:
        print(
            f"\nst2si_best ({best['head']['name']}, chosen on validation) / converged SASRec NDCG@10: "
            f"{best['ratio_to_sasrec']:.3f}x; paired difference {best['ndcg10_diff_mean']:+.4f}, "
            f"95% CI ({best['ndcg10_diff_ci95'][0]:+.4f}, {best['ndcg10_diff_ci95'][1]:+.4f})"
        )
    elif reference is not None and not reference["converged"]:
        print(f"\n{reference['model']} did not converge: no claim against it.")
    print(f"\nwrote {path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
