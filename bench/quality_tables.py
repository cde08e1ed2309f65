"""The quality benchmark's tables and summary: a markdown table per masking, and one entry per dataset in
quality-summary.json (the converged baselines, the paper ILP, the head chosen on validation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import format_table, write_json
from bench.quality_stats import metric_key
from st2si_cli import DEFAULT_BACKBONE


def status(r: dict[str, Any]) -> str:
    if r["source"] == "st2si":
        if r["kind"] == "fusion":
            return f"fusion, w = {(r.get('sweep') or {}).get('w')} (valid)"
        return f"best epoch {r.get('best_epoch')} of {r.get('epochs_run')}"
    if r["converged"]:
        return f"converged: early stop at {r['epochs_run']}, best {r['best_epoch']}"
    return f"NOT CONVERGED ({r['epochs_run']} epochs, cap {r['epoch_cap']}): no claim"


def table(rows: list[dict[str, Any]], masked: bool, reference: dict[str, Any] | None) -> str:
    headers = [
        "model",
        "valid NDCG@10",
        "NDCG@10",
        "Recall@10",
        "MRR",
        "MRR@10",
        "NDCG@10 95% CI",
        f"diff vs {reference['model'] if reference else '-'} (95% CI)",
        "training",
    ]
    body = []
    for r in rows:
        m = r[metric_key(masked)]
        ci = r.get("ndcg_ci_masked" if masked else "ndcg_ci")
        diff = (
            (r.get("diff_masked" if masked else "diff") or {}).get(reference["method"]) if reference else None
        )
        valid = (r.get("valid_metrics") or {}).get("NDCG@10")
        body.append(
            [
                r["model"],
                None if valid is None else f"{valid:.4f}",
                m.get("NDCG@10"),
                m.get("Recall@10"),
                m.get("MRR"),
                m.get("MRR@10"),
                f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else None,
                f"{diff['mean']:+.4f} ({diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f})" if diff else None,
                status(r),
            ]
        )
    return format_table(headers, body)


def summary_entry(r: dict[str, Any], sasrec: dict[str, Any] | None) -> dict[str, Any]:
    m = r["metrics"]
    entry: dict[str, Any] = {
        "ndcg10": m["NDCG@10"],
        "recall10": m["Recall@10"],
        "mrr": m["MRR"],
        "valid_ndcg10": (r.get("valid_metrics") or {}).get("NDCG@10"),
        "history_masked": {
            "ndcg10": r["metrics_masked"]["NDCG@10"],
            "recall10": r["metrics_masked"]["Recall@10"],
            "mrr": r["metrics_masked"]["MRR"],
        },
    }
    if r["source"] == "recbole":
        entry.update(
            early_stopped=r["early_stopped"],
            epochs=r["epochs_run"],
            best_epoch=r["best_epoch"],
            train_seconds=r["train_seconds"],
        )
    else:
        entry.update(
            head={
                "name": r["head"],
                "id": r["head_id"],
                "kind": r["kind"],
                "train": r["train"],
                "sweep_chosen": r["sweep"],
                "text": r["text"],
                "backbone": r["backbone"],
            }
        )
        if sasrec is not None:
            entry["ndcg10_diff_ci95"] = r["diff"]["SASRec"]["ci95"]
            entry["ndcg10_diff_mean"] = r["diff"]["SASRec"]["mean"]
            entry["history_masked"]["ndcg10_diff_ci95"] = r["diff_masked"]["SASRec"]["ci95"]
            entry["ratio_to_sasrec"] = (
                m["NDCG@10"] / sasrec["metrics"]["NDCG@10"]
                if sasrec["converged"] and sasrec["metrics"]["NDCG@10"] > 0
                else None
            )
    return entry


def update_summary(
    path: Path, key: str, rows: list[dict[str, Any]], record: dict[str, Any]
) -> dict[str, Any]:
    """One object per dataset in quality-summary.json: the converged baselines, the paper ILP, the best head."""
    by_method = {r["method"]: r for r in rows if r["source"] == "recbole"}
    sasrec = by_method.get("SASRec")
    st2si = [r for r in rows if r["source"] == "st2si"]
    entry: dict[str, Any] = {
        "dataset": record["dataset"],
        "protocol": record["protocol"],
        "command": record["provenance"]["command"],
        "date": record["provenance"].get("date"),
        "git": record["provenance"].get("git"),
        "selection": "st2si_best = the st2si head with the best validation NDCG@10; test reported once",
    }
    for name, method in (("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        if method in by_method:
            entry[name] = summary_entry(by_method[method], None)
    # the paper's ILP on the default backbone (another backbone's paper-settings ILP is a row, not this entry)
    paper = sorted((r for r in st2si if r["paper_ilp"]), key=lambda r: r["backbone"] != DEFAULT_BACKBONE)
    if paper:
        entry["st2si_ilp"] = summary_entry(paper[0], sasrec)
    if st2si:
        best = max(st2si, key=lambda r: (r["valid_metrics"]["NDCG@10"], r is paper[0] if paper else False))
        entry["st2si_best"] = summary_entry(best, sasrec)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[key] = entry
    write_json(path, dict(sorted(summary.items())))
    return entry
