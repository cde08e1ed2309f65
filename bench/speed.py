"""Speed and cost as ratios whose numerator and denominator are timed interleaved (A B A B ...) in one run.

    python bench/speed.py --domain amazon-scientific --backbone smollm2-135m --users 40 --rounds 3
    python bench/speed.py --domain amazon-scientific --quick            # 12 users, 2 rounds, 2 epochs
    python bench/speed.py --million 1000000 --million-only              # the million-item catalog (tiny-opt)

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
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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

SUMMARY = "speed-summary.json"


# ---- interleaved timing ----------------------------------------------------------------------------------------


def interleave(rounds: int, steps: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every step once per round, in order (A B C A B C ...); each returns its seconds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            log(f"round {r + 1}/{rounds}: {name}")
            times[name].append(step())
    return times


def ratio(num: list[float], den: list[float], numerator: str, denominator: str) -> dict[str, Any]:
    """num / den from the medians and from the minima of interleaved rounds (seconds or rates alike)."""
    return {
        "median": statistics.median(num) / statistics.median(den),
        "min": min(num) / min(den),
        "numerator": numerator,
        "denominator": denominator,
        "numerator_rounds": [round(x, 4) for x in num],
        "denominator_rounds": [round(x, 4) for x in den],
    }


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "rounds": [round(x, 4) for x in xs]}


# ---- matmul roofline -----------------------------------------------------------------------------------------


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


# ---- the measurements of one round -------------------------------------------------------------------------


def forward_pass(backbone: Any, samples: list[Any], batches: list[list[int]], packed: bool = True) -> float:
    """Seconds of one pass over `samples` in `batches` (the feature pass's own query_features)."""
    import torch

    from st2si_cli.features import query_features

    model = backbone.st2si()
    model.packed = packed
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for b in batches:
                query_features(model, [samples[i] for i in b])
            return time.perf_counter() - t0
    finally:
        model.packed = True


def fresh_zoo(src: Any, bb_art: Any, ds: Any, domain: str) -> Any:
    """A new scratch zoo holding the backbone (hard-linked where possible) and the dataset: no caches."""
    from st2si_cli.data.prepare import store_dataset
    from st2si_cli.zoo.store import Zoo

    zoo = Zoo(tempfile.mkdtemp(prefix="st2si-speed-"))
    zoo.put("backbone", {f: src.file(bb_art, f) for f in bb_art.files}, bb_art.meta, name=bb_art.name)
    store_dataset(zoo, ds, domain=domain, fmt="bench-subset", source=f"bench subset of {domain}")
    return zoo


def first_line(argv: list[str], stdin_path: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """(seconds to the first output line, seconds to the end, output lines) of a CLI command."""
    t0 = time.perf_counter()
    with open(stdin_path) as fin:
        proc = subprocess.Popen(
            argv, stdin=fin, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        t_first = time.perf_counter() - t0
        rest = proc.stdout.read()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(argv)}")
    lines = sum(1 for x in [first, *rest.splitlines()] if x.strip())
    return t_first, time.perf_counter() - t0, lines


class Rounds:
    """State shared by the steps of the rounds: the subset, its samples, the loaded backbone, results."""

    def __init__(self, args: Any, main_zoo: Any, ds: Any, domain: str):
        from st2si_cli.backbones import load_backbone, pull
        from st2si_cli.model.samples import build_samples, plan_batches
        from st2si_cli.model.text import ItemTokenizer, TextConfig
        from st2si_cli.zoo.store import Zoo

        self.args, self.ds, self.domain = args, ds, domain
        src = main_zoo.find(args.backbone, kind="backbone")
        self.scratch: list[Any] = []
        if src is None:  # tiny-opt / tiny-llama / smollm2-135m are built where they are missing
            self.src = Zoo(tempfile.mkdtemp(prefix="st2si-speed-src-"))
            self.scratch.append(self.src)
            self.bb_art = pull(self.src, args.backbone)
        else:
            self.src, self.bb_art = main_zoo, src
        self.text = TextConfig(max_items=args.max_items)
        self.zoo = fresh_zoo(self.src, self.bb_art, ds, domain)
        self.backbone = load_backbone(self.zoo, args.backbone, dtype="bf16")
        self.backbone.model.eval()
        itok = ItemTokenizer.create(self.backbone.tokenizer, self.text)
        item_tokens = itok.encode_items(ds.items)
        self.samples = build_samples(ds, itok, item_tokens, alignment=True)
        self.lengths = [len(s.tokens) for s in self.samples]
        self.batches = plan_batches(self.lengths, args.batch_tokens, 64)
        self.rec_samples = recommend_samples(ds, itok, item_tokens)
        self.rec_batches = plan_batches([len(s.tokens) for s in self.rec_samples], args.batch_tokens, 64)
        self.env = child_env(OMP_NUM_THREADS=str(args.threads))
        self.hist_file = Path(self.zoo.root) / "histories.jsonl"
        self.hist_lines = [
            json.dumps({"user": ds.users[u], "history": [ds.items[i]["id"] for i in seq[:-1]]})
            for u, seq in enumerate(ds.sequences)
        ]
        self.hist_file.write_text("\n".join(self.hist_lines) + "\n")
        self.adapt_runs: list[dict[str, Any]] = []
        self.inloop_runs: list[dict[str, Any]] = []
        self.cached_runs: list[dict[str, Any]] = []
        self.first_line_s: list[float] = []
        self.cli_recommend_s: list[float] = []
        self.scratch.append(self.zoo)

    def epochs_cfg(self) -> Any:
        from st2si_cli.train.head import HeadConfig

        return HeadConfig(max_epochs=self.args.epochs, patience=self.args.epochs)

    def adapt_cli(self) -> float:
        zoo = fresh_zoo(self.src, self.bb_art, self.ds, self.domain)
        self.scratch.append(zoo)
        e = str(self.args.epochs)
        run = run_timed(
            st2si_argv("--zoo", str(zoo.root), "adapt", "--domain", self.domain, "--backbone", self.args.backbone,
                       "--dtype", "bf16", "--epochs", e, "--patience", e, "--max-items", str(self.args.max_items),
                       "--json"),
            env=self.env,
        )  # fmt: skip
        out = json.loads(run.stdout)
        self.adapt_runs.append({**run.record(), "timings": out.get("timings"), "metrics": out.get("metrics")})
        self.zoo_with_head = zoo
        return run.wall_s

    def adapt_cached(self) -> float:
        from st2si_cli.features import compute_features
        from st2si_cli.model.samples import TEST
        from st2si_cli.train.head import evaluate_split, train_head

        zoo = fresh_zoo(self.src, self.bb_art, self.ds, self.domain)
        self.scratch.append(zoo)
        ds_id = zoo.get(self.domain, kind="dataset").id
        t0 = time.perf_counter()
        _, fs = compute_features(
            zoo, self.backbone, self.ds, ds_id, self.text, batch_tokens=self.args.batch_tokens
        )
        head = train_head(fs, self.ds.n_items, self.epochs_cfg())
        seconds = time.perf_counter() - t0
        self.cached_fs = fs
        self.cached_runs.append({"seconds": seconds, "test": evaluate_split(head.weight, fs, TEST)})
        return seconds

    def adapt_inloop(self) -> float:
        from st2si_cli.features import index_rows, live_features
        from st2si_cli.model.samples import TEST
        from st2si_cli.train.head import evaluate_split, train_head

        fs = index_rows(self.samples)
        live = live_features(self.backbone, self.samples, fs)
        t0 = time.perf_counter()
        head = train_head(fs, self.ds.n_items, self.epochs_cfg(), features_of=live, on_epoch=live.new_epoch)
        seconds = time.perf_counter() - t0
        passes = live.samples_run / len(self.samples) / max(1, len(head.history))
        self.inloop_runs.append(
            {
                "seconds": seconds,
                "test": evaluate_split(head.weight, self.cached_fs, TEST),
                "passes_per_epoch": passes,
            }
        )
        return seconds

    def recommend_lib(self) -> float:
        from st2si_cli.recommend import parse_requests, recommend

        zoo = self.zoo_with_head
        requests = parse_requests(self.hist_lines, "histories", self.ds.items)
        t0 = time.perf_counter()
        recommend(zoo, self.domain, requests, k=10)
        return time.perf_counter() - t0

    def recommend_cli(self) -> float:
        argv = st2si_argv("--zoo", str(self.zoo_with_head.root), "recommend", "--domain", self.domain,
                          "--user-history", "-", "-k", "10")  # fmt: skip
        t_first, t_all, n = first_line(argv, self.hist_file, self.env)
        if n != len(self.hist_lines):
            raise RuntimeError(f"recommend wrote {n} lines for {len(self.hist_lines)} users")
        self.first_line_s.append(t_first)
        self.cli_recommend_s.append(t_all)
        return t_all

    def close(self) -> None:
        for z in self.scratch:
            z.close()
            shutil.rmtree(z.root, ignore_errors=True)


def measure(args: Any, main_zoo: Any) -> dict[str, Any]:
    """The interleaved rounds on a subset of --users users; returns the run's record."""
    import torch

    from st2si_cli.data.prepare import load_dataset

    torch.set_num_threads(args.threads)
    full = load_dataset(main_zoo, args.domain)
    ds = subset(full, args.users, args.seed)
    scope = (
        f"subset of {ds.n_users} of {full.n_users} users (seed {args.seed}) and the {ds.n_items} of "
        f"{full.n_items} items they use"
    )
    log(f"Speed on {args.domain}: {scope}")
    st = Rounds(args, main_zoo, ds, args.domain)
    try:
        geo = model_geometry(st.backbone.model)
        shapes = linear_shapes(st.backbone.model)
        fpt = flops_per_token(geo, st.lengths)
        tokens = sum(st.lengths)
        gemm_flops = _gemm_round(shapes, args.gemm, torch.bfloat16)  # builds the operands once
        forward_pass(st.backbone, st.samples, st.batches[-1:])  # warm-up: oneDNN primitives, fused weights
        steps: dict[str, Callable[[], float]] = {
            "gemm": gemm_flops,
            "forward": lambda: forward_pass(st.backbone, st.samples, st.batches),
            "forward_plain": lambda: forward_pass(st.backbone, st.samples, st.batches, packed=False),
            "adapt_cli": st.adapt_cli,
            "adapt_cached": st.adapt_cached,
        }
        if not args.skip_live:
            steps["adapt_inloop"] = st.adapt_inloop
        steps["recommend"] = st.recommend_lib
        steps["forward_recommend"] = lambda: forward_pass(st.backbone, st.rec_samples, st.rec_batches)
        steps["recommend_cli"] = st.recommend_cli
        t = interleave(args.rounds, steps)
        gflop = gemm_flops.flops / 1e9
        gemm_rate = [gflop / s for s in t["gemm"]]
        fwd_rate = [tokens * fpt["total"] / 1e9 / s for s in t["forward"]]
        users = ds.n_users
        record: dict[str, Any] = {
            "scope": scope,
            "subset": {"users": ds.n_users, "items": ds.n_items, "of_users": full.n_users, "of_items": full.n_items},
            "model": geo,
            "flops_per_token": fpt,
            "samples": {"count": len(st.samples), "tokens": tokens, "batches": len(st.batches),
                        "padded_tokens": sum(len(b) * st.lengths[b[0]] for b in st.batches)},
            "gemm": {"shapes": shapes, "M": args.gemm, "dtype": "bfloat16", "gflop_per_round": gflop},
            "seconds": {k: stats(v) for k, v in t.items()},
            "adapt_cli_runs": st.adapt_runs,
            "adapt_cached_runs": st.cached_runs,
            "adapt_inloop_runs": st.inloop_runs,
            "first_line_seconds": stats(st.first_line_s),
        }  # fmt: skip
        ratios = {
            "forward_vs_gemm_roofline": ratio(
                fwd_rate, gemm_rate,
                "forward GFLOP/s (bf16, packed, real tokens x FLOPs/token)", "GEMM GFLOP/s (bf16, model shapes)",
            ),
            "forward_packed_vs_plain": ratio(
                t["forward_plain"], t["forward"], "plain transformers forward seconds", "packed forward seconds"
            ),
            "adapt_vs_forward": ratio(
                t["adapt_cli"], t["forward"], "st2si adapt CLI wall seconds", "bare forward pass seconds"
            ),
            "recommend_vs_forward": ratio(
                [users / s for s in t["recommend"]], [users / s for s in t["forward_recommend"]],
                "recommend library users/s (loads included)", "bare forward users/s over the same inputs",
            ),
            "recommend_cli_vs_forward": ratio(
                [users / s for s in t["recommend_cli"]], [users / s for s in t["forward_recommend"]],
                "st2si recommend CLI users/s", "bare forward users/s over the same inputs",
            ),
        }  # fmt: skip
        if not args.skip_live:
            ratios["inloop_vs_cached_adapt"] = {
                **ratio(t["adapt_inloop"], t["adapt_cached"],
                        f"adapt with the backbone in the loop, {args.epochs} epochs, seconds",
                        f"adapt on cached features (feature pass + {args.epochs} epochs), seconds"),
                "test_ndcg10_inloop": [r["test"]["NDCG@10"] for r in st.inloop_runs],
                "test_ndcg10_cached": [r["test"]["NDCG@10"] for r in st.cached_runs],
                "inloop_passes_per_epoch": [round(r["passes_per_epoch"], 3) for r in st.inloop_runs],
            }  # fmt: skip
        record["ratios"] = ratios
        return record
    finally:
        st.close()


def _gemm_round(shapes: list[tuple[int, int, int]], m: int, dtype: Any) -> Any:
    """A step timing one round of F.linear over the model's shapes; `.flops` is the round's FLOPs."""
    import torch
    import torch.nn.functional as F

    xs = {k: torch.randn(m, k, dtype=dtype) for k, _, _ in shapes}
    ws = [(torch.randn(n, k, dtype=dtype) * 0.02, k, c) for k, n, c in shapes]

    def step() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for w, k, c in ws:
                for _ in range(c):
                    F.linear(xs[k], w)
            return time.perf_counter() - t0

    step()  # warm-up (oneDNN primitive creation)
    step.flops = sum(2.0 * m * k * w.shape[0] * c for w, k, c in ws)  # type: ignore[attr-defined]
    return step


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

    from st2si_cli.hf import quiet_transformers
    from st2si_cli.zoo.store import Zoo

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
        from million import million_items

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
