"""Top-K tuning on a domain: one result file per K with test metrics, seconds per epoch, the activation
cache's size and time, next to the ILP head and the converged SASRec from the quality benchmark.

    python -m bench.top_layers --domain amazon-scientific --tune-layers 2,4 --threads 2 [--zoo ZOO]

For each K it runs `st2si pretrain --domain D --tune-layers K --json` (a child process, timed, peak RSS)
and writes `results/<date>-<machine>-top-layers-<domain>-k<K>.json` and a `.md` beside it. The ILP and
SASRec figures are read from `results/quality-summary.json` (same split, same metric code); a domain
missing there gets none. `--epochs` / `--patience` / `--lr` / `--batch-size` / `--precision` /
`--max-minutes` / `--init-head` / `--valid-every` / `--dropout` / `--lora` / `--head-lr` /
`--cache-dtype` / `--no-alignment` / `--no-multi-query` pass through (`--tag T` names the row: backbone `...-top<K>-T`, file `...-k<K>-T.json`);
a run not ended by early stopping on validation (the epoch cap or the clock ended it) is marked NOT
CONVERGED. The zoo must hold the domain's dataset; the first K builds its activation cache, a rerun
with the same K finds it (the file records which). With `--init-head` the report's ILP row is that
head (valid and test, from its zoo record), the weights top-K tuning started from.
`--render FILE.json` writes FILE.md again from a result file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS_DIR,
    format_table,
    load_average,
    provenance,
    result_path,
    run_timed,
    write_json,
)

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


def head_rows(zoo_dir: str | None, refs: list[str], domain: str | None = None) -> list[dict[str, Any]]:
    """Each starting head's name, ID and stored valid/test metrics (from its zoo record); with `domain`,
    also its per-user test ranks where the zoo holds its backbone's features (`test_ranks`, users in
    order: what the paired intervals of bench.tuning_summary need)."""
    from st2si_cli import HeadMeta, Zoo

    zoo = Zoo(zoo_dir)
    out = []
    for ref in refs:
        head = zoo.get(ref, kind="head")
        m = HeadMeta.of(head).metrics
        row = {
            "name": head.name,
            "id": head.id,
            "valid_ndcg10": m.valid.get("NDCG@10"),
            "ndcg10": m.test.get("NDCG@10"),
            "recall10": m.test.get("Recall@10"),
            "mrr": m.test.get("MRR"),
        }
        if domain is not None:
            row["test_ranks"] = _head_test_ranks(zoo, head, domain)
        out.append(row)
    return out


def _head_test_ranks(zoo: Any, head: Any, domain: str) -> str | None:
    from bench.quality_st2si import st2si_row
    from st2si_cli import load_dataset

    dataset_art = zoo.get(domain, kind="dataset")
    row = st2si_row(zoo, head, load_dataset(zoo, dataset_art.id), dataset_art, None)
    return " ".join(map(str, row["ranks"])) if row else None


def run_ranks(zoo_dir: str | None, run_id: str, domain: str) -> dict[str, str]:
    """The pretrain run's per-user valid and test ranks (its `ranks.json`), users in order."""
    from st2si_cli import Zoo

    zoo = Zoo(zoo_dir)
    art = zoo.get(run_id, kind="run")
    return json.loads(zoo.file(art, "ranks.json").read_text()).get(domain, {})


def one_run(args: argparse.Namespace, k: int) -> dict[str, Any]:
    argv = [sys.executable, "-m", "st2si_cli"] + (["--zoo", args.zoo] if args.zoo else [])
    argv += ["pretrain", "--domain", args.domain, "--tune-layers", str(k), "--json"]
    tag = f"-{args.tag}" if args.tag else ""
    argv += ["--out", f"{args.backbone}-st2si-{args.domain}-top{k}{tag}", "--backbone", args.backbone]
    flags = ("epochs", "patience", "lr", "batch_size", "precision", "max_minutes", "valid_every")
    for flag in (*flags, "dropout", "lora", "head_lr", "cache_dtype"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    for head in args.init_head:
        argv += ["--init-head", head]
    argv += [f"--{f.replace('_', '-')}" for f in ("no_alignment", "no_multi_query") if getattr(args, f)]
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
        "init_head_metrics": head_rows(args.zoo, args.init_head, args.domain),
        "ranks": run_ranks(args.zoo, res["run_id"], args.domain),
        "best_step": res.get("best_step"),
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
    metrics = ("ndcg10", "recall10", "mrr")
    valid = r.get("valid", {}).get("NDCG@10")
    rows = [[f"top-{r['tune_layers']} tuning", *(r["test"][k] for k in metrics), valid]]
    for h in r.get("init_head_metrics") or []:
        rows.append([f"its starting ILP head `{h['name']}`", *(h[k] for k in metrics), h["valid_ndcg10"]])
    ilp = base.get("st2si_ilp", {})
    rows.append(["paper-faithful ILP head (quality benchmark)", *(ilp.get(k) for k in metrics), None])
    rows.append(["SASRec (converged)", *(base.get("sasrec", {}).get(k) for k in metrics), None])
    lines = [
        f"# Top-{r['tune_layers']} tuning on {r['domain']} ({r['machine']}, {r['threads']} threads)",
        "",
        f"`{r['command']}` at {r['date']}, commit {r['git']['commit']} (dirty: {r['git']['dirty']}); "
        f"load average {r['load_average_start']} -> {r['load_average_end']}.",
        ""
        if r["converged"]
        else f"\n**NOT CONVERGED**: stopped by {r['stopped_by']}, not by early stopping on validation.\n",
        format_table(["model", "test NDCG@10", "Recall@10", "MRR", "valid NDCG@10"], rows),
        "",
        "Validation points (the best one's weights are the result):",
        "",
        format_table(
            ["epoch", "step in epoch", "global step", "train loss so far", "valid NDCG@10"], points(r)
        ),
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


def points(r: dict[str, Any]) -> list[list[Any]]:
    out = []
    for h in r.get("history", []):
        epoch = "start" if h["epoch"] == 0 else h["epoch"]
        step = h.get("step", "end") if not h.get("end", True) else "end"
        out.append([epoch, step, h["steps"], h["loss"], h["valid_NDCG@10"]])
    return out


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
    ap.add_argument("--valid-every", type=int, default=None, help="also validate every N steps")
    ap.add_argument("--dropout", type=float, default=None, help="dropout on the tuned layers' outputs")
    ap.add_argument("--lora", type=int, default=None, help="LoRA rank on the tuned layers")
    ap.add_argument("--head-lr", type=float, default=None, help="the ILP's own learning rate")
    ap.add_argument(
        "--cache-dtype", default=None, help="bf16 | fp32 (fp32: the final evaluation reads the cache)"
    )
    ap.add_argument("--no-alignment", action="store_true", help="histories only (no ID-alignment samples)")
    ap.add_argument("--no-multi-query", action="store_true", help="only the last query of each history")
    ap.add_argument("--tag", default=None, help="names this row's backbone and result file (...-k<K>-<tag>)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--render", type=Path, default=None, help="rewrite the .md of this result file and exit")
    args = ap.parse_args()
    if args.render is not None:
        record = json.loads(args.render.read_text())
        if (
            record.get("init_heads") and "init_head_metrics" not in record
        ):  # a file from before it was recorded
            record["init_head_metrics"] = head_rows(args.zoo, record["init_heads"])
        args.render.with_suffix(".md").write_text(markdown(record))
        return
    for k in (int(x) for x in args.tune_layers.split(",")):
        record = one_run(args, k)
        name = f"{args.domain}-k{k}" + (f"-{args.tag}" if args.tag else "")
        path = write_json(result_path(args.out_dir, "top-layers", name), record)
        path.with_suffix(".md").write_text(markdown(record))
        print(markdown(record))
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
