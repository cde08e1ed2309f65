"""The recipe (`st2si adapt --domain D`, no --head) against the converged RecBole SASRec and against the
in-tool ID-only recipe of the same size, with paired per-user confidence intervals.

    st2si --zoo ZOO adapt --domain D --json > RUN.json          # the recipe, as a user runs it
    python -m bench.recipe_quality --zoo ZOO --domain D --run RUN.json \\
        --baseline bench/results/2026-11-28-amd-epyc-2c-quality-D.json --command "st2si adapt --domain D"

The baseline file is the quality benchmark's record (`python -m bench.quality`) holding RecBole SASRec's
per-user test ranks on the same dataset (its ID is checked); its SASRec was trained to early stopping.
The recipe's heads are scored here with st2si's metric code on their cached features: the chosen head
(the best on validation among the stages) as `st2si_default`, the ensemble of its ID-only adapters as
`st2si_sasrec`. Test is read once, here, after the recipe chose on validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import log, provenance, result_path, write_json
from bench.quality_st2si import st2si_row
from bench.quality_stats import paired_diff


def sasrec_ranks(baseline: dict[str, Any]) -> list[int]:
    for row in baseline["rows"]:
        if row.get("source") == "recbole" and row.get("method") == "SASRec":
            if not row.get("converged"):
                raise SystemExit("the baseline SASRec did not converge: no claim against it")
            ranks = row["ranks"]
            return [int(r) for r in ranks.split()] if isinstance(ranks, str) else list(ranks)
    raise SystemExit("no RecBole SASRec row in the baseline file")


def summary_row(row: dict[str, Any], sasrec: list[int], sasrec_ndcg: float) -> dict[str, Any]:
    diff = paired_diff(row["ranks"], sasrec)
    return {
        "ndcg10": row["metrics"]["NDCG@10"],
        "recall10": row["metrics"]["Recall@10"],
        "valid_ndcg10": row["valid_metrics"]["NDCG@10"],
        "head": {"name": row["head"], "id": row["head_id"], "kind": row["kind"]},
        "ratio_to_sasrec": row["metrics"]["NDCG@10"] / sasrec_ndcg,
        "ndcg10_diff_mean": diff["mean"],
        "ndcg10_diff_ci95": diff["ci95"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--zoo", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--run", required=True, help="the `st2si adapt --domain D --json` output of the recipe")
    p.add_argument("--baseline", required=True, help="bench.quality's record with RecBole SASRec's ranks")
    p.add_argument("--command", required=True, help="the exact recipe command that made RUN")
    p.add_argument("--id-only-command", default=None, help="the command of the ID-only reference alone")
    p.add_argument("--summary", default="bench/results/quality-summary.json")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default=None, help="added to the result file's name (another run the same day)")
    args = p.parse_args(argv)

    from st2si_cli import Zoo, load_dataset

    zoo = Zoo(args.zoo)
    run = json.loads(Path(args.run).read_text())
    baseline = json.loads(Path(args.baseline).read_text())
    dataset_art = zoo.get(args.domain, kind="dataset")
    if dataset_art.id != baseline["dataset"]["id"]:
        raise SystemExit(
            f"dataset {dataset_art.id[:12]} is not the baseline's {baseline['dataset']['id'][:12]}"
        )
    ds = load_dataset(zoo, dataset_art.id)
    sasrec = sasrec_ranks(baseline)
    sasrec_ndcg = float(
        next(r for r in baseline["rows"] if r.get("method") == "SASRec")["metrics"]["NDCG@10"]
    )
    chosen = zoo.get(run["chosen"]["id"], kind="head")
    reference = zoo.get(run["id_only_reference"]["id"], kind="head")
    rows = {
        name: st2si_row(zoo, head, ds, dataset_art, None)
        for name, head in (("default", chosen), ("id_only", reference))
    }
    for name, row in rows.items():
        if row is None:
            raise SystemExit(f"no cached features for the {name} head")
    default = summary_row(rows["default"], sasrec, sasrec_ndcg)
    vs_id_only = paired_diff(rows["default"]["ranks"], rows["id_only"]["ranks"])
    default.update(
        command=args.command,
        train_seconds=run["train_seconds"],
        features_seconds=run["features_pass_seconds"],
        train_over_features=run["train_seconds"] / run["features_pass_seconds"]
        if run.get("features_pass_seconds")
        else None,
        ratio_vs_id_only=rows["default"]["metrics"]["NDCG@10"] / rows["id_only"]["metrics"]["NDCG@10"],
        diff_vs_id_only_mean=vs_id_only["mean"],
        diff_vs_id_only_ci95=vs_id_only["ci95"],
        lm_over_id_only_valid=run.get("lm_over_id_only_valid"),
        stages=[
            {k: s.get(k) for k in ("stage", "status", "head", "valid_ndcg10", "seconds")}
            for s in run["stages"]
        ],
        plan=run.get("plan"),
    )
    id_only = summary_row(rows["id_only"], sasrec, sasrec_ndcg)
    id_only["command"] = args.id_only_command or (
        f"{args.command}  (the stage {reference.name}: the ensemble of the recipe's ID-only adapters, "
        "the same adapters as in st2si_default)"
    )
    record = {
        "part": "recipe-quality",
        "domain": args.domain,
        "dataset": baseline["dataset"],
        "baseline": {"file": args.baseline, "sasrec_ndcg10": sasrec_ndcg},
        "protocol": baseline["protocol"],
        "provenance": provenance(),
        "st2si_default": default,
        "st2si_sasrec": id_only,
        "ranks": {
            "st2si_default": " ".join(map(str, rows["default"]["ranks"])),
            "st2si_sasrec": " ".join(map(str, rows["id_only"]["ranks"])),
        },
    }
    path = write_json(result_path(Path(args.out), f"recipe-{args.domain}", args.tag), record)
    summary_path = Path(args.summary)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    entry = summary.setdefault(args.domain, {})
    entry["st2si_default"] = {**default, "result_file": str(path)}
    entry["st2si_sasrec"] = {**id_only, "result_file": str(path)}
    write_json(summary_path, summary)
    log(
        f"{args.domain}: st2si_default {default['ndcg10']:.4f} = {default['ratio_to_sasrec']:.3f}x SASRec "
        f"(diff {default['ndcg10_diff_mean']:+.4f}, CI {default['ndcg10_diff_ci95'][0]:+.4f}..{default['ndcg10_diff_ci95'][1]:+.4f}); "
        f"st2si_sasrec {id_only['ndcg10']:.4f} = {id_only['ratio_to_sasrec']:.3f}x; default vs ID-only "
        f"{default['ratio_vs_id_only']:.3f}x (diff {vs_id_only['mean']:+.4f}, CI {vs_id_only['ci95'][0]:+.4f}..{vs_id_only['ci95'][1]:+.4f}); "
        f"train {default['train_seconds']:.0f}s, features {default['features_seconds']}s"
    )
    log(f"wrote {path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
