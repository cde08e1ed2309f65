"""Sequence-adapter heads in the zoo: train on cached features, store, load, rank.

The adapter (`st2si_cli.train.adapter`) reads a user's query features position by position, with
the IDs of the items where they are catalog items, and scores items by their text features and IDs.
It trains on the same feature cache as the ILP, so the backbone never runs in its loop.
"""

from __future__ import annotations

from typing import Any

from st2si_cli.heads import HeadOrigin, load_head_tensors, store_head
from st2si_cli.zoo.store import Artifact, Zoo

HEAD_KIND = "adapter"


def train_adapter_head(
    fs: Any, ds: Any, cfg: Any = None, reporter: Any = None, sweep_trials: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, head meta) of an adapter trained with early stopping on validation NDCG@10.

    With `sweep_trials` (0: the whole grid), points of `ADAPTER_GRID` are tried and the best on
    validation is kept; the sweep is recorded in the meta.
    """
    from st2si_cli.model.samples import TEST, VALID
    from st2si_cli.train.adapter import AdapterConfig, evaluate_adapter, load_adapter, train_adapter
    from st2si_cli.train.sweep import ADAPTER_GRID, ADAPTER_SWEEP_BASE, train_maybe_swept

    cfg = cfg or AdapterConfig()
    on_epoch = reporter.epoch if reporter else None

    def train(c: Any) -> Any:
        return train_adapter(fs, ds.sequences, ds.n_items, c, on_epoch=on_epoch)

    cfg, result, seconds, sweep_meta = train_maybe_swept(
        cfg, train, ADAPTER_GRID, ADAPTER_SWEEP_BASE, sweep_trials, reporter.message if reporter else None
    )
    model = load_adapter(result.state_dict, cfg.to_dict(), fs.feats.shape[1], ds.n_items)
    metrics = {
        split: evaluate_adapter(model, fs, ds.sequences, role, ties=cfg.ties)
        for split, role in (("valid", VALID), ("test", TEST))
    }
    meta = {
        "method": "adapter",
        "head": HEAD_KIND,
        "train": cfg.to_dict(),
        "d_feat": int(fs.feats.shape[1]),
        "metrics": {**metrics, "alignment": {}},
        "best_epoch": result.best_epoch,
        "history": result.history,
        "timings": {"training_seconds": round(seconds, 2)},
    }
    if sweep_meta is not None:
        meta["sweep"] = sweep_meta
    return result.state_dict, meta


def save_adapter_head(
    zoo: Zoo, tensors: dict[str, Any], origin: HeadOrigin, n_items: int, meta: dict[str, Any]
) -> Artifact:
    config = {
        "kind": "st2si-adapter-head",
        "n_items": n_items,
        "hidden": int(meta["train"]["hidden"]),
        "adapter": meta["train"],
        "d_feat": meta["d_feat"],
    }
    return store_head(zoo, tensors, origin, config, meta)


def load_adapter_head(zoo: Zoo, head: Artifact) -> Any:
    from st2si_cli.train.adapter import load_adapter

    return load_adapter(
        load_head_tensors(zoo, head), head.meta["train"], int(head.meta["d_feat"]), int(head.meta["n_items"])
    )


def adapter_history_scores(adapter: Any, feats: list[Any], catalog_ids: list[list[int | None]]) -> Any:
    """Scores [B, N] of histories given as their query features (newest window) and catalog IDs (None:
    an item outside the catalog, which gets no ID embedding)."""
    import torch

    max_len, n = adapter.cfg.max_len, adapter.n_items
    lengths = torch.tensor([min(len(f), max_len) for f in feats])
    width = int(lengths.max())
    x = torch.zeros(len(feats), width, feats[0].shape[1])
    ids = torch.full((len(feats), width), n, dtype=torch.long)
    for r, (f, cids) in enumerate(zip(feats, catalog_ids)):
        m = int(lengths[r])
        x[r, :m] = f[-m:].float()
        window = [n if c is None else c for c in cids[len(cids) - len(f) :]]
        ids[r, :m] = torch.tensor(window[-m:], dtype=torch.long)
    with torch.no_grad():
        return adapter.score_last(x, ids, lengths)
