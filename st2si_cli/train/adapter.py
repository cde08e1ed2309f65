"""Training the sequence adapter (`st2si_cli.model.adapter`) on a feature cache, and ranking with it.

Each user's history rows in a `FeatureSet` are positions j = 0..n-2 of its sequence: the feature
of the query after item seq[j], target seq[j + 1] (`adapter_data.py` cuts them into windows).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from st2si_cli.features.cache import FeatureSet
from st2si_cli.metrics import metrics_from_ranks, rank_of_target
from st2si_cli.model.adapter import AdapterConfig, SequenceAdapter, adapter_tensors
from st2si_cli.model.samples import TRAIN, VALID
from st2si_cli.train.adapter_data import (
    UserRows,
    collate,
    eval_windows,
    item_text_features,
    training_windows,
    user_sequences,
)
from st2si_cli.train.early_stopping import EarlyStopping

EVAL_BATCH = 256  # users scored at once when evaluating


@dataclass
class AdapterResult:
    state_dict: dict[str, Tensor]  # the best epoch's weights (CPU)
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cut: bool = False  # stopped by the deadline before early stopping fired


@torch.no_grad()
def adapter_ranks(
    model: SequenceAdapter,
    fs: FeatureSet,
    sequences: Sequence[Sequence[int]],
    role: int,
    *,
    ties: str = "pessimistic",
    exclude: Sequence[Sequence[int]] | None = None,
    users: Sequence[UserRows] | None = None,
) -> Tensor:
    """Full-ranking rank of each user's VALID or TEST target, [n_users] in user order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    windows = eval_windows(
        users if users is not None else user_sequences(fs, sequences), role, model.cfg.max_len
    )
    ranks: list[Tensor] = []
    for b0 in range(0, len(windows), EVAL_BATCH):
        feats, ids, lengths, targets = collate(
            fs, windows[b0 : b0 + EVAL_BATCH], model.n_items, device, feats=model.cfg.use_text
        )
        scores = model.score_last(feats, ids, lengths).cpu()
        last = targets.cpu()[torch.arange(len(lengths)), lengths.cpu() - 1]
        ex = exclude[b0 : b0 + EVAL_BATCH] if exclude is not None else None
        ranks.append(rank_of_target(scores, last, ties=ties, exclude=ex))
    model.train(was_training)
    return torch.cat(ranks)


def evaluate_adapter(
    model: SequenceAdapter,
    fs: FeatureSet,
    sequences: Sequence[Sequence[int]],
    role: int,
    *,
    ks: Sequence[int] = (10,),
    ties: str = "pessimistic",
    exclude: Sequence[Sequence[int]] | None = None,
    users: Sequence[UserRows] | None = None,
) -> dict[str, float]:
    """Full-ranking metrics of the VALID or TEST targets (one per user)."""
    return metrics_from_ranks(
        adapter_ranks(model, fs, sequences, role, ties=ties, exclude=exclude, users=users), ks
    )


def train_adapter(
    fs: FeatureSet,
    sequences: Sequence[Sequence[int]],
    n_items: int,
    cfg: AdapterConfig,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    *,
    device: Any = "cpu",
    deadline: float | None = None,
    init_state: dict[str, Tensor] | None = None,
) -> AdapterResult:
    """AdamW with early stopping on validation NDCG@10; returns the best epoch's weights.

    `deadline` (a `time.monotonic()` value): no epoch starts after it; the best epoch so far is kept
    and the result is marked `cut`. `init_state`: start from these weights (a stage cut by a deadline
    continues from its best epoch), with a fresh optimiser; epoch numbers start again at 1.

    The loss is cross-entropy over all items at every real step of a window (mean over steps).
    Initialisation and dropout draw from a forked RNG seeded with `cfg.seed`, and the window order
    from a seeded generator, so a run is deterministic (on CPU) without touching the global RNG.
    """
    t0 = time.time()
    users = user_sequences(fs, sequences)
    windows = training_windows(users, cfg.max_len)
    if not windows:
        raise ValueError("no training positions: some user needs at least 4 items")
    item_text = item_text_features(fs, n_items) if cfg.use_text else None
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SequenceAdapter(cfg, fs.feats.shape[1], n_items, item_text)
        model.set_query_stats(fs.feats[fs.rows(TRAIN)])
        if init_state is not None:
            model.load_state_dict(init_state)
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        stop = EarlyStopping(cfg.patience)
        best_state = adapter_tensors(model)
        history: list[dict[str, Any]] = []
        if init_state is not None:  # the start is the point to beat
            stop.observe(evaluate_adapter(model, fs, sequences, VALID, ties=cfg.ties, users=users), 0)
        cut = False
        for epoch in range(1, cfg.max_epochs + 1):
            if deadline is not None and epoch > 1 and time.monotonic() > deadline:
                cut = True
                break
            e0 = time.time()
            model.train()
            total, steps = 0.0, 0
            order = torch.randperm(len(windows), generator=gen)
            for b0 in range(0, len(windows), cfg.batch_size):
                batch = [windows[int(k)] for k in order[b0 : b0 + cfg.batch_size]]
                feats, ids, lengths, targets = collate(fs, batch, n_items, device, feats=cfg.use_text)
                h = model(feats, ids, lengths)
                real = targets >= 0
                loss = F.cross_entropy(h[real] @ model.item_vectors().T, targets[real])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            valid = evaluate_adapter(model, fs, sequences, VALID, ties=cfg.ties, users=users)
            record = {
                "epoch": epoch,
                "loss": total / steps,
                "seconds": round(time.time() - e0, 3),
                **{f"valid_{k}": v for k, v in valid.items() if k != "n_users"},
            }
            history.append(record)
            improved = stop.observe(valid, epoch)
            if improved:
                best_state = adapter_tensors(model)
            if on_epoch:
                on_epoch({**record, "best_epoch": stop.best_epoch, "improved": improved})
            if stop.done:
                break
    return AdapterResult(
        state_dict=best_state,
        best_epoch=stop.best_epoch,
        best_valid=stop.best_metrics,
        history=history,
        seconds=time.time() - t0,
        cut=cut,
    )


__all__ = [
    "AdapterResult",
    "adapter_ranks",
    "evaluate_adapter",
    "train_adapter",
    "training_windows",
    "user_sequences",
]
