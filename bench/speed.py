"""Speed and cost as ratios whose numerator and denominator are timed interleaved (A B A B ...) in one run.

    python -m bench.speed --domain amazon-scientific --backbone smollm2-135m --users 40 --rounds 3
    python -m bench.speed --domain amazon-scientific --quick            # 12 users, 2 rounds, 2 epochs
    python -m bench.speed --million 1000000 --million-only              # the million-item catalog (tiny-opt)

Every round runs each measurement once, in the same order, so machine load falls on numerator and
denominator alike; a ratio is reported from the medians and from the minima of its rounds, and names
what it divides. Measurements of one round:

- gemm: one round of F.linear over the backbone's own linear shapes (M = --gemm rows, bf16);
- forward / forward_plain: one pass over the subset's samples (histories + ID-alignment samples, as
  `adapt` runs them) through the packed forward (model/fast.py) and through plain transformers;
- adapt_cli: `st2si adapt` end to end (process start, loads, feature pass, ILP epochs) in a fresh zoo;
- adapt_cached / adapt_inloop: whole adapt in this process (backbone loaded once, outside the timing):
  feature pass + ILP epochs, against ILP epochs with the frozen backbone in the loop, which runs each
  sample once per epoch as the authors' loop does (`LiveFeatures`); same epochs, both with test NDCG@10;
- recommend / forward_recommend: the `recommend` library call (loads backbone and head) against a bare
  forward pass over the same users' inputs; `st2si recommend` end to end with its time to the first line.

FLOPs per token = 2 x non-embedding parameters + causal attention FLOPs (4 x position x heads x head_dim
per layer, averaged over the real tokens); forward_vs_gemm_roofline = the forward's FLOP rate on real
tokens over the GEMM's FLOP rate.

Everything runs on a subset of N users (--users, fixed seed) and the items they use, in scratch zoos that
are removed afterwards; the zoo given is only read. Writes `<out>/<date>-<machine>-speed-<domain>.json`
and merges its headline figures, each with the command that made it, into `<out>/speed-summary.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, load_average, provenance, result_path, write_json
from bench.speed_rounds import measure

SUMMARY = "speed-summary.json"


# ---- summary and table -----------------------------------------------------------------------------------------


def merge_summary(path: Path, figures: dict[str, Any], prov: dict[str, Any], note: str) -> None:
    """Update `path` with this run's figures, each stamped with the command, date, machine and load."""
    summary = json.loads(path.read_text()) if path.exists() else {}
    stamp = {
        "command": prov["command"],
        "date": prov["date"],
        "machine": prov["machine"],
        "git": prov.get("git"),
        "load_average_start": prov.get("load_average_start"),
        "load_average_end": load_average(),
        "note": note,
    }
    for key, value in figures.items():
        summary[key] = {**value, **stamp} if isinstance(value, dict) else {"value": value, **stamp}
    write_json(path, dict(sorted(summary.items())))


def headline(record: dict[str, Any]) -> dict[str, Any]:
    """The summary's figures from a run record: each ratio's median (its minimum beside it)."""
    out: dict[str, Any] = {}
    for key, r in record.get("ratios", {}).items():
        out[key] = {"value": round(r["median"], 3), "min_ratio": round(r["min"], 3),
                    "numerator": r["numerator"], "denominator": r["denominator"], "scope": record["scope"]}  # fmt: skip
        for extra in ("test_ndcg10_inloop", "test_ndcg10_cached", "inloop_passes_per_epoch"):
            if extra in r:
                out[key][extra] = r[extra]
    if "first_line_seconds" in record:
        fl = record["first_line_seconds"]
        out["first_line_seconds"] = {"value": round(fl["median"], 2), "min": round(fl["min"], 2),
                                     "what": "st2si recommend: process start to the first output line",
                                     "scope": record["scope"]}  # fmt: skip
    if "million_items" in record:
        out["million_items"] = record["million_items"]["summary"]
    return out


def speed_table(record: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for key, r in record.get("ratios", {}).items():
        rows.append([key, f"{r['median']:.3f}", f"{r['min']:.3f}", r["numerator"], r["denominator"]])
        if "test_ndcg10_inloop" in r:
            rows.append(["  test NDCG@10 in the loop / cached", "", "",
                         str(r["test_ndcg10_inloop"]), str(r["test_ndcg10_cached"])])  # fmt: skip
    if "first_line_seconds" in record:
        fl = record["first_line_seconds"]
        rows.append(["first_line_seconds", f"{fl['median']:.2f}", f"{fl['min']:.2f}", "st2si recommend", ""])
    if "million_items" in record:
        m = record["million_items"]["summary"]
        for k in ("peak_rss_gb", "epoch_seconds", "topk_ms_per_user"):
            rows.append([f"million_items.{k}", m[k], "", m["backbone"], ""])
    return format_table(["measure", "median", "min", "numerator", "denominator"], rows)


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--zoo", default=None, help="zoo folder (read only; default: $ST2SI_HOME, else the user data dir)"
    )
    ap.add_argument(
        "--domain", default=None, help="dataset of the zoo for the ratios (omit with --million-only)"
    )
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--users", type=int, default=40, help="users in the subset the ratios run on")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement")
    ap.add_argument(
        "--epochs", type=int, default=2, help="ILP epochs of every adapt (cached and in the loop)"
    )
    ap.add_argument("--max-items", type=int, default=50, help="newest history items kept (adapt --max-items)")
    ap.add_argument("--gemm", type=int, default=2048, help="M (rows) of the model-shape GEMMs")
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads here and OMP_NUM_THREADS of the CLI runs"
    )
    ap.add_argument("--skip-live", action="store_true", help="skip adapt with the backbone in the loop")
    ap.add_argument("--quick", action="store_true", help="12 users, 2 rounds, 2 epochs: minutes, not an hour")
    ap.add_argument(
        "--million", type=int, default=0, help="also run the synthetic catalog of this many items"
    )
    ap.add_argument("--million-users", type=int, default=2000, help="users of the synthetic catalog")
    ap.add_argument("--million-backbone", default="tiny-opt")
    ap.add_argument(
        "--million-alignment",
        action="store_true",
        help="train the ILP on the N ID-alignment rows too (adapt caches them either way)",
    )
    ap.add_argument("--million-only", action="store_true", help="only the synthetic catalog")
    ap.add_argument(
        "--note", default="", help="recorded with every figure (e.g. what else loaded the machine)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()
    if args.quick:
        args.users, args.rounds, args.epochs = min(args.users, 12), min(args.rounds, 2), 2
    if not args.million_only and not args.domain:
        ap.error("--domain is required unless --million-only")

    from st2si_cli import Zoo, quiet_transformers

    quiet_transformers()
    t_start = time.time()
    prov = provenance()
    record: dict[str, Any] = {
        "part": "speed",
        "domain": args.domain,
        "backbone": args.backbone,
        "threads": args.threads,
    }
    main_zoo = Zoo(args.zoo)
    if not args.million_only:
        record.update(measure(args, main_zoo))
    if args.million or args.million_only:
        from bench.million import million_items

        n, users, bb = args.million or 1_000_000, args.million_users, args.million_backbone
        record["million_items"] = million_items(n, users, bb, args.threads, args.seed, args.million_alignment)
    record["provenance"] = {
        **prov,
        "load_average_end": load_average(),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    record["note"] = args.note
    table = speed_table(record)
    record["table"] = table
    out = Path(args.out)
    part = f"speed-{args.domain}" if not args.million_only else "speed-million"
    path = write_json(result_path(out, part, args.tag), record)
    merge_summary(out / SUMMARY, headline(record), prov, args.note)
    print(f"\ncommand: {prov['command']}\n{record.get('scope', '')}\n")
    print(table)
    print(f"\nwrote {path} and {out / SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
