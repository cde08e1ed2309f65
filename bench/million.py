"""A synthetic catalog of a million items with text, and users over it: adapt, eval and recommend on it.

    python -m bench.speed --million 1000000 --million-only        # via speed.py, which records it

The catalog and histories are generated here from a seed (titles from a made-up vocabulary, item
popularity Zipf-like) into a scratch zoo that is removed afterwards; nothing is committed. The backbone
is `tiny-opt` by default (a random 2-layer OPT, hidden 32): this measures what grows with the catalog
(memory, ILP epochs over N items, top-k over N items), not the language model. Each CLI command runs
under `/usr/bin/time -v` for its peak RSS.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from typing import Any

from bench.common import child_env, log, run_timed, st2si_argv

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "sa",
    "ti",
    "vo",
    "xe",
    "zu",
    "bra",
    "cle",
    "dro",
    "fli",
    "gra",
    "pho",
]


def synthetic_dataset(n_items: int, n_users: int, seed: int = 0) -> Any:
    """n_items titled items and n_users histories of 5-30 items (Zipf-like popularity)."""
    from st2si_cli import Dataset

    rng = random.Random(seed)
    words = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(5000)})
    items = [
        {"id": f"item{j}", "title": " ".join(rng.choice(words) for _ in range(rng.randint(3, 7)))}
        for j in range(n_items)
    ]
    sequences = []
    for _ in range(n_users):
        n = rng.randint(5, 30)
        sequences.append([int(n_items * rng.random() ** 4) for _ in range(n)])  # popular items first
    users = [f"user{u}" for u in range(n_users)]
    return Dataset(items=items, users=users, sequences=sequences, report={"synthetic": True, "seed": seed})


def million_items(
    n_items: int, n_users: int, backbone: str, threads: int, seed: int = 0, alignment: bool = False
) -> dict[str, Any]:
    """adapt (1 ILP epoch), eval and recommend on the synthetic catalog; peak RSS, epoch seconds, top-k ms/user.

    Without `alignment` adapt runs `--no-alignment`: the ILP trains on the users' positions only. The
    feature cache still holds one alignment feature per item (adapt always caches them: N x d, 128 MB
    for a million items at d = 32 in fp32), and the ILP, eval and top-k span all n_items.
    """
    import torch

    from st2si_cli import TEST, Zoo, load_feature_set, load_head_weight, pull, store_dataset, top_k

    root = tempfile.mkdtemp(prefix="st2si-million-")
    out: dict[str, Any] = {
        "items": n_items, "users": n_users, "backbone": backbone, "seed": seed, "alignment": alignment
    }  # fmt: skip
    try:
        t0 = time.perf_counter()
        ds = synthetic_dataset(n_items, n_users, seed)
        zoo = Zoo(root)
        store_dataset(zoo, ds, domain="million", fmt="synthetic", source="bench/million.py")
        pull(zoo, backbone)
        out["generate_seconds"] = round(time.perf_counter() - t0, 1)
        log(f"million: {n_items} items, {n_users} users generated in {out['generate_seconds']} s")
        env = child_env(OMP_NUM_THREADS=str(threads))
        z = ["--zoo", root]
        adapt = run_timed(
            st2si_argv(*z, "adapt", "--domain", "million", "--head", "ilp", "--backbone", backbone, "--dtype", "fp32",
                       "--epochs", "1", "--patience", "1", "--json", *([] if alignment else ["--no-alignment"])),
            env=env,
        )  # fmt: skip
        head = json.loads(adapt.stdout)
        out["adapt"] = {**adapt.record(), "timings": head["timings"], "metrics": head["metrics"]}
        log(f"million: adapt {adapt.wall_s:.0f} s, peak RSS {adapt.peak_rss_mb:.0f} MB")
        ev = run_timed(st2si_argv(*z, "eval", "--domain", "million", "--json"), env=env)
        out["eval"] = ev.record()
        log(f"million: eval {ev.wall_s:.0f} s, peak RSS {ev.peak_rss_mb:.0f} MB")
        n_rec = min(200, n_users)
        lines = [
            json.dumps({"user": ds.users[u], "history": [ds.items[i]["id"] for i in ds.sequences[u]]})
            for u in range(n_rec)
        ]
        rec = run_timed(
            st2si_argv(*z, "recommend", "--domain", "million", "--user-history", "-", "-k", "10"),
            stdin="\n".join(lines) + "\n",
            env=env,
        )
        if sum(1 for x in rec.stdout.splitlines() if x.strip()) != n_rec:
            raise RuntimeError("recommend did not answer every user")
        out["recommend"] = {**rec.record(), "users": n_rec}
        log(f"million: recommend {rec.wall_s:.0f} s, peak RSS {rec.peak_rss_mb:.0f} MB")

        # Top-k alone: the head's N x d weight against the users' test-query features, chunked as recommend does.
        head_art = zoo.newest("head", "million")
        weight = load_head_weight(zoo, head_art)
        fs = load_feature_set(zoo, zoo.get(head_art.meta["inputs"]["features"], kind="features"))
        feats = fs.feats[fs.rows(TEST)][:n_rec]
        torch.set_num_threads(threads)
        top_k(weight, feats[:2], 10)  # warm-up
        t1 = time.perf_counter()
        top_k(weight, feats, 10)
        topk_ms = (time.perf_counter() - t1) * 1000 / feats.shape[0]
        zoo.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    epochs = 1  # adapt ran --epochs 1
    training_s = out["adapt"]["timings"].get("training_seconds")
    peak_mb = max(out[k]["peak_rss_mb"] or 0 for k in ("adapt", "eval", "recommend"))
    out["summary"] = {
        "peak_rss_gb": round(peak_mb / 1024, 2),
        "peak_rss_of": {k: out[k]["peak_rss_mb"] for k in ("adapt", "eval", "recommend")},
        "epoch_seconds": None if training_s is None else round(training_s / epochs, 1),
        "epoch_seconds_is": "adapt's ILP training seconds (1 epoch + its validation) / epochs",
        "topk_ms_per_user": round(topk_ms, 2),
        "topk_is": f"scoring.top_k, k=10, over {n_items} items, {feats.shape[0]} users in one call",
        "items": n_items,
        "users": n_users,
        "backbone": backbone,
        "alignment_samples": alignment,
        "commands": {k: out[k]["command"] for k in ("adapt", "eval", "recommend")},
    }
    return out
