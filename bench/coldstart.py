"""Cold-start benchmark: items a head never trained on, placed from their text by `st2si items add`.

    python -m bench.coldstart --zoo ZOO --domain amazon-scientific --backbone smollm2-135m --compute-features
    python -m bench.coldstart --zoo ZOO --domain amazon-scientific --heads adapter --tag adapter
    python -m bench.coldstart --zoo ZOO --domain amazon-scientific --heads none --tag sasrec   # after quality.py

1. Cold items: those whose first interaction falls in the test split (`--cold test-only`: items that only
   ever appear as a user's last item), or a seeded random fraction of the catalog (`--cold random`, default
   10%) with all their training interactions removed: the domain's sequences lose every non-test
   occurrence of a cold item, so a cold item appears only as a test target. This cold split is stored as
   its own domain, `<domain>-cold<fraction>`, so `python -m bench.quality --domain <that>` trains SASRec on
   exactly the same data (it then sees cold items only as test targets: their embeddings never get a
   positive update, i.e. SASRec scores them near their initial value).
2. Warm training data: the cold split without the users whose test target is cold and without the cold
   items, stored as domain `<domain>-cold<fraction>-warm`; its feature cache is cut from the cold split's
   (the same samples, so no second forward pass). The heads (`--heads`, default the paper ILP and the
   text-initialised ILP) are trained there with `adapt`.
3. `items add` puts the cold items into the warm catalog: each head gets their rows from their text, once
   per `--placement` value (default `auto,neighbour`: each head's own map, then the nearest known item's
   trained row / ID embedding), each time from the same trained heads.
4. Ranking, full catalog, pessimistic ties: the test users whose target is cold (cold-target users), by
   each grown head, by popularity (cold items have no training interactions, so they rank last), and by
   SASRec where its run on the cold split exists (`bench/.work/<cold domain>/SASRec`); the other
   (warm-target) users by each head before and after the catalog grew, and all users after it grew.

Writes `results/<date>-<machine>-coldstart-<domain>.json`. The zoo gets the two domains above, their
feature caches and heads; the source domain is only read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.coldstart_split import cold_items, cold_split, in_grown_catalog, store_cache, warm_part
from bench.common import BENCH_DIR, RESULTS_DIR, format_table, log, provenance, result_path, write_json

KS = (10,)


def head_configs(names: list[str], max_epochs: int) -> dict[str, Any]:
    from st2si_cli import AdapterConfig, HeadConfig

    known = {
        "ilp": HeadConfig(max_epochs=max_epochs),
        "ilp-text": HeadConfig(init="text", max_epochs=max_epochs),
        "adapter": AdapterConfig(max_epochs=max_epochs),
    }
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown head kind {bad[0]!r}: choose from {', '.join(known)}")
    return {n: known[n] for n in names}


def popularity_ranks(ds: Any, rows_users: list[int], targets: Any) -> Any:
    import torch

    from st2si_cli import rank_of_target

    counts = torch.zeros(ds.n_items)
    for seq in ds.sequences:
        for i in seq[:-1]:
            counts[i] += 1
    return rank_of_target(counts.expand(len(rows_users), -1), targets, ties="pessimistic")


def sasrec_ranks(ds: Any, folder: Path, users: list[int]) -> Any | None:
    """SASRec's ranks of the given users' test targets, from its run on the cold split (None if absent)."""
    import numpy as np
    import torch

    from st2si_cli import rank_of_target

    if not (folder / "test_scores.npy").exists():
        return None
    from bench.quality_recbole import check_split

    # Only the test rows are scored here, so only they must be st2si's, user by user. (On the random-10%
    # cold split of amazon-scientific, RecBole's validation split leaves out 154 of the 8,309 users, all
    # with 3 items; that only changes which users SASRec's early stopping looks at.)
    check_split(ds, folder, "SASRec", splits=("test",))
    order = {int(u): r for r, u in enumerate(np.load(folder / "test_users.npy"))}
    scores = np.load(folder / "test_scores.npy", mmap_mode="r")
    block = torch.from_numpy(np.array(scores[[order[u] for u in users]]))
    targets = torch.tensor([ds.sequences[u][-1] for u in users])
    return rank_of_target(block, targets, ties="pessimistic")


@dataclass
class Warm:
    """The warm training domain: its name, dataset and feature set."""

    domain: str
    ds: Any
    fs: Any


def rows_for_heads(
    zoo: Any, args: Any, kinds: list[str], warm: Warm, source: tuple[Any, Any, set[int]], rows: list[Any]
) -> float | None:
    """Train each head kind on the warm domain, add the cold items with `items add`, and append a row per
    head (cold-target users on the grown catalog; warm-target users before and after it grew). Returns
    the seconds `items add` took (None without heads)."""
    if not kinds:
        return None
    from st2si_cli import (
        TEST,
        FeatureOptions,
        ItemsOptions,
        TextConfig,
        adapt_head,
        add_items,
        load_dataset,
        metrics_from_ranks,
        store_dataset,
        user_ranks,
    )

    split, fs, cold = source
    heads = {}
    for kind, cfg in head_configs(kinds, args.max_epochs).items():
        log(f"training {kind} on {warm.domain} ({warm.ds.n_items} items, {warm.ds.n_users} users)")
        heads[kind] = adapt_head(
            zoo,
            warm.domain,
            backbone=args.backbone,
            text=TextConfig(),
            head_cfg=cfg,
            feature_opts=FeatureOptions(dtype=args.dtype, alignment=True),
            name=f"{warm.domain}/{kind}",
        )
    cold_users = [u for u, seq in enumerate(split.sequences) if seq[-1] in cold]
    warm_users = [u for u, seq in enumerate(split.sequences) if seq[-1] not in cold]
    add_seconds = 0.0
    for n_run, placement in enumerate(args.placement.split(",")):
        if n_run:  # the name back on the warm catalog, so `items add` extends the heads trained there again
            store_dataset(
                zoo,
                warm.ds,
                domain=warm.domain,
                fmt="coldstart",
                source=warm.domain.removesuffix("-warm"),
                replace=True,
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "cold-items.jsonl"
            path.write_text(
                "".join(
                    json.dumps(
                        {
                            "item": split.items[i]["id"],
                            **{k: v for k, v in split.items[i].items() if k != "id"},
                        }
                    )
                    + "\n"
                    for i in sorted(cold)
                )
            )
            t_add = time.time()
            change = add_items(zoo, warm.domain, path, ItemsOptions(placement=placement))
            add_seconds += time.time() - t_add
        grown = load_dataset(zoo, change.dataset.id)
        grown_fs, grown_seqs = in_grown_catalog(split, fs, grown)
        grown_heads = {old.id: new for old, new in change.heads}
        for kind, head in heads.items():
            new = grown_heads[head.id]
            ranks = user_ranks(zoo, new, grown_fs, grown_seqs, TEST)  # every user of the cold split
            warm_before = user_ranks(zoo, head, warm.fs, warm.ds.sequences, TEST)
            rows.append(
                {
                    "model": f"st2si {kind} + items add ({new.meta['catalog']['placement']['method']})",
                    "placement_option": placement,
                    "cold": metrics_from_ranks(ranks[cold_users], KS),
                    "warm_before": metrics_from_ranks(warm_before, KS),
                    "warm_after": metrics_from_ranks(ranks[warm_users], KS),
                    "all_after": metrics_from_ranks(ranks, KS),
                    "head": new.id,
                    "placement": new.meta["catalog"]["placement"],
                }
            )
    return round(add_seconds, 2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", required=True, help="zoo folder holding the domain's dataset and the backbone")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--backbone", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--cold", choices=("random", "test-only"), default="random")
    ap.add_argument(
        "--fraction", type=float, default=0.1, help="--cold random: share of the catalog held out"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--users", type=int, default=None, help="a slice: only the first N users (smoke runs)")
    ap.add_argument(
        "--heads",
        default="ilp,ilp-text",
        help="head kinds to train: ilp, ilp-text, adapter; none: only the popularity and SASRec rows",
    )
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument(
        "--placement",
        default="auto,neighbour",
        help="comma-separated `items add --placement` values, each measured on the same trained heads",
    )
    ap.add_argument(
        "--compute-features", action="store_true", help="allow a forward pass over the cold split"
    )
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--tag", default=None)
    args = ap.parse_args()

    import torch

    from st2si_cli import (
        Dataset,
        FeatureOptions,
        TextConfig,
        Zoo,
        cache_key,
        cache_name,
        dtype_name,
        ensure_backbone,
        get_features,
        load_dataset,
        metrics_from_ranks,
        resolve_dtype,
        store_dataset,
    )

    t0 = time.time()
    prov = provenance()
    zoo = Zoo(args.zoo)
    src_art = zoo.get(args.domain, kind="dataset")
    ds = load_dataset(zoo, src_art.id)
    base = args.domain
    if args.users:
        used = sorted({i for seq in ds.sequences[: args.users] for i in seq})
        remap = {i: k for k, i in enumerate(used)}
        ds = Dataset(
            [ds.items[i] for i in used],
            ds.users[: args.users],
            [[remap[i] for i in seq] for seq in ds.sequences[: args.users]],
            report=ds.report,
        )
        base = f"{args.domain}-first{args.users}"
    cold = set(cold_items(ds, args.cold, args.fraction, args.seed))
    tag = "test-only" if args.cold == "test-only" else f"{args.fraction:g}-seed{args.seed}"
    cold_domain = f"{base}-cold{tag}"
    split = cold_split(ds, cold)
    split_art = store_dataset(
        zoo, split, domain=cold_domain, fmt="coldstart", source=f"{args.domain} ({src_art.id[:12]})"
    )
    log(f"{cold_domain}: {len(cold)} cold items of {split.n_items}, {split.n_users} users")

    text = TextConfig()
    opts = FeatureOptions(dtype=args.dtype, alignment=True)
    bb = ensure_backbone(zoo, args.backbone)
    key = cache_key(bb.id, split_art.id, text, dtype_name(resolve_dtype(args.dtype)), True)
    if zoo.find(cache_name(key), kind="features") is None and not args.compute_features:
        raise SystemExit(f"no feature cache for {cold_domain}: add --compute-features (one forward pass)")
    feat_art, fs, _ = get_features(zoo, bb.id, split_art, text, opts, ds=split)

    warm, warm_fs = warm_part(split, fs, cold)
    warm_domain = f"{cold_domain}-warm"
    # replace: a rerun finds the name on the grown catalog that the last run's `items add` made
    warm_art = store_dataset(zoo, warm, domain=warm_domain, fmt="coldstart", source=cold_domain, replace=True)
    store_cache(zoo, warm_fs, feat_art, warm_art)
    cold_users = [u for u, seq in enumerate(split.sequences) if seq[-1] in cold]
    rows: list[dict[str, Any]] = []
    kinds = [] if args.heads == "none" else args.heads.split(",")
    add_seconds = rows_for_heads(zoo, args, kinds, Warm(warm_domain, warm, warm_fs), (split, fs, cold), rows)
    split_targets = torch.tensor([split.sequences[u][-1] for u in cold_users])
    rows.append(
        {
            "model": "popularity",
            "cold": metrics_from_ranks(popularity_ranks(split, cold_users, split_targets), KS),
        }
    )
    sas_dir = BENCH_DIR / ".work" / cold_domain / "SASRec"
    sas = sasrec_ranks(split, sas_dir, list(range(split.n_users)))  # trained on the cold split: every user
    sasrec_note = None
    if sas is not None:
        warm_users = [u for u, seq in enumerate(split.sequences) if seq[-1] not in cold]
        rows.append(
            {
                "model": "SASRec (cold items: no positive update)",
                "cold": metrics_from_ranks(sas[cold_users], KS),
                "warm_after": metrics_from_ranks(sas[warm_users], KS),
                "all_after": metrics_from_ranks(sas, KS),
            }
        )
    else:
        sasrec_note = (
            f"not run: python -m bench.quality --zoo {args.zoo} --domain {cold_domain} --models sasrec "
            "--threads 1 --check-splits test --summary bench/.work/quality-summary-coldsplit.json"
        )

    headers = ["model", "cold NDCG@10", "cold Recall@10", "warm NDCG@10 before", "after", "all users after"]
    table = [
        [
            r["model"],
            f"{r['cold']['NDCG@10']:.4f}",
            f"{r['cold']['Recall@10']:.4f}",
            f"{r['warm_before']['NDCG@10']:.4f}" if "warm_before" in r else "",
            f"{r['warm_after']['NDCG@10']:.4f}" if "warm_after" in r else "",
            f"{r['all_after']['NDCG@10']:.4f}" if "all_after" in r else "",
        ]
        for r in rows
    ]
    print(format_table(headers, table))
    if sasrec_note:
        print(f"SASRec {sasrec_note}")
    result = {
        "provenance": prov,
        "domain": args.domain,
        "cold_domain": cold_domain,
        "warm_domain": warm_domain,
        "backbone": bb.name,
        "cold": {
            "how": args.cold,
            "fraction": args.fraction,
            "seed": args.seed,
            "items": len(cold),
            "users": len(cold_users),
        },
        "warm_users": warm.n_users,
        "rows": rows,
        "sasrec": sasrec_note or str(sas_dir),
        "items_add_seconds": add_seconds,
        "seconds": round(time.time() - t0, 1),
    }
    out = write_json(result_path(Path(args.out), "coldstart", args.tag or base), result)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
