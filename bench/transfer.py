"""Transfer, the paper's second claim: a head on a backbone tuned on another domain against the same kind
of head on the frozen backbone, on one target domain, paired per user.

    python -m bench.transfer --zoo ZOO --domain ml-100k --start ml-100k/smollm2-135m \\
        --transfer ml-100k/smollm2-135m-st2si-amazon-scientific-top1-noalign-lr3e-6 \\
        --command 'st2si adapt --domain ml-100k --head ilp --dtype fp32' \\
        --command 'st2si adapt --domain ml-100k --head ilp --dtype fp32 --backbone ...'

Both heads are read from the zoo (valid and test NDCG@10 from their records, per-user test ranks from
their feature caches, `bench.top_layers.head_rows`); the difference's 95% interval is
`bench/quality_stats.py`'s paired bootstrap. The converged SASRec of the domain (`quality-summary.json`)
gives each a ratio. `--command` (one per head, in order) records how each was made. Writes
`results/<date>-<machine>-transfer-<domain>.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, provenance, result_path, write_json
from bench.quality_stats import paired_diff
from bench.top_layers import head_rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", default=None)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--start", required=True, help="the head on the frozen backbone")
    ap.add_argument("--transfer", required=True, help="the head on the backbone tuned elsewhere")
    ap.add_argument("--command", action="append", default=[], help="how each head was made (in order)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    start, transfer = head_rows(args.zoo, [args.start, args.transfer], args.domain)
    summary = RESULTS_DIR / "quality-summary.json"
    sasrec = (
        json.loads(summary.read_text()).get(args.domain, {}).get("sasrec", {}) if summary.exists() else {}
    )
    out: dict[str, Any] = {**provenance(), "domain": args.domain}
    for row, cmd in zip((start, transfer), [*args.command, None, None]):
        row["command"] = cmd
        row["ratio_vs_sasrec"] = row["ndcg10"] / sasrec["ndcg10"] if sasrec.get("ndcg10") else None
    out["start"], out["transfer"] = start, transfer
    out["sasrec_ndcg10"] = sasrec.get("ndcg10")
    if start.get("test_ranks") and transfer.get("test_ranks"):
        a = [int(r) for r in transfer["test_ranks"].split()]
        b = [int(r) for r in start["test_ranks"].split()]
        out["test_diff_vs_start"] = paired_diff(a, b)
    path = write_json(result_path(args.out_dir, f"transfer-{args.domain}"), out)
    diff = out.get("test_diff_vs_start")
    print(
        f"start {start['name']}: valid {start['valid_ndcg10']:.4f} test {start['ndcg10']:.4f}; "
        f"transfer {transfer['name']}: valid {transfer['valid_ndcg10']:.4f} test {transfer['ndcg10']:.4f}"
        + (
            f"; test diff {diff['mean']:+.4f} ({diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f})"
            if diff
            else ""
        )
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
