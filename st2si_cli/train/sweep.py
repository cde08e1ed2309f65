"""A small hyper-parameter sweep for heads trained on cached features, chosen on validation only.

Each trial trains a head with early stopping on validation NDCG@10; the trial with the best
validation NDCG@10 wins (ties: the earlier trial). Test targets are never looked at here: the caller
scores the chosen head on test once, after the choice.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

# The ILP grid: peak learning rate, decoupled weight decay, feature dropout and batch size, under a
# cosine schedule with 5% warm-up over at most 30 epochs.
ILP_GRID: dict[str, Sequence[Any]] = {
    "lr": (3e-4, 1e-3),
    "weight_decay": (0.0, 0.05),
    "dropout": (0.0, 0.3),
    "batch_size": (256, 1024),
}
ILP_SWEEP_BASE = {"schedule": "cosine", "warmup": 0.05, "max_epochs": 30, "patience": 5}

# The sequence adapter's grid: width, dropout, learning rate and weight decay (RecBole SASRec's
# defaults are hidden 64, dropout 0.5, lr 1e-3).
ADAPTER_GRID: dict[str, Sequence[Any]] = {
    "hidden": (64, 128),
    "dropout": (0.2, 0.5),
    "lr": (1e-3, 3e-3),
    "weight_decay": (0.0, 0.1),
}
ADAPTER_SWEEP_BASE: dict[str, Any] = {}


@dataclass
class Trial:
    settings: dict[str, Any]  # the grid values of this trial
    valid_ndcg10: float
    best_epoch: int
    seconds: float


def grid_points(grid: Mapping[str, Sequence[Any]], trials: int | None, seed: int = 0) -> list[dict[str, Any]]:
    """Every point of the grid, or `trials` of them drawn without replacement (seeded), in grid order."""
    keys = list(grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    if trials is not None and trials < len(points):
        chosen = sorted(random.Random(seed).sample(range(len(points)), trials))
        points = [points[i] for i in chosen]
    return points


def sweep(
    base: Any,
    points: Sequence[dict[str, Any]],
    train: Callable[[Any], Any],
    *,
    on_trial: Callable[[int, Trial], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Any, Any, list[Trial]]:
    """Train `train(cfg)` for each point applied to the dataclass `base`; return (best cfg, its result, trials).

    `train` returns an object with `best_valid` (metrics dict with "NDCG@10"), `best_epoch` and `seconds`.
    `should_stop()` is asked before each trial after the first: True ends the sweep there.
    """
    if not points:
        raise ValueError("the sweep has no trials")
    best_cfg = best_result = None
    trials: list[Trial] = []
    for k, point in enumerate(points):
        if k and should_stop is not None and should_stop():
            break
        cfg = replace(base, **point)
        result = train(cfg)
        trial = Trial(
            dict(point), float(result.best_valid["NDCG@10"]), int(result.best_epoch), round(result.seconds, 2)
        )
        trials.append(trial)
        if on_trial:
            on_trial(k, trial)
        if best_result is None or trial.valid_ndcg10 > float(best_result.best_valid["NDCG@10"]):
            best_cfg, best_result = cfg, result
    return best_cfg, best_result, trials


def sweep_record(
    trials: Sequence[Trial],
    chosen: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    base: Mapping[str, Any],
) -> dict[str, Any]:
    """What a head stores about the sweep that chose it."""
    return {
        "selection": "best validation NDCG@10 (test never seen)",
        "grid": {k: list(v) for k, v in grid.items()},
        "fixed": dict(base),
        "chosen": dict(chosen),
        "trials": [asdict(t) for t in trials],
    }


def train_maybe_swept(
    cfg: Any,
    train: Callable[[Any], Any],
    grid: Mapping[str, Sequence[Any]],
    fixed: Mapping[str, Any],
    trials: int | None,
    message: Callable[[str], None] | None = None,
    *,
    deadline: float | None = None,
) -> tuple[Any, Any, float, dict[str, Any] | None]:
    """(config, result, training seconds, sweep record or None): `train(cfg)` once when `trials` is None,
    else a sweep of that many grid points (0: all) around `cfg` with the `fixed` settings applied.
    Past `deadline` (`time.monotonic()`) no further trial starts; the record then says `cut`."""
    if trials is None:
        result = train(cfg)
        return cfg, result, result.seconds, None
    points = grid_points(grid, trials or None, seed=cfg.seed)

    def on_trial(k: int, trial: Trial) -> None:
        if message:
            message(
                f"trial {k + 1}/{len(points)} {trial.settings}: valid NDCG@10 {trial.valid_ndcg10:.4f} "
                f"(best epoch {trial.best_epoch}, {trial.seconds:.0f}s)"
            )

    def past_deadline() -> bool:
        return deadline is not None and time.monotonic() > deadline

    best_cfg, result, done = sweep(
        replace(cfg, **fixed), points, train, on_trial=on_trial, should_stop=past_deadline
    )
    record = sweep_record(done, {k: getattr(best_cfg, k) for k in grid}, grid, fixed)
    if len(done) < len(points) or getattr(result, "cut", False):
        record["cut"] = True
    return best_cfg, result, sum(t.seconds for t in done), record
