"""Speed and cost as ratios measured in one run: against this machine's matmul roofline and against a plain
forward pass over the same data.

    python bench/speed.py --zoo ZOO --domain scientific --backbone smollm2-135m --users 200

What it measures (all in this one process run, so machine load affects numerator and denominator alike):

- matmul throughput (GFLOP/s) in fp32 and bf16: a square GEMM (2048^3) and the backbone's own linear
  shapes (every distinct nn.Linear shape, M = 2048 tokens, weighted by how often it occurs);
- backbone forward tokens/s on real histories of the domain (plus the ID-alignment samples, as `adapt`
  runs them), fp32 and bf16; roofline tokens/s = matmul FLOP/s on the model's shapes / FLOPs per token,
  FLOPs per token = 2 x non-embedding parameters + causal attention FLOPs (4 x position x heads x
  head_dim per layer, averaged over the real tokens); the ratio says how close the forward gets;
- `st2si adapt` wall time over one plain forward pass over the same samples, and ILP tuning with the
  backbone in the loop (the authors' way: `train_head(features_of=live_features(...))`, backbone frozen
  in eval mode, which is a lower bound of their cost) against tuning on cached features, same epochs,
  with the test metrics of both;
- `st2si recommend` users/s (CLI end to end, and the library call) against pure forward users/s on the
  same histories;
- `st2si eval` wall time; peak RSS of each CLI command (`/usr/bin/time -v`); `st2si --help` wall time.

Everything after the matmuls runs on a subset of N users (--users, drawn with a fixed seed) and the items
their sequences use, in a scratch zoo (removed afterwards): the output says so. The zoo given is only read.
Writes `<out>/<date>-<machine>-speed-<domain>.json`; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS_DIR,
    child_env,
    format_table,
    load_average,
    log,
    provenance,
    result_path,
    run_timed,
    st2si_argv,
    write_json,
)

DTYPES = ("float32", "bfloat16")


# ---- matmul roofline -----------------------------------------------------------------------------------------


def _time_linears(
    shapes: list[tuple[int, int, int]], m: int, dtype: Any, min_seconds: float
) -> dict[str, float]:
    """F.linear over [(in, out, count)] with M rows, repeated for at least `min_seconds`.

    Returns FLOPs per round and the median and best round times: the median is what the machine gave
    under its load at the time (the forward passes are measured the same way), the best its peak.
    """
    import torch
    import torch.nn.functional as F

    xs = {k: torch.randn(m, k, dtype=dtype) for k, _, _ in shapes}
    ws = [(torch.randn(n, k, dtype=dtype) * 0.02, k, c) for k, n, c in shapes]
    flops = sum(2.0 * m * k * w.shape[0] * c for w, k, c in ws)

    def one_round() -> None:
        for w, k, c in ws:
            for _ in range(c):
                F.linear(xs[k], w)

    times: list[float] = []
    with torch.inference_mode():
        one_round()  # warm-up (oneDNN primitive creation)
        t_start = time.perf_counter()
        while len(times) < 3 or time.perf_counter() - t_start < min_seconds:
            t0 = time.perf_counter()
            one_round()
            times.append(time.perf_counter() - t0)
    return {"flops": flops, "median_s": statistics.median(times), "best_s": min(times), "rounds": len(times)}


def gemm_gflops(
    shapes: list[tuple[int, int, int]], m: int, dtype: Any, min_seconds: float
) -> dict[str, float]:
    """GFLOP/s at the median round (used for the roofline) and at the best round."""
    t = _time_linears(shapes, m, dtype, min_seconds)
    return {
        "gflops": t["flops"] / t["median_s"] / 1e9,
        "best_gflops": t["flops"] / t["best_s"] / 1e9,
        "rounds": t["rounds"],
    }


def linear_shapes(model: Any) -> list[tuple[int, int, int]]:
    """Distinct (in, out) shapes of the backbone's nn.Linear layers with their counts."""
    import torch

    counts: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.in_features, mod.out_features)
            counts[key] = counts.get(key, 0) + 1
    return [(k, n, c) for (k, n), c in sorted(counts.items())]


def model_geometry(model: Any) -> dict[str, Any]:
    import torch

    cfg = model.config
    embedding = sum(
        p.numel()
        for mod in model.modules()
        if isinstance(mod, torch.nn.Embedding)
        for p in mod.parameters(recurse=False)
    )
    total = sum(p.numel() for p in model.parameters())
    hidden = int(getattr(cfg, "hidden_size", 0) or cfg.d_model)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return {
        "family": cfg.model_type,
        "hidden": hidden,
        "layers": int(cfg.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", heads) or heads),
        "head_dim": head_dim,
        "parameters": int(total),
        "embedding_parameters": int(embedding),
        "non_embedding_parameters": int(total - embedding),
    }


def flops_per_token(geo: dict[str, Any], lengths: list[int]) -> dict[str, float]:
    """2 x non-embedding params + causal attention FLOPs, averaged over the real tokens of `lengths`."""
    linear = 2.0 * geo["non_embedding_parameters"]
    d_attn = geo["heads"] * geo["head_dim"]
    # Token at position p (1-based) attends to p keys: QK^T and AV are 2 x p x d_attn MACs = 4 p d_attn FLOPs.
    attn_total = sum(4.0 * d_attn * geo["layers"] * n * (n + 1) / 2 for n in lengths)
    attention = attn_total / max(1, sum(lengths))
    return {"linear": linear, "attention": attention, "total": linear + attention}


# ---- forward passes ------------------------------------------------------------------------------------------


def timed_forward(backbone: Any, samples: list[Any], batch_tokens: int, max_batch: int) -> dict[str, Any]:
    """One pass over every sample in length-sorted batches (as compute_features plans them)."""
    import torch

    from st2si_cli.features import forward_batch
    from st2si_cli.model.samples import plan_batches

    lengths = [len(s.tokens) for s in samples]
    batches = plan_batches(lengths, batch_tokens, max_batch)
    with torch.inference_mode():
        forward_batch(backbone, [samples[i] for i in batches[-1]])  # warm-up on the shortest batch
        t0 = time.perf_counter()
        for b in batches:
            forward_batch(backbone, [samples[i] for i in b])
        seconds = time.perf_counter() - t0
    tokens = sum(lengths)
    return {
        "seconds": seconds,
        "samples": len(samples),
        "tokens": tokens,
        "padded_tokens": sum(len(b) * lengths[b[0]] for b in batches),
        "batches": len(batches),
        "tokens_per_s": tokens / seconds,
    }


def recommend_samples(ds: Any, itok: Any, item_tokens: list[list[int]]) -> list[Any]:
    """What `recommend` feeds the backbone for each user's history (all but the test item)."""
    from st2si_cli.model.samples import Sample

    out = []
    for seq in ds.sequences:
        toks = [item_tokens[i] for i in seq[:-1]]
        m = itok.history_window(toks)
        tokens, qpos = itok.sequence(toks[len(toks) - m :])
        out.append(Sample(tokens, [qpos[-1]], [], [], 0))
    return out


# ---- the subset and the scratch zoo --------------------------------------------------------------------------


def subset(ds: Any, n_users: int, seed: int) -> Any:
    from st2si_cli.data.dataset import Dataset
    from st2si_cli.data.prepare import drop_unused_items

    if n_users >= ds.n_users:
        keep = list(range(ds.n_users))
    else:
        keep = sorted(random.Random(seed).sample(range(ds.n_users), n_users))
    sub = Dataset(
        items=ds.items,
        users=[ds.users[u] for u in keep],
        sequences=[ds.sequences[u] for u in keep],
        report={"subset_of": ds.n_users, "seed": seed},
    )
    return drop_unused_items(sub)


def scratch_zoo(main: Any, backbone_ref: str, ds: Any, domain: str) -> tuple[Any, Any, Any]:
    """A temporary zoo holding a copy of the backbone and the subset dataset (the main zoo is only read)."""
    from st2si_cli.backbones import ensure_backbone
    from st2si_cli.data.prepare import store_dataset
    from st2si_cli.zoo.store import Zoo

    src = main.find(backbone_ref, kind="backbone")
    zoo = Zoo(tempfile.mkdtemp(prefix="st2si-speed-"))
    if src is None:  # tiny-opt / tiny-llama / smollm2-135m can be built where they are missing
        bb = ensure_backbone(zoo, backbone_ref)
    else:
        bb = zoo.put("backbone", {f: main.file(src, f) for f in src.files}, src.meta, name=backbone_ref)
    art = store_dataset(zoo, ds, domain=domain, fmt="bench-subset", source=f"bench subset of {domain}")
    return zoo, bb, art


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--zoo", default=None, help="zoo folder (read only; default: $ST2SI_HOME, else the user data dir)"
    )
    ap.add_argument("--domain", required=True)
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument(
        "--users", type=int, default=200, help="users in the subset everything after the matmuls runs on"
    )
    ap.add_argument(
        "--epochs", type=int, default=3, help="ILP epochs for adapt and for the backbone-in-the-loop run"
    )
    ap.add_argument("--max-items", type=int, default=50, help="newest history items kept (adapt --max-items)")
    ap.add_argument("--gemm", type=int, default=2048, help="square GEMM size and M of the model-shape GEMMs")
    ap.add_argument(
        "--min-seconds", type=float, default=2.0, help="time each matmul measurement at least this long"
    )
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--skip-live", action="store_true", help="skip ILP tuning with the backbone in the loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    import torch

    from st2si_cli.backbones import load_backbone, resolve_dtype
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.features import index_rows, live_features, load_feature_set
    from st2si_cli.hf import quiet_transformers
    from st2si_cli.model.samples import TEST, build_samples
    from st2si_cli.model.text import ItemTokenizer, TextConfig
    from st2si_cli.recommend import parse_requests, recommend
    from st2si_cli.train.head import HeadConfig, evaluate_split, train_head
    from st2si_cli.zoo.store import Zoo

    quiet_transformers()
    t_start = time.time()
    prov = provenance()
    main_zoo = Zoo(args.zoo)
    full = load_dataset(main_zoo, args.domain)
    ds = subset(full, args.users, args.seed)
    scope = (
        f"subset of {ds.n_users} of {full.n_users} users (seed {args.seed}) and the {ds.n_items} of "
        f"{full.n_items} items they use"
    )
    log(f"Speed on {args.domain}: {scope}")
    zoo, bb_art, ds_art = scratch_zoo(main_zoo, args.backbone, ds, args.domain)
    record: dict[str, Any] = {
        "part": "speed",
        "domain": args.domain,
        "backbone": args.backbone,
        "scope": scope,
        "subset": {
            "users": ds.n_users,
            "items": ds.n_items,
            "of_users": full.n_users,
            "of_items": full.n_items,
            "seed": args.seed,
        },
    }
    auto = str(resolve_dtype("auto")).replace("torch.", "")
    record["auto_dtype"] = auto
    try:
        text = TextConfig(max_items=args.max_items)

        # 1. Matmul roofline, fp32 and bf16, square and the model's own shapes.
        probe = load_backbone(zoo, bb_art.id, dtype="fp32")
        geo = model_geometry(probe.model)
        shapes = linear_shapes(probe.model)
        itok = ItemTokenizer.create(probe.tokenizer, text)
        item_tokens = itok.encode_items(ds.items)
        samples = build_samples(ds, itok, item_tokens, alignment=True)
        rec_samples = recommend_samples(ds, itok, item_tokens)
        del probe
        g = args.gemm
        matmul: dict[str, Any] = {"square": f"{g}x{g}x{g}", "model_shapes_M": g, "model_shapes": shapes}
        for dt in DTYPES:
            tdt = getattr(torch, dt)
            log(f"GEMM {dt}")
            sq = gemm_gflops([(g, g, 1)], g, tdt, args.min_seconds)
            md = gemm_gflops(shapes, g, tdt, args.min_seconds)
            matmul[f"square_{dt}_gflops"], matmul[f"square_{dt}_best_gflops"] = (
                sq["gflops"],
                sq["best_gflops"],
            )
            matmul[f"model_{dt}_gflops"], matmul[f"model_{dt}_best_gflops"] = md["gflops"], md["best_gflops"]
        record["matmul"] = matmul
        record["model"] = geo

        # 2. Forward tokens/s on the subset's samples (histories + alignment, as adapt runs them), vs roofline.
        lengths = [len(s.tokens) for s in samples]
        fpt = flops_per_token(geo, lengths)
        forward: dict[str, Any] = {
            "flops_per_token": fpt,
            "samples": len(samples),
            "history_samples": ds.n_users,
            "alignment_samples": ds.n_items,
        }
        backbones: dict[str, Any] = {}
        for dt in DTYPES:
            log(f"Forward pass {dt}: {len(samples)} samples, {sum(lengths)} tokens")
            backbones[dt] = load_backbone(zoo, bb_art.id, dtype=dt)
            f = timed_forward(backbones[dt], samples, args.batch_tokens, 64)
            roof = matmul[f"model_{dt}_gflops"] * 1e9 / fpt["total"]
            peak = matmul[f"model_{dt}_best_gflops"] * 1e9 / fpt["total"]
            f.update(
                roofline_tokens_per_s=roof,
                ratio_to_roofline=f["tokens_per_s"] / roof,
                peak_roofline_tokens_per_s=peak,
                ratio_to_peak_roofline=f["tokens_per_s"] / peak,
                achieved_gflops=f["tokens_per_s"] * fpt["total"] / 1e9,
            )
            forward[dt] = f
            if dt != auto:
                del backbones[dt]
        record["forward"] = forward

        # Pure forward over the recommend inputs (one query per user), in the dtype the head will use.
        bb = backbones[auto]
        rf = timed_forward(bb, rec_samples, args.batch_tokens, 64)
        record["forward_recommend_inputs"] = {
            **rf,
            "users_per_s": rf["samples"] / rf["seconds"],
            "dtype": auto,
        }

        # 3. CLI commands under /usr/bin/time -v, on the scratch zoo.
        env = child_env()
        zargs = ["--zoo", str(zoo.root)]
        commands: dict[str, Any] = {}
        helps = [run_timed(st2si_argv("--help"), env=env) for _ in range(3)]
        commands["help"] = {
            **helps[1].record(),
            "wall_s_runs": [round(h.wall_s, 3) for h in helps],
            "wall_s_median": round(statistics.median(h.wall_s for h in helps), 3),
        }
        log(f"st2si adapt ({args.epochs} epochs)")
        adapt_run = run_timed(
            st2si_argv(
                *zargs,
                "adapt",
                "--domain",
                args.domain,
                "--backbone",
                args.backbone,
                "--epochs",
                str(args.epochs),
                "--patience",
                str(args.epochs),
                "--max-items",
                str(args.max_items),
                "--json",
            ),
            env=env,
        )
        adapt_out = json.loads(adapt_run.stdout)
        commands["adapt"] = {**adapt_run.record(), "head": adapt_out}
        log("st2si eval")
        eval_run = run_timed(st2si_argv(*zargs, "eval", "--domain", args.domain, "--json"), env=env)
        commands["eval"] = {**eval_run.record(), "result": json.loads(eval_run.stdout)}
        lines = [
            json.dumps({"user": ds.users[u], "history": [ds.items[i]["id"] for i in seq[:-1]]})
            for u, seq in enumerate(ds.sequences)
        ]
        hist_file = Path(zoo.root) / "histories.jsonl"
        hist_file.write_text("\n".join(lines) + "\n")
        log(f"st2si recommend ({len(lines)} users)")
        rec_run = run_timed(
            st2si_argv(
                *zargs, "recommend", "--domain", args.domain, "--user-history", str(hist_file), "-k", "10"
            ),
            env=env,
        )
        n_out = sum(1 for line in rec_run.stdout.splitlines() if line.strip())
        commands["recommend"] = {
            **rec_run.record(),
            "users": len(lines),
            "outputs": n_out,
            "users_per_s": len(lines) / rec_run.wall_s,
        }
        record["commands"] = commands

        # recommend as a library call (loads the backbone and head itself, like the CLI, minus process start).
        requests = parse_requests(lines, "histories", ds.items)
        t0 = time.perf_counter()
        recommend(zoo, args.domain, requests, k=10)
        lib_s = time.perf_counter() - t0
        record["recommend_library"] = {
            "seconds": lib_s,
            "users": len(lines),
            "users_per_s": len(lines) / lib_s,
        }

        # 4. ILP tuning: cached features vs the backbone in the loop, same epochs, same seed.
        head = zoo.newest("head", args.domain)
        fs_cached = load_feature_set(zoo, zoo.get(head.meta["inputs"]["features"], kind="features"))
        cfg = HeadConfig(max_epochs=args.epochs, patience=args.epochs)
        t0 = time.perf_counter()
        cached = train_head(fs_cached, ds.n_items, cfg)
        cached_s = time.perf_counter() - t0
        tuning = {
            "epochs": args.epochs,
            "config": cfg.to_dict(),
            "cached": {
                "seconds": cached_s,
                "test": evaluate_split(cached.weight, fs_cached, TEST),
                "history": cached.history,
            },
        }
        if not args.skip_live:
            log(f"ILP tuning with the backbone in the loop ({args.epochs} epochs)")
            bb.model.eval()
            fs_live = index_rows(samples)
            t0 = time.perf_counter()
            live = train_head(fs_live, ds.n_items, cfg, features_of=live_features(bb, samples, fs_live))
            live_s = time.perf_counter() - t0
            tuning["live"] = {
                "seconds": live_s,
                "test": evaluate_split(live.weight, fs_cached, TEST),
                "history": live.history,
                "backbone_mode": "eval (frozen, no dropout)",
                "max_abs_weight_diff_vs_cached": float((live.weight - cached.weight).abs().max()),
            }
            tuning["live_over_cached"] = live_s / cached_s
            tuning["live_over_adapt_wall"] = live_s / adapt_run.wall_s
        record["ilp_tuning"] = tuning

        fwd = forward[auto]
        head_t = adapt_out.get("timings", {})
        record["ratios"] = {
            "adapt_wall_over_forward": adapt_run.wall_s / fwd["seconds"],
            "adapt_features_over_forward": (head_t.get("features_seconds") or 0) / fwd["seconds"],
            "recommend_library_over_forward_users_per_s": record["recommend_library"]["users_per_s"]
            / record["forward_recommend_inputs"]["users_per_s"],
            "recommend_cli_over_forward_users_per_s": commands["recommend"]["users_per_s"]
            / record["forward_recommend_inputs"]["users_per_s"],
            **{f"forward_{dt}_over_roofline": forward[dt]["ratio_to_roofline"] for dt in DTYPES},
        }
    finally:
        root = Path(zoo.root) if "zoo" in locals() else None
        if root is not None:
            zoo.close()
            shutil.rmtree(root, ignore_errors=True)

    record["provenance"] = {
        **prov,
        "load_average_end": load_average(),
        "wall_seconds": round(time.time() - t_start, 1),
    }
    text = speed_table(record)
    record["table"] = text
    path = write_json(result_path(Path(args.out), f"speed-{args.domain}", args.tag), record)
    print(f"\nSpeed on {args.domain}, backbone {args.backbone}: {scope}\ncommand: {prov['command']}\n")
    print(text)
    print(f"\nwrote {path}")
    return 0


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def speed_table(r: dict[str, Any]) -> str:
    """measure | value | against | ratio | peak RSS."""
    m, f, c = r["matmul"], r["forward"], r["commands"]
    auto = r["auto_dtype"]
    rows: list[list[Any]] = []
    for dt in DTYPES:
        rows.append(
            [
                f"matmul {dt} {m['square']} (median round)",
                f"{m[f'square_{dt}_gflops']:.1f} GFLOP/s",
                f"best round {m[f'square_{dt}_best_gflops']:.1f}",
                "",
                "",
            ]
        )
        rows.append(
            [
                f"matmul {dt}, model shapes (M={m['model_shapes_M']})",
                f"{m[f'model_{dt}_gflops']:.1f} GFLOP/s",
                f"square {m[f'square_{dt}_gflops']:.1f}",
                f"{m[f'model_{dt}_gflops'] / m[f'square_{dt}_gflops']:.2f}",
                "",
            ]
        )
    fpt = f["flops_per_token"]["total"]
    for dt in DTYPES:
        x = f[dt]
        rows.append(
            [
                f"forward {dt} ({x['tokens']} tokens, {fpt / 1e6:.1f} MFLOP/token)",
                f"{x['tokens_per_s']:.0f} tok/s ({x['achieved_gflops']:.1f} GFLOP/s)",
                f"roofline {x['roofline_tokens_per_s']:.0f} tok/s",
                f"{x['ratio_to_roofline']:.2f}",
                "",
            ]
        )
    fwd = f[auto]
    a = c["adapt"]
    rows.append(
        [
            f"adapt wall ({r['ilp_tuning']['epochs']} epochs, {auto})",
            f"{a['wall_s']:.1f} s",
            f"forward {fwd['seconds']:.1f} s",
            f"{r['ratios']['adapt_wall_over_forward']:.2f}",
            _mb(a["peak_rss_mb"]),
        ]
    )
    t = r["ilp_tuning"]
    cached_ndcg = t["cached"]["test"]["NDCG@10"]
    if "live" in t:
        rows.append(
            [
                f"ILP tuning, backbone in the loop ({t['epochs']} epochs)",
                f"{t['live']['seconds']:.1f} s",
                f"cached features {t['cached']['seconds']:.2f} s",
                f"{t['live_over_cached']:.0f}",
                "",
            ]
        )
        rows.append(
            [
                "  test NDCG@10: in the loop / cached",
                f"{t['live']['test']['NDCG@10']:.4f}",
                f"{cached_ndcg:.4f}",
                "",
                "",
            ]
        )
    else:
        rows.append(
            [
                f"ILP tuning, cached features ({t['epochs']} epochs)",
                f"{t['cached']['seconds']:.2f} s",
                "",
                "",
                "",
            ]
        )
    fr = r["forward_recommend_inputs"]
    rows.append(
        [
            "recommend, library call",
            f"{r['recommend_library']['users_per_s']:.1f} users/s",
            f"forward {fr['users_per_s']:.1f} users/s",
            f"{r['ratios']['recommend_library_over_forward_users_per_s']:.2f}",
            "",
        ]
    )
    rc = c["recommend"]
    rows.append(
        [
            "recommend, CLI end to end",
            f"{rc['users_per_s']:.1f} users/s",
            f"forward {fr['users_per_s']:.1f} users/s",
            f"{r['ratios']['recommend_cli_over_forward_users_per_s']:.2f}",
            _mb(rc["peak_rss_mb"]),
        ]
    )
    rows.append(
        ["eval (CLI, cached features)", f"{c['eval']['wall_s']:.1f} s", "", "", _mb(c["eval"]["peak_rss_mb"])]
    )
    h = c["help"]
    rows.append(["st2si --help (median of 3)", f"{h['wall_s_median']:.2f} s", "", "", _mb(h["peak_rss_mb"])])
    return format_table(["measure", "value", "against", "ratio", "peak RSS MB"], rows)


if __name__ == "__main__":
    sys.exit(main())
