"""The speed benchmark's measurements: a subset of users in scratch zoos, and the steps of one interleaved
round (forward passes, `st2si adapt`, adapt on cached features and with the backbone in the loop,
`recommend` as a library call and as a command), timed by `measure`."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import child_env, log, run_timed, st2si_argv
from bench.speed_roofline import (
    flops_per_token,
    gemm_round,
    interleave,
    linear_shapes,
    model_geometry,
    ratio,
    stats,
)

# ---- forward passes ------------------------------------------------------------------------------------------


def recommend_samples(ds: Any, itok: Any, item_tokens: list[list[int]]) -> list[Any]:
    """What `recommend` feeds the backbone for each user's history (all but the test item)."""
    from st2si_cli import Sample

    out = []
    for seq in ds.sequences:
        toks = [item_tokens[i] for i in seq[:-1]]
        m = itok.history_window(toks)
        tokens, qpos = itok.sequence(toks[len(toks) - m :])
        out.append(Sample(tokens, [qpos[-1]], [], [], 0))
    return out


# ---- the subset and the scratch zoo --------------------------------------------------------------------------


def subset(ds: Any, n_users: int, seed: int) -> Any:
    from st2si_cli import Dataset, drop_unused_items

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

    from st2si_cli import query_features

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
    from st2si_cli import Zoo, store_dataset

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
        from st2si_cli import ItemTokenizer, TextConfig, Zoo, build_samples, load_backbone, plan_batches, pull

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
        from st2si_cli import HeadConfig

        return HeadConfig(max_epochs=self.args.epochs, patience=self.args.epochs)

    def adapt_cli(self) -> float:
        zoo = fresh_zoo(self.src, self.bb_art, self.ds, self.domain)
        self.scratch.append(zoo)
        e = str(self.args.epochs)
        run = run_timed(
            st2si_argv("--zoo", str(zoo.root), "adapt", "--domain", self.domain, "--head", "ilp", "--backbone", self.args.backbone,
                       "--dtype", "bf16", "--epochs", e, "--patience", e, "--max-items", str(self.args.max_items),
                       "--json"),
            env=self.env,
        )  # fmt: skip
        out = json.loads(run.stdout)
        self.adapt_runs.append({**run.record(), "timings": out.get("timings"), "metrics": out.get("metrics")})
        self.zoo_with_head = zoo
        return run.wall_s

    def adapt_cached(self) -> float:
        from st2si_cli import TEST, compute_features, evaluate_split, train_head

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
        from st2si_cli import TEST, evaluate_split, index_rows, live_features, train_head

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
        from st2si_cli import parse_requests, recommend_requests

        zoo = self.zoo_with_head
        requests = parse_requests(self.hist_lines, "histories", self.ds.items)
        t0 = time.perf_counter()
        recommend_requests(zoo, self.domain, requests, k=10)
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

    from st2si_cli import load_dataset

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
        gemm_flops = gemm_round(shapes, args.gemm, torch.bfloat16)  # builds the operands once
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
