"""Top-K tuning on a domain: one result file per K with test metrics, seconds per epoch, the activation
cache's size and time, next to the ILP head and the converged SASRec from the quality benchmark.

    python bench/top_layers.py --domain amazon-scientific --tune-layers 2,4 --threads 2 [--zoo ZOO]

For each K it runs `st2si pretrain --domain D --tune-layers K --json` (a child process, timed, peak RSS)
and writes `results/<date>-<machine>-top-layers-<domain>-k<K>.json` and a `.md` beside it. The ILP and
SASRec figures are read from `results/quality-summary.json` (same split, same metric code); a domain
missing there gets none. `--epochs` / `--patience` / `--lr` / `--batch-size` / `--precision` /
`--max-minutes` / `--init-head` pass through; a run not ended by early stopping on validation (the
epoch cap or the clock ended it) is marked NOT CONVERGED. The zoo must hold the domain's dataset; the first K builds its activation
cache, a rerun with the same K finds it (the file records which).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, load_average, provenance, result_path, run_timed, write_json  # noqa: E402

PAPER = {
    "amazon-scientific": {"full_ndcg10": 0.1147, "ilp_ndcg10": 0.0961}
}  # the paper's Table 2 (Scientific)


def baselines(domain: str) -> dict[str, Any]:
    """The ILP head and SASRec rows of the quality benchmark for `domain`, if it was measured."""
    path = RESULTS_DIR / "quality-summary.json"
    if not path.exists():
        return {}
    summary = json.loads(path.read_text()).get(domain)
    if summary is None:
        return {}
    pick = ("ndcg10", "recall10", "mrr", "train_seconds", "epochs", "best_epoch", "early_stopped")
    return {
        "source": str(path.relative_to(RESULTS_DIR.parent.parent)),
        "source_command": summary.get("command"),
        "source_git": summary.get("git"),
        "sasrec": {k: summary["sasrec"].get(k) for k in pick if k in summary.get("sasrec", {})},
        "st2si_ilp": {k: summary["st2si_ilp"].get(k) for k in pick if k in summary.get("st2si_ilp", {})},
    }


def one_run(args: argparse.Namespace, k: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "st2si_cli"] + (["--zoo", args.zoo] if args.zoo else [])
    argv += ["pretrain", "--domain", args.domain, "--tune-layers", str(k), "--json"]
    argv += ["--out", f"{args.backbone}-st2si-{args.domain}-top{k}", "--backbone", args.backbone]
    for flag in ("epochs", "patience", "lr", "batch_size", "precision", "max_minutes"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for head in args.init_head:
        argv += ["--init-head", head]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ST2SI_NO_PROGRESS": "1"}
    prov = provenance()
    timed = run_timed(argv, env=env, cwd=RESULTS_DIR.parent.parent)
    res = json.loads(timed.stdout.splitlines()[0])  # one line per domain's head; one domain here
    t = res["timings"]
    history_epochs = t["epochs"]
    converged = res["early_stopped"]  # early stopping fired, not the epoch cap or the clock
    test = res["metrics"]  # the test split's metrics (`pretrain --json` prints the shape of adapt and eval)
    base = baselines(args.domain)
    sasrec = base.get("sasrec", {}).get("ndcg10")
    return {
        **prov,
        "load_average_end": load_average(),
        "domain": args.domain,
        "backbone": args.backbone,
        "tune_layers": k,
        "threads": args.threads,
        "converged": converged,
        "test": {"ndcg10": test["NDCG@10"], "recall10": test["Recall@10"], "mrr": test["MRR"]},
        "valid": res["valid"],
        "best_epoch": res["best_epoch"],
        "stopped_by": res["stopped_by"],
        "history": res["history"],
        "init_heads": args.init_head,
        "precision": args.precision or "auto",
        "epochs": history_epochs,
        "seconds_per_epoch": t["epoch_seconds"],
        "train_seconds": t["train_seconds"],
        "total_seconds": t["total_seconds"],
        "activation_cache": t.get("activation_cache"),
        "ratio_to_sasrec": test["NDCG@10"] / sasrec if sasrec else None,
        "baselines": base,
        "paper": PAPER.get(args.domain),
        "run": {"name": res["run"], "id": res["run_id"], "backbone": res["backbone"]},
        "child": timed.record(),
    }


def markdown(r: dict[str, Any]) -> str:
    cache = r["activation_cache"] or {}
    base = r["baselines"]
    rows = [
        [f"top-{r['tune_layers']} tuning", r["test"]["ndcg10"], r["test"]["recall10"], r["test"]["mrr"]],
        ["ILP head", *(base.get("st2si_ilp", {}).get(k) for k in ("ndcg10", "recall10", "mrr"))],
        ["SASRec (converged)", *(base.get("sasrec", {}).get(k) for k in ("ndcg10", "recall10", "mrr"))],
    ]
    lines = [
        f"# Top-{r['tune_layers']} tuning on {r['domain']} ({r['machine']}, {r['threads']} threads)",
        "",
        f"`{r['command']}` at {r['date']}, commit {r['git']['commit']} (dirty: {r['git']['dirty']}); "
        f"load average {r['load_average_start']} -> {r['load_average_end']}.",
        ""
        if r["converged"]
        else f"\n**NOT CONVERGED**: stopped by {r['stopped_by']}, not by early stopping on validation.\n",
        format_table(["model", "test NDCG@10", "Recall@10", "MRR"], rows),
        "",
        f"- seconds per epoch: {r['seconds_per_epoch']}; {r['epochs']} epochs, best {r['best_epoch']}; "
        f"{r['total_seconds']} s in all; peak RSS {r['child']['peak_rss_mb']} MB",
        (
            f"- activation cache: {cache['bytes'] / 1e6:.1f} MB {cache['dtype']}, {cache['tokens']} tokens "
            f"({cache['tokens_stored']} stored), built in {cache['seconds']} s"
            + (" (found in the zoo by this run)" if cache["reused"] else "")
            if cache
            else "- no activation cache (full tuning)"
        ),
        f"- NDCG@10 / converged SASRec: {r['ratio_to_sasrec']:.3f}" if r["ratio_to_sasrec"] else "",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", default="amazon-scientific")
    ap.add_argument("--tune-layers", default="2,4", help="comma-separated K values")
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--zoo", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--patience", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument(
        "--precision", default=None, help="fp32 | bf16 (bf16: packed activation pass, bf16 autocast)"
    )
    ap.add_argument(
        "--max-minutes", type=float, default=None, help="stop after the epoch passing this budget"
    )
    ap.add_argument("--init-head", action="append", default=[], help="ILP head the ILP starts from")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args()
    for k in (int(x) for x in args.tune_layers.split(",")):
        record = one_run(args, k)
        path = write_json(result_path(args.out_dir, "top-layers", f"{args.domain}-k{k}"), record)
        path.with_suffix(".md").write_text(markdown(record))
        print(markdown(record))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
