"""The recipe's settings, derived from the data rather than tuned to one dataset.

The sequence adapter's batch size and patience follow from the number of training windows: an epoch
of few steps changes the model little, so patience counted in epochs would stop a small dataset
early (MovieLens-100k: 2,412 windows are 19 steps an epoch at 128 windows a step). So the batch is
the largest of 128, 64, 32 that still gives `MIN_STEPS` steps an epoch, and patience is counted in
steps (`PATIENCE_STEPS`) and turned into epochs. Validation NDCG@10 over n users has a standard error
proportional to 1/sqrt(n): with few users the epoch-to-epoch noise hides a curve that still rises, and a
lucky epoch sets a bar the next ones miss by chance. So below `STEADY_USERS` the patience grows with
that noise, x sqrt(STEADY_USERS / n) (MovieLens-100k's 943 users: x2.06; on its validation the ID-only
adapter stopped at epoch 40 (best 26, 0.0723) with the patience of steps alone, and ran past epoch 88
(0.0805) with 30).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

MIN_STEPS = 64  # steps an epoch the adapter's batch size aims for
BATCHES = (128, 64, 32)  # windows a step, the largest that gives MIN_STEPS steps (else the smallest)
PATIENCE_STEPS = 1000  # steps without a better validation NDCG@10 before an adapter stops
PATIENCE_EPOCHS = (10, 30)  # bounds of that patience in epochs
STEADY_USERS = 4000  # validation users above which the patience of steps alone is kept
DEFAULT_SEEDS = 3  # ID-only adapters in the recipe's ensemble
DEFAULT_SWEEP_TRIALS = 8  # points of the ILP grid the recipe tries
DEFAULT_BUDGET_S = 3600.0


@dataclass(frozen=True)
class AdapterPlan:
    batch_size: int
    patience: int
    steps_per_epoch: int
    windows: int
    users: int | None = None

    def record(self) -> dict[str, Any]:
        return {
            "rule": f"batch: largest of {list(BATCHES)} with >= {MIN_STEPS} steps an epoch; "
            f"patience: {PATIENCE_STEPS} steps in epochs, x sqrt({STEADY_USERS} / validation users) "
            f"below {STEADY_USERS}, within {list(PATIENCE_EPOCHS)}",
            "windows": self.windows,
            "users": self.users,
            "batch_size": self.batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "patience": self.patience,
        }


def adapter_plan(n_windows: int, n_users: int | None = None) -> AdapterPlan:
    """Batch size and patience (epochs) of a sequence adapter trained on `n_windows` windows and
    validated on `n_users` users (None: enough for the patience of steps alone)."""
    if n_windows < 1:
        raise ValueError("no training windows: some user needs at least 4 items")
    batch = next((b for b in BATCHES if n_windows / b >= MIN_STEPS), BATCHES[-1])
    steps = math.ceil(n_windows / batch)
    noise = math.sqrt(STEADY_USERS / n_users) if n_users and n_users < STEADY_USERS else 1.0
    low, high = PATIENCE_EPOCHS
    patience = min(high, max(low, math.ceil(PATIENCE_STEPS / steps * noise)))
    return AdapterPlan(batch, patience, steps, n_windows, n_users)


def adapter_config(plan: AdapterPlan, seed: int, base: Any = None, *, use_text: bool = False) -> Any:
    """The adapter of one recipe seed: ID-only (SASRec inside the tool), or over the LM's features
    with `use_text`."""
    from st2si_cli.model.adapter import AdapterConfig

    base = base or AdapterConfig(use_text=use_text)
    return replace(base, use_text=use_text, batch_size=plan.batch_size, patience=plan.patience, seed=seed)


@dataclass(frozen=True)
class RecipeStages:
    """What the recipe trains: `seeds` ID-only adapters, `sweep_trials` points of the ILP grid, with
    `lm_adapter` one adapter over the LM's features (seed 0, last: the budget reaches it where the
    data is small), each from `adapter_base` / `ilp_base` (None: the kinds' defaults; the adapters'
    batch size, patience and seed always follow from the data and the stage)."""

    seeds: int = DEFAULT_SEEDS
    sweep_trials: int = DEFAULT_SWEEP_TRIALS
    lm_adapter: bool = True
    adapter_base: Any = None
    ilp_base: Any = None


_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float | None:
    """Seconds of a budget written as 90s, 30m, 1.5h or a bare number of minutes; None for 'none'."""
    value = text.strip().lower()
    if value in ("none", "0", "unlimited"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", value)
    if not m:
        raise ValueError(f"a budget is a time like 90s, 30m or 2h (or none), not {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2) or "m"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a budget must be more than 0, not {text!r}")
    return seconds
