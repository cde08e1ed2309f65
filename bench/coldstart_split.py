"""The cold-start benchmark's data: which items are cold, the cold split (cold items only as test targets),
its warm part with the feature rows cut from the cold split's cache, and those rows renumbered into the
catalog that `items add` grew."""

from __future__ import annotations

import random
from typing import Any


def cold_items(ds: Any, how: str, fraction: float, seed: int) -> list[int]:
    """Item IDs held out: only-in-test items, or a seeded random fraction of the catalog."""
    if how == "test-only":
        seen = {i for seq in ds.sequences for i in seq[:-1]}
        return sorted({seq[-1] for seq in ds.sequences} - seen)
    rng = random.Random(seed)
    return sorted(rng.sample(range(ds.n_items), max(1, round(fraction * ds.n_items))))


def cold_split(ds: Any, cold: set[int]) -> Any:
    """The dataset with every non-test occurrence of a cold item removed (users left with < 3 items dropped)."""
    from st2si_cli import Dataset

    users, seqs = [], []
    for u, seq in zip(ds.users, ds.sequences):
        kept = [i for i in seq[:-1] if i not in cold] + [seq[-1]]
        if len(kept) >= 3:
            users.append(u)
            seqs.append(kept)
    return Dataset(ds.items, users, seqs, report={**ds.report, "cold_split": len(cold)})


def warm_part(ds: Any, fs: Any, cold: set[int]) -> tuple[Any, Any]:
    """(dataset, FeatureSet) without the cold items and the users whose test target is cold; the rows are
    the cold split's own (same samples), renumbered."""
    import torch

    from st2si_cli import ALIGN, Dataset

    warm_items = [i for i in range(ds.n_items) if i not in cold]
    imap = torch.full((ds.n_items,), -1, dtype=torch.long)
    imap[warm_items] = torch.arange(len(warm_items))
    warm_users = [u for u, seq in enumerate(ds.sequences) if seq[-1] not in cold]
    umap = torch.full((ds.n_users,), -1, dtype=torch.long)
    umap[warm_users] = torch.arange(len(warm_users))
    align = fs.roles == ALIGN
    item_of = imap[fs.targets]  # every row's target in the warm catalog (-1: cold)
    user_of = torch.full_like(fs.owner, -1)
    user_of[~align] = umap[fs.owner[~align]]
    keep = (item_of >= 0) & (align | (user_of >= 0))
    rows = torch.nonzero(keep).flatten()
    owner = torch.where(align[rows], item_of[rows], user_of[rows])  # an ALIGN row's owner is its item
    _, sample = torch.unique(fs.sample[rows], return_inverse=True)
    warm_fs = type(fs)(fs.feats[rows], imap[fs.targets[rows]], fs.roles[rows], owner, sample)
    items = [ds.items[i] for i in warm_items]
    seqs = [[int(imap[i]) for i in ds.sequences[u]] for u in warm_users]
    return Dataset(items, [ds.users[u] for u in warm_users], seqs, report=ds.report), warm_fs


def in_grown_catalog(ds: Any, fs: Any, grown: Any) -> tuple[Any, list[list[int]]]:
    """The cold split's FeatureSet and sequences with item IDs of the grown catalog (warm items, then the
    cold ones as `items add` appended them)."""
    import torch

    from st2si_cli import ALIGN

    gid = {item["id"]: i for i, item in enumerate(grown.items)}
    to_grown = torch.tensor([gid[item["id"]] for item in ds.items])
    align = fs.roles == ALIGN
    owner = torch.where(align, to_grown[fs.targets], fs.owner)
    grown_fs = type(fs)(fs.feats, to_grown[fs.targets], fs.roles, owner, fs.sample)
    return grown_fs, [[gid[ds.items[i]["id"]] for i in seq] for seq in ds.sequences]


def store_cache(zoo: Any, fs: Any, like: Any, dataset_art: Any) -> Any:
    """Store `fs` as the feature cache of `dataset_art` under the key `compute_features` would use."""
    import torch
    from safetensors.torch import save

    from st2si_cli import TextConfig, cache_key, cache_name

    meta = dict(like.meta)
    key = cache_key(
        meta["inputs"]["backbone"], dataset_art.id, TextConfig.from_dict(meta["text"]), meta["dtype"], True
    )
    if zoo.find(cache_name(key), kind="features") is not None:
        return zoo.find(cache_name(key), kind="features")
    t = fs.tensors()
    t["feats"] = t["feats"].to(getattr(torch, meta["dtype"]))
    meta.update(
        key=key,
        inputs={"backbone": meta["inputs"]["backbone"], "dataset": dataset_art.id, "features": like.id},
        positions=int(fs.targets.numel()),
        samples=int(fs.sample.max()) + 1,
        cut_from=like.id,
    )
    blob = save({k: v.contiguous() for k, v in t.items()})
    return zoo.put(
        "features", {"features.safetensors": blob}, meta, name=cache_name(key), identity={"key": key}
    )
