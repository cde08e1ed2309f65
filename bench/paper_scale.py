"""A paper-scale synthetic domain (the paper's Office: about 100k users, 30k items, 800k interactions)
with real-length titles, so users can plan: its feature pass rate on this machine, and on a card the
whole recipe end to end.

    python -m bench.paper_scale --titles-from ../shared/data/amazon-scientific --cpu-batches 3
    python -m bench.paper_scale --titles-from DATA --recipe --device cuda      # on a GPU: the whole recipe

Titles are made from real ones: each item takes a real title's length in words and draws its words from
the real titles' vocabulary, so titles tokenise to real lengths (`--titles-from`: a folder `st2si
prepare` reads; without it, made-up words of 3-7 syllables). Histories: 3 items plus a geometric tail
(mean about 8 items), popular items more often (Zipf-like). Nothing is committed: the data is generated
from the seed. `--cpu-batches K` times K batches of the token-budget plan after one warm-up batch and
projects the whole pass from the plan's token count; `--recipe` stores the domain in a scratch zoo and
runs `st2si adapt --domain paper-scale` (the recipe, `--budget none` unless given) as a user would.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import child_env, log, provenance, result_path, run_timed, st2si_argv, write_json


def real_titles(folder: str | None) -> list[str]:
    """Titles of the items of a dataset folder `st2si prepare` reads (empty without one)."""
    if not folder:
        return []
    from st2si_cli import parse_dataset

    ds, _ = parse_dataset(folder)
    return [it["title"] for it in ds.items if it.get("title")]


def paper_scale_dataset(n_users: int, n_items: int, titles: list[str], seed: int = 0) -> Any:
    from st2si_cli import Dataset

    rng = random.Random(seed)
    if titles:
        vocab = sorted({w for t in titles for w in t.split()})
        lengths = [len(t.split()) for t in titles]
    else:
        syl = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "bra", "cle", "dro", "fli"]
        vocab = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(3, 7))) for _ in range(20000)})
        lengths = list(range(6, 19))
    items = [
        {"id": f"item{j}", "title": " ".join(rng.choice(vocab) for _ in range(rng.choice(lengths)))}
        for j in range(n_items)
    ]
    sequences = []
    for _ in range(n_users):
        n = 3
        while rng.random() < 5 / 6 and n < 200:  # geometric tail: mean length about 8
            n += 1
        seq: list[int] = []
        while len(seq) < n:
            j = int(n_items * rng.random() ** 3)
            if not seq or seq[-1] != j:
                seq.append(j)
        sequences.append(seq)
    users = [f"user{u}" for u in range(n_users)]
    return Dataset(items=items, users=users, sequences=sequences, report={"synthetic": True, "seed": seed})


def cpu_rate(ds: Any, backbone: str, dtype: str, batches_timed: int, zoo_root: str) -> dict[str, Any]:
    """Tokens/s of the packed feature pass over the first batches of the plan, and the projected pass."""
    import torch

    from st2si_cli import ItemTokenizer, TextConfig, Zoo, build_samples, load_backbone, plan_batches, pull

    zoo = Zoo(zoo_root)
    pull(zoo, backbone)
    bb = load_backbone(zoo, backbone, dtype=dtype)
    itok = ItemTokenizer.create(bb.tokenizer, TextConfig())
    t0 = time.perf_counter()
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    build_s = time.perf_counter() - t0
    lengths = [len(s.tokens) for s in samples]
    plan = plan_batches(lengths, 16384, 64)
    model = bb.st2si()
    timed = []
    with torch.inference_mode():
        for k, b in enumerate(plan[: batches_timed + 1]):
            t = time.perf_counter()
            model.hidden_at([samples[i] for i in b])
            if k:  # the first batch warms up (fused weights, oneDNN primitives)
                timed.append((sum(lengths[i] for i in b), time.perf_counter() - t))
    tokens, seconds = sum(t for t, _ in timed), sum(s for _, s in timed)
    rate = tokens / seconds
    total = sum(lengths)
    return {
        "backbone": backbone,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "samples": len(samples),
        "tokens": total,
        "batches": len(plan),
        "samples_build_seconds": round(build_s, 1),
        "batches_timed": len(timed),
        "tokens_timed": tokens,
        "seconds_timed": round(seconds, 2),
        "tokens_per_s": round(rate, 1),
        "projected_pass_seconds": round(total / rate, 0),
    }


def recipe(ds: Any, backbone: str, device: str, budget: str, zoo_root: str) -> dict[str, Any]:
    """The recipe end to end through the CLI, timed as a whole process."""
    from st2si_cli import Zoo, pull, store_dataset

    zoo = Zoo(zoo_root)
    store_dataset(zoo, ds, domain="paper-scale", fmt="synthetic", source="bench/paper_scale.py")
    pull(zoo, backbone)
    argv = st2si_argv(
        "--zoo", zoo_root, "adapt", "--domain", "paper-scale", "--backbone", backbone,
        "--device", device, "--budget", budget, "--json",
    )  # fmt: skip
    run = run_timed(argv, env=child_env())
    out = json.loads(run.stdout) if run.stdout.strip() else {}
    return {**run.record(), "recipe": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--titles-from", default=None, help="a dataset folder whose titles give real lengths")
    p.add_argument("--backbone", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--cpu-batches", type=int, default=0, help="time this many batches of the pass (0: skip)")
    p.add_argument("--recipe", action="store_true", help="run the whole recipe through the CLI")
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", default="none")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    ds = paper_scale_dataset(args.users, args.items, real_titles(args.titles_from), args.seed)
    interactions = sum(len(s) for s in ds.sequences)
    log(f"paper scale: {len(ds.users):,} users, {len(ds.items):,} items, {interactions:,} interactions")
    record: dict[str, Any] = {
        "part": "paper-scale",
        "provenance": provenance(),
        "data": {
            "users": len(ds.users),
            "items": len(ds.items),
            "interactions": interactions,
            "titles_from": args.titles_from,
            "seed": args.seed,
            "generate_seconds": round(time.perf_counter() - t0, 1),
        },
    }
    root = tempfile.mkdtemp(prefix="st2si-paper-scale-")
    try:
        if args.cpu_batches:
            record["feature_pass"] = cpu_rate(ds, args.backbone, args.dtype, args.cpu_batches, root)
            fp = record["feature_pass"]
            log(
                f"feature pass: {fp['tokens_per_s']:,.0f} tokens/s over {fp['batches_timed']} batches; the whole "
                f"pass ({fp['tokens']:,} tokens, {fp['batches']} batches) would take about "
                f"{fp['projected_pass_seconds'] / 3600:.1f} h here"
            )
        if args.recipe:
            record["recipe"] = recipe(ds, args.backbone, args.device, args.budget, root)
            log(f"recipe: {record['recipe'].get('wall_s')} s wall")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    path = write_json(result_path(Path(args.out), "paper-scale"), record)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
