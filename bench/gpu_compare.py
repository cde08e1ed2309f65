"""GPU runs next to the CPU ones: one table on the same split, with paired intervals against the baselines.

    python -m bench.gpu_compare --gpu-record gpu-real-amazon-scientific.json \\
        --gpu-quality 2026-11-28-intel-xeon-16c-quality-amazon-scientific-gpu.json \\
        --run init.json --baselines bench/results/2026-11-28-amd-epyc-2c-quality-amazon-scientific.json \\
        --top bench/results/2026-11-28-amd-epyc-2c-top-layers-amazon-scientific-k2.json --name gpu-full

`--gpu-record` is what `bench/gpu_real.py` wrote on the GPU machine, `--gpu-quality` the per-user test ranks
its `quality` step wrote there, `--run` (repeatable) the JSON of other `st2si pretrain --json` runs made on
the same machine, `--baselines` the quality benchmark of the same domain on the CPU (RecBole SASRec and
GRU4Rec trained to early stopping, st2si's heads), `--top` (repeatable) `bench/top_layers.py` results.

The split must be the same: the dataset IDs of both quality files are compared (the ID hashes the prepared
interactions), and so are the user counts. Paired per-user differences of NDCG@10 and their 95% bootstrap
intervals use `bench/quality_stats.py`'s code, for rows that have per-user ranks. The st2si heads of the CPU
benchmark in the table are the paper's ILP, the best ILP and `st2si_best` (best validation). Writes
`<out>/<date>-<gpu machine>-<name>-<domain>.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, format_table, write_json
from bench.quality_stats import paired_diff
from st2si_cli import DEFAULT_BACKBONE


def _ranks(row: dict[str, Any], key: str = "ranks") -> list[int]:
    r = row[key]
    return [int(x) for x in r.split()] if isinstance(r, str) else list(r)


def _sanitize(text: str, paths: dict[str, str] | None = None) -> str:
    """Scratch folders of the lent machine out of recorded commands: the record's own zoo, output and data
    paths (`paths`: placeholder -> path), then the temporary folders older records used."""
    for name, path in sorted((paths or {}).items(), key=lambda kv: -len(kv[1])):
        text = text.replace(path.rstrip("/"), name)
    text = re.sub(r"/tmp/st2si-gpu-zoo-\w+", "ZOO", text)
    text = re.sub(r"\S*/bench/", "bench/", text)
    text = re.sub(r"/tmp/gpu/data/", "DATA/", text)
    text = re.sub(r"/tmp/gpu/", "", text)
    return re.sub(r"/root/out\b", "OUT", text)


def _row(name: str, where: str, valid: Any, test: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": name,
        "where": where,
        "valid_ndcg10": valid,
        "ndcg10": test.get("NDCG@10"),
        "recall10": test.get("Recall@10"),
        "mrr": test.get("MRR"),
        **extra,
    }


class References:
    """The converged RecBole baselines of the quality file, and paired differences against them."""

    def __init__(self, base: dict[str, Any]):
        by_model = {r["model"]: r for r in base["rows"]}
        self.refs = {"SASRec": by_model["RecBole SASRec"], "GRU4Rec": by_model["RecBole GRU4Rec"]}
        for r in self.refs.values():
            if not r.get("early_stopped"):
                raise SystemExit(
                    f"{r['model']} did not stop early: not converged, no claim is made against it"
                )

    def diffs(self, row: dict[str, Any]) -> dict[str, Any]:
        """Per-user NDCG@10 of `row` minus each baseline's, history unmasked and masked."""
        out = {}
        for key, masked in (("ranks", ""), ("ranks_masked", "_masked")):
            for name, ref in self.refs.items():
                out[f"vs_{name}{masked}"] = paired_diff(_ranks(row, key), _ranks(ref, key))
        return out

    def rows(self) -> list[dict[str, Any]]:
        return [
            _row(
                f"RecBole {name}",
                "CPU (2 cores)",
                r["valid_metrics"].get("NDCG@10"),
                r["metrics"],
                {"training": f"early stop at epoch {r['epochs_run']}, best {r['best_epoch']}"},
            )
            for name, r in self.refs.items()
        ]


def cpu_rows(
    base: dict[str, Any], refs: References, backbone: str, top_files: list[str]
) -> list[dict[str, Any]]:
    """The paper's ILP, the best ILP and st2si_best of the CPU benchmark among the heads on `backbone` (the
    one the GPU run started from), then the top-K results."""
    st2si = [r for r in base["rows"] if r.get("source") == "st2si" and r.get("backbone") == backbone]
    paper = next(r for r in st2si if r.get("paper_ilp"))
    best_ilp = max((r for r in st2si if r["kind"] == "ilp"), key=lambda r: r["valid_metrics"]["NDCG@10"])
    best = max(st2si, key=lambda r: r["valid_metrics"]["NDCG@10"])
    rows = [
        _row(
            f"st2si {label} [{r['head']}]",
            f"CPU (2 cores), frozen {backbone}",
            r["valid_metrics"]["NDCG@10"],
            r["metrics"],
            {"diff": refs.diffs(r), "training": r.get("training") or f"best epoch {r.get('best_epoch')}"},
        )
        for label, r in (
            ("ILP, paper settings", paper),
            ("ILP, best on valid", best_ilp),
            ("best on valid (st2si_best)", best),
        )
    ]
    for path in top_files:
        t = json.loads(Path(path).read_text())
        start = ", ".join(t.get("init_heads") or ["a random ILP"])
        test = {"NDCG@10": t["test"]["ndcg10"], "Recall@10": t["test"]["recall10"], "MRR": t["test"]["mrr"]}
        training = f"{t['epochs']} epochs, {t['seconds_per_epoch']:.0f} s each; stopped by {t['stopped_by']}"
        rows.append(
            _row(
                f"st2si top-{t['tune_layers']} tuning (from {start})",
                "CPU (2 cores)",
                t["valid"]["NDCG@10"],
                test,
                {"training": training, "source": Path(path).name},
            )
        )
    return rows


def gpu_rows(
    record: dict[str, Any], gq: dict[str, Any], refs: References, runs: list[tuple[str, str | None]]
) -> list[dict[str, Any]]:
    """Rows of the GPU machine: the heads with per-user ranks, its ILP steps, and other pretrain runs."""
    gpu, paths = record["environment"].get("gpu", "GPU"), record.get("paths")
    rows = [
        _row(
            f"st2si full tuning [{g['head']}]",
            gpu,
            g["valid_metrics"]["NDCG@10"],
            g["metrics"],
            {
                "diff": refs.diffs(g),
                "training": f"best epoch {g['best_epoch']} of {len(g.get('history') or [])}",
            },
        )
        for g in gq["rows"]
    ]
    for step in record["steps"]:
        if step.get("step") in ("ilp", "trim", "attrs") and step.get("returncode") == 0:
            o = step["output"][0]
            extra = {
                "training": f"best epoch {o.get('best_epoch')}",
                "command": _sanitize(step["command"], paths),
            }
            rows.append(
                _row(
                    f"st2si {step['step']} [{o['head']}]",
                    f"{gpu}, frozen backbone",
                    o["valid"]["NDCG@10"],
                    o["metrics"],
                    extra,
                )
            )
    for path, command in runs:
        o = json.loads(Path(path).read_text().splitlines()[0])
        first = o["history"][0] if o.get("history") else {}
        start = f"start valid {first['valid_NDCG@10']:.4f}; " if first.get("epoch") == 0 else ""
        extra = {
            "training": f"{start}best epoch {o['best_epoch']}, stopped by {o['stopped_by']}",
            "history": o.get("history"),
            "timings": o.get("timings"),
            "command": command,
        }
        rows.append(_row(f"st2si full tuning [{o['head']}]", gpu, o["valid"]["NDCG@10"], o["metrics"], extra))
    return rows


def tables(rows: list[dict[str, Any]], record: dict[str, Any], full_record: dict[str, Any]) -> dict[str, str]:
    """The comparison, full tuning epoch by epoch, and the GPU machine's steps, as markdown."""
    comparison = format_table(
        [
            "model",
            "where",
            "valid NDCG@10",
            "test NDCG@10",
            "Recall@10",
            "MRR",
            "x SASRec",
            "diff vs SASRec (95% CI)",
        ],
        [
            [
                r["model"],
                r["where"],
                f"{r['valid_ndcg10']:.4f}" if r.get("valid_ndcg10") is not None else "-",
                f"{r['ndcg10']:.4f}",
                f"{r['recall10']:.4f}",
                f"{r['mrr']:.4f}",
                f"{r['ratio_to_sasrec']:.2f}",
                _ci(r),
            ]
            for r in rows
        ],
    )
    epochs = format_table(
        ["epoch", "train loss", "valid NDCG@10", "valid Recall@10", "train s", "valid s"],
        [
            [
                h["epoch"],
                f"{h['loss']:.4f}",
                f"{h['valid_NDCG@10']:.4f}",
                f"{h['valid_Recall@10']:.4f}",
                f"{h['train_seconds']:.1f}",
                f"{h['valid_seconds']:.1f}",
            ]
            for h in full_record.get("history", [])
            if h.get("end", True)
        ],
    )
    steps = format_table(
        ["step", "seconds", "exit", "command"],
        [
            [
                s["step"],
                f"{s['seconds']:.1f}" if "seconds" in s else "-",
                s.get("returncode", s.get("skipped", "-")),
                _sanitize(s.get("command", ""), record.get("paths")),
            ]
            for s in record["steps"]
        ],
    )
    return {"comparison": comparison, "full_tuning_epochs": epochs, "steps": steps}


def markdown(result: dict[str, Any], notes: list[str]) -> str:
    env, t, full = result["environment"], result["tables"], result["full_tuning"]
    gpu, ds = env.get("gpu", "GPU"), result["dataset"]
    md = [
        f"# Full tuning on a GPU ({gpu}) next to the CPU runs: {result['domain']}",
        "",
        f"command: `{result['command']}`",
        "",
        f"GPU run: `{result['gpu_command']}`",
        "",
        f"Machine: {gpu} ({env.get('gpu_memory_gb')} GB), {env.get('cpu_count')} CPU cores, Python "
        f"{env.get('python')}, torch {env.get('torch')}, transformers {env.get('transformers')}. "
        f"Same dataset as the CPU baselines (ID {ds['id'][:12]}, {ds['users']} users). "
        "Test, full ranking, pessimistic ties, history unmasked; intervals are paired per user (bootstrap).",
        "",
        t["comparison"],
        "",
        f"Full tuning, epoch by epoch (stopped by {full.get('stopped_by')}; best epoch {full.get('best_epoch')}):",
        "",
        t["full_tuning_epochs"],
        "",
        "Steps on the GPU machine:",
        "",
        t["steps"],
        "",
    ]
    if notes:
        md += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(md)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-record", required=True)
    ap.add_argument("--gpu-quality", required=True)
    ap.add_argument("--run", action="append", default=[], help="`st2si pretrain --json` output (repeat)")
    ap.add_argument("--run-command", action="append", default=[], help="the command of each --run, in order")
    ap.add_argument("--baselines", required=True)
    ap.add_argument("--top", action="append", default=[], help="bench/top_layers.py result (repeat)")
    ap.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help="the backbone the GPU run started from (its CPU heads are shown)",
    )
    ap.add_argument("--name", default="gpu-full")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (repeat)")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()

    record = json.loads(Path(args.gpu_record).read_text())
    gq = json.loads(Path(args.gpu_quality).read_text())
    base = json.loads(Path(args.baselines).read_text())
    if gq["dataset"]["id"] != base["dataset"]["id"] or gq["dataset"]["users"] != base["dataset"]["users"]:
        raise SystemExit(
            f"different datasets: {gq['dataset']} on the GPU, {base['dataset']} in the baselines; no comparison"
        )
    refs = References(base)
    commands = args.run_command + [None] * (len(args.run) - len(args.run_command))
    rows = refs.rows() + cpu_rows(base, refs, args.backbone, args.top)
    rows += gpu_rows(record, gq, refs, list(zip(args.run, commands, strict=True)))
    sasrec = refs.refs["SASRec"]["metrics"]["NDCG@10"]
    for r in rows:
        r["ratio_to_sasrec"] = r["ndcg10"] / sasrec if r.get("ndcg10") is not None else None

    full_steps = [s for s in record["steps"] if s.get("step") == "full"]
    full_record = next(
        (s["output"][0] for s in record["steps"] if s.get("step") == "full-record" and s.get("output")), {}
    )
    paths = record.get("paths")
    result = {
        "part": "gpu-compare",
        "domain": gq["domain"],
        "dataset": gq["dataset"],
        "command": _sanitize("python " + shlex.join(sys.argv), paths),
        "gpu_command": _sanitize(record["command"], paths),
        "environment": record["environment"],
        "gpu_git": gq["provenance"].get("git"),
        "rows": rows,
        "full_tuning": {
            "history": full_record.get("history"),
            "timings": full_record.get("timings"),
            "config": full_record.get("config"),
            "best_epoch": full_record.get("best_epoch"),
            "stopped_by": full_record.get("stopped_by"),
            "seconds": full_steps[0].get("seconds") if full_steps else None,
        },
        "steps": [{**s, "command": _sanitize(s.get("command", ""), paths)} for s in record["steps"]],
        "tables": tables(rows, record, full_record),
    }
    date, machine = gq["provenance"]["date"][:10], gq["provenance"]["machine"]
    stem = Path(args.out) / f"{date}-{machine}-{args.name}-{gq['domain']}"
    write_json(stem.with_suffix(".json"), result)
    stem.with_suffix(".md").write_text(markdown(result, args.note))
    print("\n\n".join(result["tables"].values()))
    print(f"\nwrote {stem}.json and {stem}.md")
    return 0


def _ci(r: dict[str, Any]) -> str:
    d = (r.get("diff") or {}).get("vs_SASRec")
    if not d:
        return "-"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.4f} ({lo:+.4f}, {hi:+.4f})"


if __name__ == "__main__":
    raise SystemExit(main())
