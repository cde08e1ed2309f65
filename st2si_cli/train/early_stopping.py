"""The one early-stopping rule of every trainer (ILP heads, sequence adapters, pretrain): keep the
validation point with the best NDCG@10 (the first of equals), and stop after `patience` points
without a better one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

METRIC = "NDCG@10"


class Tracked(Protocol):
    """What early stopping keeps: the best metrics so far (None before the first point), the epoch
    they were measured at, and the validation points since (pretrain's `RunState` keeps these too)."""

    best: dict[str, Any] | None
    best_epoch: int
    since_best: int


def observe(track: Tracked, valid: dict[str, Any], epoch: int) -> bool:
    """Record the validation metrics `valid` of `epoch` in `track`; whether they are the best so far."""
    improved = track.best is None or valid[METRIC] > track.best[METRIC]
    if improved:
        track.best, track.best_epoch, track.since_best = valid, epoch, 0
    else:
        track.since_best += 1
    return improved


def exhausted(track: Tracked, patience: int) -> bool:
    """Whether `patience` validation points have passed without a better one."""
    return track.since_best >= patience


@dataclass
class EarlyStopping:
    """`observe` and `exhausted` for a trainer that keeps its own state (heads on cached features)."""

    patience: int
    best: dict[str, Any] | None = None
    best_epoch: int = 0
    since_best: int = 0

    def observe(self, valid: dict[str, Any], epoch: int) -> bool:
        return observe(self, valid, epoch)

    @property
    def done(self) -> bool:
        return exhausted(self, self.patience)

    @property
    def best_metrics(self) -> dict[str, Any]:
        """The best point's metrics ({METRIC: -1} before any point)."""
        return self.best if self.best is not None else {METRIC: -1.0}
