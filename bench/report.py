"""Write the benchmark report: `<results>/<date>-<machine>.md` with the tables and PNG plots.

    python -m bench.report                       # newest quality / speed / gpu results of this machine
    python -m bench.report FILE.json [FILE.json ...] [--out-dir DIR]

Takes the result files of bench/quality.py, bench/speed.py and bench/gpu.py (by default, for each part
and domain, the newest file in bench/results/ written on this machine) and writes one markdown file with:
every table with the exact command that produced it, the provenance of each run (commit, load average),
training curves of validation NDCG@10 per epoch (st2si heads' "history", RecBole's per-epoch validation),
and the speed ratios as bars. Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, cpu_count, cpu_model, machine_name, today


def pick_files(results: Path, machine: str) -> list[Path]:
    """Newest result file per (part, domain) written on this machine (by the name's date, then mtime)."""
    newest: dict[tuple[str, str], Path] = {}
    for p in sorted(results.glob(f"*-{machine}-*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(d, dict) or d.get("part") not in ("quality", "speed", "gpu"):
            continue
        key = (d["part"], str(d.get("domain") or d.get("device_name") or ""))
        if key not in newest or (p.name[:10], p.stat().st_mtime) > (
            newest[key].name[:10],
            newest[key].stat().st_mtime,
        ):
            newest[key] = p
    return [newest[k] for k in sorted(newest)]


def provenance_line(prov: dict[str, Any]) -> str:
    git = prov.get("git") or {}
    commit = (git.get("commit") or "?")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = f"load average {prov.get('load_average_start')} at start, {prov.get('load_average_end')} at end"
    return (
        f"{prov.get('date')}, {prov.get('cpu')} ({prov.get('cores')} cores, {prov.get('torch_threads')} torch "
        f"threads), torch {prov.get('torch')}, commit {commit}; {load}; {prov.get('wall_seconds')} s in all."
    )


# ---- plots ---------------------------------------------------------------------------------------------------


def plot_curves(q: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in q["rows"] if r.get("history")]
    if not rows:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    for r in rows:
        h = [x for x in r["history"] if x.get("valid_NDCG@10") is not None]
        if not h:
            continue
        epochs = [x["epoch"] for x in h]
        ndcg = [x["valid_NDCG@10"] for x in h]
        ax1.plot(epochs, ndcg, marker="o", markersize=3, label=r["model"])
        # st2si's ILP epochs start after its one-off feature pass: count it, or the time axis flatters st2si.
        secs, total = [], float(r.get("features_seconds") or 0.0)
        for x in h:
            total += float(x.get("seconds") or 0.0)
            secs.append(max(total, 1e-3))
        ax2.plot(secs, ndcg, marker="o", markersize=3, label=r["model"])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation NDCG@10")
    ax1.set_title(f"{q['domain']}: validation NDCG@10 per epoch")
    ax2.set_xscale("log")
    ax2.set_xlabel("cumulative seconds: training + validation (+ st2si's feature pass), log")
    ax2.set_title("the same, against time spent")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_speed(s: dict[str, Any], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = s.get("ratios") or {}
    bars = [
        ("forward fp32 / roofline", r.get("forward_float32_over_roofline")),
        ("forward bf16 / roofline", r.get("forward_bfloat16_over_roofline")),
        ("adapt wall / one forward pass", r.get("adapt_wall_over_forward")),
        ("adapt feature pass / forward", r.get("adapt_features_over_forward")),
        ("recommend (library) / forward, users/s", r.get("recommend_library_over_forward_users_per_s")),
        ("recommend (CLI) / forward, users/s", r.get("recommend_cli_over_forward_users_per_s")),
        ("ILP tuning: backbone in loop / cached", (s.get("ilp_tuning") or {}).get("live_over_cached")),
    ]
    bars = [(k, v) for k, v in bars if v is not None and v > 0]
    if not bars:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(bars) + 1.2))
    labels = [k for k, _ in bars]
    values = [v for _, v in bars]
    ax.barh(range(len(bars)), values, color="tab:blue")
    ax.set_yticks(range(len(bars)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=8)
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(lo / 2, hi * 4)
    ax.set_xlabel("ratio (log scale; 1 = parity)")
    ax.set_title(
        f"{s['domain']}, {s['backbone']}: speed ratios measured in one run\n({s['scope']})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- sections ------------------------------------------------------------------------------------------------


def quality_section(q: dict[str, Any], out_dir: Path, stem: str) -> str:
    d = q["dataset"]
    lines = [
        f"## Quality: {q['domain']} ({d['users']:,} users, {d['items']:,} items, {d['interactions']:,} interactions)",
        "",
        f"Command: `{q['provenance']['command']}`",
        "",
        provenance_line(q["provenance"]),
        "",
        "Full ranking over all items, pessimistic ties; every number from `st2si_cli.metrics` (RecBole's "
        "from its full score matrix). MRR is over the whole list, MRR@10 is RecBole's. The difference column "
        "is the paired per-user NDCG@10 difference against SASRec with its 95% bootstrap interval. RecBole "
        "models train until early stopping; one that did not is marked NOT CONVERGED.",
        "",
        "History unmasked:",
        "",
        q["table"],
        "",
    ]
    if q.get("table_masked"):
        lines += ["History masked (items of the input history not ranked):", "", q["table_masked"], ""]
    notes = []
    for r in q["rows"]:
        if r["source"] == "recbole":
            sc = r["split_check"]
            cc = ", ".join(
                f"{k} {v['recbole_printed']:.4f} vs {v['st2si_metrics']:.4f}"
                for k, v in r["cross_check"].items()
            )
            mc = r.get("model_config") or {}
            notes.append(
                f"- {r['model']}: {r['epochs_run']} epoch(s) (cap {r['epoch_cap']}; {r['stopped']}), best epoch "
                f"{r['best_epoch']}, {r['n_params']:,} parameters, {mc}, {r.get('torch_threads')} torch "
                f"thread(s). Split proved identical to st2si's for "
                f"{sc['test']['users']} users (test and validation targets and inputs, inputs truncated to the "
                f"newest {sc['test']['history_truncation']}). RecBole's own printed test metrics vs st2si's: {cc}."
            )
        else:
            feat = r.get("features_seconds")
            text = r.get("text") or {}
            notes.append(
                f"- {r['model']}: head `{r['head']}` on backbone {r['backbone']}, best epoch {r['best_epoch']} of "
                f"{r['epochs_run']}; history window {text.get('max_items')} items / {text.get('max_tokens')} "
                f"tokens; metrics from {r['metrics_source']}"
                + (f"; one-off feature pass {feat:.0f} s" if feat else "")
                + "."
            )
    lines += ["Notes:", "", *notes, ""]
    png = out_dir / f"{stem}-curves-{q['domain']}.png"
    if plot_curves(q, png):
        lines += [f"![validation NDCG@10 per epoch, {q['domain']}]({png.name})", ""]
    return "\n".join(lines)


def quality_summary_line(q: dict[str, Any]) -> str:
    """The st2si head chosen on validation against converged SASRec, or why there is no claim."""
    st2si = [
        r
        for r in q["rows"]
        if r["source"] == "st2si" and (r.get("valid_metrics") or {}).get("NDCG@10") is not None
    ]
    sasrec = next((r for r in q["rows"] if r.get("method") == "SASRec"), None)
    if not st2si:
        return f"- quality, {q['domain']}: no st2si head scored"
    best = max(st2si, key=lambda r: r["valid_metrics"]["NDCG@10"])
    line = f"- quality, {q['domain']}: st2si head chosen on validation, {best['model']}: test NDCG@10 {best['metrics']['NDCG@10']:.4f}"
    if sasrec is None:
        return line
    if not sasrec.get("converged"):
        return line + f"; SASRec {sasrec['metrics']['NDCG@10']:.4f} NOT CONVERGED, no claim"
    diff = best["diff"]["SASRec"]
    return (
        line + f"; converged SASRec {sasrec['metrics']['NDCG@10']:.4f} "
        f"({best['metrics']['NDCG@10'] / sasrec['metrics']['NDCG@10']:.2f}x; paired difference {diff['mean']:+.4f}, "
        f"95% CI {diff['ci95'][0]:+.4f} to {diff['ci95'][1]:+.4f})"
    )


def speed_section(s: dict[str, Any], out_dir: Path, stem: str) -> str:
    head = [
        f"## Speed and cost: {s['domain']}, backbone {s['backbone']}",
        "",
        f"Command: `{s['provenance']['command']}`",
        "",
        provenance_line(s["provenance"]),
        "",
    ]
    if "forward" not in s:  # the interleaved-ratio format of bench/speed.py: its own table says it all
        scope = (
            f"Scope: {s['scope']}. Each ratio's numerator and denominator were timed in turn (A B A B) in "
            "this one run; median and min over the rounds." + (f" Note: {s['note']}" if s.get("note") else "")
        )
        return "\n".join([*head, scope, "", s["table"], ""])
    fpt = s["forward"]["flops_per_token"]
    geo = s["model"]
    t = s.get("ilp_tuning") or {}
    lines = [
        *head,
        f"Scope: {s['scope']}. Matmul throughput measured in the same run (median round; the best round is in "
        f"the JSON). Roofline tokens/s = matmul FLOP/s on the model's own linear shapes / FLOPs per token; "
        f"FLOPs per token = 2 x {geo['non_embedding_parameters']:,} non-embedding parameters + "
        f"{fpt['attention'] / 1e6:.2f} MFLOP causal attention (averaged over these samples) = "
        f"{fpt['total'] / 1e6:.1f} MFLOP. The ILP tuning with the backbone in the loop runs it frozen in eval "
        f"mode ({t.get('epochs')} epochs, same seed as the cached run): a lower bound of the authors' cost. "
        f"Default dtype here: {s['auto_dtype']}.",
        "",
        s["table"],
        "",
    ]
    png = out_dir / f"{stem}-speed-{s['domain']}.png"
    if plot_speed(s, png):
        lines += [f"![speed ratios, {s['domain']}]({png.name})", ""]
    return "\n".join(lines)


def gpu_section(g: dict[str, Any]) -> str:
    a = g["architecture"]
    return "\n".join(
        [
            f"## GPU: {g['device_name']}",
            "",
            f"Command: `{g['provenance']['command']}`",
            "",
            provenance_line(g["provenance"]),
            "",
            f"Randomly initialised Llama ({a['source']}; {a['parameters']:,} backbone parameters, hidden {a['hidden_size']}, "
            f"{a['num_hidden_layers']} layers), synthetic ILP over {g['items']:,} items, {g['seq_len']} tokens per "
            f"history with {g['queries_per_history']} queries. Precision: {g['precision']}. Median of {g['repeats']} "
            f"after {g['warmup']} warm-up calls."
            + (
                " **Tiny smoke-test model: these numbers say nothing about SmolLM2.**"
                if g.get("tiny")
                else ""
            ),
            "",
            g["table"],
            "",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="result JSON files (default: the newest per part in --results)")
    ap.add_argument("--results", default=str(RESULTS_DIR), help="where to look for result files")
    ap.add_argument("--out-dir", default=None, help="where to write the report (default: --results)")
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    results = Path(args.results)
    out_dir = Path(args.out_dir) if args.out_dir else results
    machine = machine_name()
    files = [Path(f) for f in args.files] or pick_files(results, machine)
    if not files:
        raise SystemExit(
            f"no result files in {results} for this machine ({machine}): run python -m bench.quality, "
            "python -m bench.speed or python -m bench.gpu first"
        )
    order = {"quality": 0, "speed": 1, "gpu": 2}
    pairs = sorted(
        ((json.loads(p.read_text()), p) for p in files), key=lambda dp: order.get(dp[0].get("part"), 9)
    )
    docs, files = [d for d, _ in pairs], [p for _, p in pairs]
    stem = f"{today()}-{machine}"
    out_dir.mkdir(parents=True, exist_ok=True)
    smoke = any("smoke" in p.name for p in files)
    title = args.title or f"st2si benchmark report: {cpu_model()}, {cpu_count()} cores" + (
        " (SMOKE RUN)" if smoke else ""
    )
    parts = [
        f"# {title}",
        "",
        f"Written {today()} by `python -m bench.report{' ' + ' '.join(args.files) if args.files else ''}` from: "
        + ", ".join(f"`{p.name}`" for p in files)
        + ".",
        "",
    ]
    if smoke:
        parts += ["**Smoke run**: small models and capped epochs to check the instrument, not results.", ""]
    summary = []
    for d in docs:
        if d["part"] == "quality":
            parts.append(quality_section(d, out_dir, stem))
            summary.append(quality_summary_line(d))
        elif d["part"] == "speed":
            parts.append(speed_section(d, out_dir, stem))
            r = d["ratios"]
            if "forward_vs_gemm_roofline" in r:  # interleaved-ratio format: {name: {median, min, ...}}
                summary.append(
                    f"- speed, {d['domain']} ({d['backbone']}): "
                    + "; ".join(f"{k} {v['median']:.2f} (median)" for k, v in r.items() if "median" in v)
                )
            else:
                summary.append(
                    f"- speed, {d['domain']} ({d['backbone']}): forward at {r['forward_bfloat16_over_roofline']:.2f} "
                    f"(bf16) / {r['forward_float32_over_roofline']:.2f} (fp32) of the matmul roofline; adapt = "
                    f"{r['adapt_wall_over_forward']:.2f} x one forward pass"
                )
        elif d["part"] == "gpu":
            parts.append(gpu_section(d))
            rec = next(
                (
                    x
                    for x in d["results"]
                    if x["mode"] == "recommend" and x["batch"] == 1 and x.get("seconds_per_instance")
                ),
                None,
            )
            if rec:
                mem = f", {rec['peak_memory_gb']:.2f} GB" if rec.get("peak_memory_gb") is not None else ""
                summary.append(
                    f"- gpu, {d['device_name']}: recommend at batch 1 {rec['seconds_per_instance']:.4f} "
                    f"s/instance{mem} (paper Table 7, opt-125m on V100: 0.02 s, 0.97 GB)"
                )
    parts[4:4] = ["## Summary", "", *summary, ""]
    md = out_dir / f"{stem}.md"
    md.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {md}")
    for p in sorted(out_dir.glob(f"{stem}-*.png")):
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
