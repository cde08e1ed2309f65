"""Does tuning the language model help? The tuning runs of a domain beside the frozen head they began from,
the best of them chosen on validation, in one summary file.

    python -m bench.tuning_summary --gpu-record OUT/gpu-real-amazon-scientific.json \\
        --baseline bench/results/2026-11-28-amd-epyc-2c-quality-amazon-scientific.json
    python -m bench.tuning_summary \\
        --gpu-record bench/results/2026-11-28-intel-xeon-16c-gpu-real-amazon-scientific-2.json \\
        --gpu-quality bench/results/2026-11-28-intel-xeon-16c-quality-amazon-scientific-gpu.json \\
        --run bench/results/2026-11-28-intel-xeon-16c-gpu-full-init-amazon-scientific.json \\
        --run-command 'st2si pretrain --domain amazon-scientific ... --init-head gpu-ilp --device cuda' \\
        --top bench/results/2026-11-28-amd-epyc-2c-top-layers-amazon-scientific-k2.json \\
        --baseline bench/results/2026-11-28-amd-epyc-2c-quality-amazon-scientific.json

Arguments:

- `--gpu-record R` (repeatable): what `bench/gpu_real.py` wrote (`gpu-real-<domain>.json`). Each of its
  `pretrain` steps (`full`, `topK`, variants such as `full+dropout0.1+init`; failed and skipped ones too) is
  a row; its `ilp` step's head is the frozen reference on the same machine.
- `--gpu-quality Q` (repeatable, in the order of `--gpu-record`): the per-user ranks its `quality` step
  wrote (`bench/quality.py`). Without it, the file the record's `quality` step names (`result_file`) is
  read from the record's folder, if it is there. A head found in it takes its validation and test
  NDCG@10 from it (the figures its ranks give); a head missing from it takes them from its run record.
- `--run J` (repeatable) with `--run-command C` (one per `--run`, in order) and optionally `--run-device D`:
  the JSON of other `st2si pretrain --json` runs (CPU or GPU), each a row; C is the command that made it
  (its `--init-head` names the start, looked up in the GPU records given, the first that has it, then in
  the baseline; D defaults to its `--device`).
- `--top T` (repeatable): `bench/top_layers.py` results (top-K tuning, CPU), each a row.
- `--baseline B`: the quality benchmark of the domain (`bench/quality.py`) holding the converged RecBole
  SASRec's per-user test ranks, and the CPU heads' (a `--top` run's start is found there).
- `--summary S` (default `bench/results/tuning-summary.json`): the file written; other domains in it are
  kept, this domain's entry is rebuilt from the records given (give them all every time).

Each row: `method` (read from its pretrain command: what was tuned, LoRA, dropout, learning rates, start),
`device`, `command`, `status`, `valid_ndcg10`, `test_ndcg10`, `best_epoch`, `best_step`, `stopped_by`,
`kept_start` (started from a head, and its best validation point was that start: nothing tuned was kept),
`seconds` (the pretrain process's wall time; for a `--run`, its own `total_seconds`), `train_seconds`, `start` (the head it began from) and
`ratio_vs_sasrec`.

`tuned` is the row with the best validation NDCG@10 among those with figures that did not keep their start;
test is only reported. `start` is the head it began from (`--init-head`), or, for a run from random ILP
rows, the `ilp` step's head of the same GPU record (`relation` says which). `test_diff_vs_start_ci95` is the
95% bootstrap interval of the per-user NDCG@10 difference (tuned minus start), and
`test_diff_vs_sasrec_ci95` the same against SASRec: `bench/quality_stats.py`'s code, only where per-user
ranks of both are in the files given (else null, with `ci_missing` saying why). `ratio_vs_sasrec` is test
NDCG@10 over the SASRec's. Every figure is read from the files given; none is filled in.

The dataset must be the baseline's: the IDs of each GPU record's `prepare` step and quality file are
compared with it, and every record's domain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, command_line, log, write_json
from bench.quality_stats import paired_diff
from bench.recipe_quality import sasrec_ranks
from bench.tuning_records import CHOICE, Records, start_row


def _interval(
    a: list[int] | None, b: list[int] | None, what: str
) -> tuple[dict[str, Any] | None, str | None]:
    if a is None:
        return None, "no per-user ranks of the tuned model in the files given"
    if b is None:
        return None, f"no per-user ranks of {what} in the files given"
    return paired_diff(a, b), None


def summarize(records: Records, baseline: dict[str, Any]) -> dict[str, Any]:
    """The domain's entry: rows, the start, and the tuned model chosen on validation."""
    sasrec = sasrec_ranks(baseline)
    sasrec_ndcg = next(
        r for r in baseline["rows"] if r.get("source") == "recbole" and r.get("method") == "SASRec"
    )["metrics"]["NDCG@10"]
    for t in records.tried:
        test = t.row["test_ndcg10"]
        t.row["ratio_vs_sasrec"] = test / sasrec_ndcg if test is not None else None
    candidates = [t for t in records.tried if t.row["valid_ndcg10"] is not None and not t.row["kept_start"]]
    best = max(candidates, key=lambda t: t.row["valid_ndcg10"]) if candidates else None
    entry: dict[str, Any] = {
        "dataset": records.dataset,
        "choice": CHOICE,
        "baseline": {"sasrec_test_ndcg10": sasrec_ndcg},
        "start": None,
        "tuned": None,
        "rows": [t.row for t in records.tried],
    }
    if best is None:
        entry["tuned_missing"] = (
            "every run with figures kept its start" if records.tried else "no tuning run in the files given"
        )
        return entry
    start, relation = best.start, "--init-head: the head its ILP started from"
    if start is None and best.reference is not None:
        start = best.reference
        relation = "the ilp step's head on the same machine (the run started from random ILP rows)"
    entry["start"] = start_row(start, relation)
    vs_start, missing = _interval(best.ranks, start.ranks if start else None, "its start")
    vs_sasrec, _ = _interval(best.ranks, sasrec, "SASRec")
    r = best.row
    entry["tuned"] = {
        **{k: r[k] for k in ("valid_ndcg10", "test_ndcg10", "method", "device", "command", "head")},
        **{k: r[k] for k in ("best_epoch", "best_step", "stopped_by", "figures_from", "source")},
        "beats_start_on_valid": (
            r["valid_ndcg10"] > start.valid if start is not None and start.valid is not None else None
        ),
        "test_diff_vs_start_mean": vs_start["mean"] if vs_start else None,
        "test_diff_vs_start_ci95": vs_start["ci95"] if vs_start else None,
        "ratio_vs_sasrec": r["ratio_vs_sasrec"],
        "test_diff_vs_sasrec_mean": vs_sasrec["mean"] if vs_sasrec else None,
        "test_diff_vs_sasrec_ci95": vs_sasrec["ci95"] if vs_sasrec else None,
    }
    if start is None:
        missing = "no start: a run from random ILP rows, and no ilp step beside it"
    if missing:
        entry["tuned"]["ci_missing"] = missing
    return entry


def _figure(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


def report(entry: dict[str, Any]) -> None:
    """The rows and the choice, to stderr."""
    for r in entry["rows"]:
        figures = f"valid {_figure(r['valid_ndcg10'])}, test {_figure(r['test_ndcg10'])}"
        kept = "; kept its start" if r["kept_start"] else ""
        log(f"{r['method']} [{r['device']}]: {r['status']}, {figures}{kept}")
    tuned, start = entry["tuned"], entry["start"]
    if tuned is None:
        log(f"no tuned model: {entry['tuned_missing']}")
        return
    line = (
        f"tuned (best on valid): {tuned['method']}: valid {_figure(tuned['valid_ndcg10'])}, "
        f"test {_figure(tuned['test_ndcg10'])} = {tuned['ratio_vs_sasrec']:.3f}x SASRec"
    )
    if start:
        line += f"; start {start['head']}: valid {_figure(start['valid_ndcg10'])}, test {_figure(start['test_ndcg10'])}"
    ci = tuned["test_diff_vs_start_ci95"]
    if ci:
        line += f"; test diff vs start {tuned['test_diff_vs_start_mean']:+.4f} ({ci[0]:+.4f}, {ci[1]:+.4f})"
    log(line)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-record", action="append", default=[], help="bench/gpu_real.py's record (repeat)")
    ap.add_argument(
        "--gpu-quality", action="append", default=[], help="its quality step's file (repeat, in order)"
    )
    ap.add_argument("--run", action="append", default=[], help="`st2si pretrain --json` output (repeat)")
    ap.add_argument("--run-command", action="append", default=[], help="the command of each --run, in order")
    ap.add_argument(
        "--run-device", action="append", default=[], help="where each --run ran (default: --device)"
    )
    ap.add_argument("--top", action="append", default=[], help="bench/top_layers.py result (repeat)")
    ap.add_argument("--baseline", required=True, help="bench/quality.py's file with the converged SASRec")
    ap.add_argument("--summary", default=str(RESULTS_DIR / "tuning-summary.json"))
    args = ap.parse_args(argv)
    if len(args.gpu_quality) > len(args.gpu_record):
        ap.error("more --gpu-quality than --gpu-record")
    if len(args.run_command) != len(args.run):
        ap.error("give one --run-command per --run")
    if len(args.run_device) > len(args.run):
        ap.error("more --run-device than --run")
    if not (args.gpu_record or args.run or args.top):
        ap.error("nothing to summarize: give --gpu-record, --run or --top")

    baseline = json.loads(Path(args.baseline).read_text())
    records = Records(baseline, args.baseline)
    qualities = args.gpu_quality + [None] * (len(args.gpu_record) - len(args.gpu_quality))
    for path, quality in zip(args.gpu_record, qualities, strict=True):
        records.add_gpu(path, quality)
    devices = args.run_device + [None] * (len(args.run) - len(args.run_device))
    for path, command, device in zip(args.run, args.run_command, devices, strict=True):
        records.add_run(path, command, device)
    for path in args.top:
        records.add_top(path)
    entry = summarize(records, baseline)
    entry["baseline"]["file"] = args.baseline
    entry["command"] = command_line()
    entry["sources"] = records.files

    path = Path(args.summary)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[records.domain] = entry
    write_json(path, summary)
    report(entry)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
