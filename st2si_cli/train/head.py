"""Efficient ILP tuning: train only the item linear projection on query-position features.

The features come from a `FeatureSet` (the cache) or, for the authors' way and for the exactness
test, from any callable `features_of(rows) -> [b, d]` (e.g. the backbone in the loop). Given the same
rows in the same order, both produce the same head.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from st2si_cli.features.cache import FeatureSet
from st2si_cli.metrics import metrics_from_ranks
from st2si_cli.model.samples import ALIGN, TEST, TRAIN, VALID
from st2si_cli.model.scoring import linear_cross_entropy, rank_rows
from st2si_cli.model.st2si import init_ilp_weight
from st2si_cli.train.early_stopping import EarlyStopping


@dataclass
class HeadConfig:
    """ILP-tuning settings, recorded in every head."""

    lr: float = 3e-4  # AdamW peak learning rate (the authors: 3e-4 from scratch, 1e-4 after pretraining)
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the head
    batch_size: int = 256  # query positions per step
    schedule: str = "constant"  # "constant" (the authors' ILP tuning) or "cosine" (to 0 at max_epochs)
    warmup: float = 0.0  # fraction of the schedule's steps spent warming up linearly from 0
    dropout: float = 0.0  # dropout on the features during training (the frozen backbone's own is off)
    init: str = "random"  # "random" (nn.Linear's range, the paper) or "text": each row from its item's alignment feature
    max_epochs: int = 100
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    seed: int = 0
    multi_query: bool = True  # every query position trains; False: only the last one per user
    alignment: bool = True  # include the ID-alignment samples in each epoch
    ties: str = "pessimistic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HeadResult:
    weight: Tensor  # [N, d], the best epoch's head
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cut: bool = False  # stopped by the deadline before early stopping fired


def training_rows(fs: FeatureSet, multi_query: bool = True, alignment: bool = True) -> Tensor:
    """Rows that train the head: every TRAIN position (or each user's last one) plus ALIGN rows."""
    train = fs.rows(TRAIN)
    if not multi_query and train.numel():
        # Rows of a sample are in position order, so the last TRAIN row of an owner is its maximum.
        owners = fs.owner[train]
        last = torch.full((int(owners.max()) + 1,), -1, dtype=torch.long)
        last.scatter_reduce_(0, owners, train, reduce="amax")
        train = last[last >= 0]
    if alignment:
        train = torch.cat([train, fs.rows(ALIGN)])
    return train


def history_exclusions(
    fs: FeatureSet, rows: Tensor, sequences: Sequence[Sequence[int]], role: int
) -> list[list[int]]:
    """Items each row's user had seen before its target (for optional history masking)."""
    cut = 2 if role == VALID else 1
    return [list(sequences[int(u)][:-cut]) for u in fs.owner[rows]]


def evaluate_rows(
    weight: Tensor,
    feats: Tensor,
    targets: Tensor,
    *,
    ties: str = "pessimistic",
    exclude: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (10,),
) -> dict[str, float]:
    ranks = rank_rows(weight, feats, targets, ties=ties, exclude=exclude)
    return metrics_from_ranks(ranks, ks)


ALIGN_SAMPLE = 20_000  # alignment rows ranked at most: each is ranked against all N items (O(N^2) whole)


def alignment_accuracy(weight: Tensor, fs: FeatureSet, max_rows: int = ALIGN_SAMPLE) -> dict[str, float]:
    """Text -> ID accuracy (paper Table 5): is an item's own ID in the top 1 / top 5 for its text?

    Over every item up to `max_rows` items, else over a fixed-seed sample of that many (`n_aligned` says how many).
    """
    rows = fs.rows(ALIGN)
    if rows.numel() == 0:
        return {}
    if rows.numel() > max_rows:
        pick = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))[:max_rows]
        rows = rows[pick.sort().values]
    ranks = rank_rows(weight, fs.feats[rows], fs.targets[rows], ties="pessimistic")
    return {
        "Acc@1": float((ranks <= 1).float().mean()),
        "Acc@5": float((ranks <= 5).float().mean()),
        "n_aligned": int(rows.numel()),
    }


def evaluate_split(
    weight: Tensor,
    fs: FeatureSet,
    role: int,
    *,
    sequences: Sequence[Sequence[int]] | None = None,
    ties: str = "pessimistic",
    mask_history: bool = False,
    ks: Sequence[int] = (10,),
) -> dict[str, float]:
    rows = fs.rows(role)
    exclude = (
        history_exclusions(fs, rows, sequences, role) if mask_history and sequences is not None else None
    )
    return evaluate_rows(weight, fs.feats[rows], fs.targets[rows], ties=ties, exclude=exclude, ks=ks)


def train_head(
    fs: FeatureSet,
    n_items: int,
    cfg: HeadConfig,
    *,
    features_of: Callable[[Tensor], Tensor] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
    init: Tensor | None = None,
    deadline: float | None = None,
) -> HeadResult:
    """AdamW on the ILP with early stopping on validation NDCG@10; returns the best epoch's head.

    `deadline` (a `time.monotonic()` value): no epoch starts after it; the best so far is kept and the
    result is marked `cut`."""
    t0 = time.time()
    if features_of is None:

        def features_of(rows: Tensor) -> Tensor:
            return fs.feats[rows]

    d = fs.feats.shape[1] if fs.feats is not None else int(features_of(fs.rows(VALID)[:1]).shape[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    bound = 1.0 / d**0.5  # nn.Linear's default range
    if init is not None:
        weight = init.detach().clone().float().requires_grad_(True)
    elif cfg.init == "text":
        weight = text_init(fs, n_items, features_of, row_norm=bound * (d / 3) ** 0.5).requires_grad_(True)
    elif cfg.init == "random":
        weight = init_ilp_weight(n_items, d, gen).requires_grad_(True)
    else:
        raise ValueError(f"init must be random or text, not {cfg.init!r}")
    opt = torch.optim.AdamW([weight], lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = training_rows(fs, cfg.multi_query, cfg.alignment)
    if rows.numel() == 0:
        raise ValueError("no training positions: every user needs at least 3 items")
    sched = lr_schedule(opt, cfg, steps_per_epoch=-(-rows.numel() // cfg.batch_size))
    valid_rows = fs.rows(VALID)
    valid_feats = features_of(valid_rows)
    valid_targets = fs.targets[valid_rows]

    stop = EarlyStopping(cfg.patience)
    best_weight = weight.detach().clone()
    history: list[dict[str, Any]] = []
    cut = False
    for epoch in range(1, cfg.max_epochs + 1):
        if deadline is not None and epoch > 1 and time.monotonic() > deadline:
            cut = True
            break
        e0 = time.time()
        perm = rows[torch.randperm(rows.numel(), generator=gen)]
        total, steps = 0.0, 0
        for b0 in range(0, perm.numel(), cfg.batch_size):
            batch = perm[b0 : b0 + cfg.batch_size]
            feats = features_of(batch).float()
            if cfg.dropout > 0:
                keep = torch.rand(feats.shape, generator=gen) >= cfg.dropout
                feats = feats * keep / (1.0 - cfg.dropout)
            loss = linear_cross_entropy(feats, weight, fs.targets[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
            steps += 1
            if on_step:
                on_step(1)
        with torch.no_grad():
            valid = evaluate_rows(weight.detach(), valid_feats, valid_targets, ties=cfg.ties)
        record = {
            "epoch": epoch,
            "loss": total / max(steps, 1),
            "seconds": round(time.time() - e0, 3),
            **{f"valid_{k}": v for k, v in valid.items() if k != "n_users"},
        }
        history.append(record)
        improved = stop.observe(valid, epoch)
        if improved:
            best_weight = weight.detach().clone()
        if on_epoch:
            on_epoch({**record, "best_epoch": stop.best_epoch, "improved": improved})
        if stop.done:
            break
    return HeadResult(
        weight=best_weight,
        best_epoch=stop.best_epoch,
        best_valid=stop.best_metrics,
        history=history,
        seconds=time.time() - t0,
        cut=cut,
    )


def lr_schedule(opt: torch.optim.Optimizer, cfg: HeadConfig, steps_per_epoch: int) -> Any:
    """Linear warm-up over `warmup` of the steps, then constant or cosine decay to 0 at max_epochs."""
    import math

    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be constant or cosine, not {cfg.schedule!r}")
    total = max(1, steps_per_epoch * cfg.max_epochs)
    warm = int(cfg.warmup * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def text_init(
    fs: FeatureSet, n_items: int, features_of: Callable[[Tensor], Tensor], row_norm: float
) -> Tensor:
    """ILP rows from each item's alignment feature (the hidden state of its own text + [Q]).

    The features share a large common direction, so the mean over items is removed; each row is then
    scaled to `row_norm` (the norm of a random nn.Linear row), so training starts at the usual logit
    scale. Items without an alignment row start at 0.
    """
    rows = fs.rows(ALIGN)
    if rows.numel() == 0:
        raise ValueError("init 'text' needs the alignment rows in the feature cache")
    feats = features_of(rows).float()
    feats = feats - feats.mean(0, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-8) * row_norm
    weight = torch.zeros(n_items, feats.shape[1])
    weight[fs.targets[rows]] = feats
    return weight


def steps_per_epoch(fs: FeatureSet, cfg: HeadConfig) -> int:
    n = training_rows(fs, cfg.multi_query, cfg.alignment).numel()
    return -(-n // cfg.batch_size)


__all__ = [
    "HeadConfig",
    "HeadResult",
    "alignment_accuracy",
    "evaluate_rows",
    "evaluate_split",
    "train_head",
    "training_rows",
    "TEST",
    "VALID",
]
