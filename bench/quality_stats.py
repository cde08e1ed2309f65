"""Statistics over per-user test ranks, for the quality benchmark: the row keys of the ranks and metrics
(history unmasked and masked), NDCG@10 gains per user, percentile bootstrap intervals and paired differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KS = (10,)


def rank_key(masked: bool) -> str:
    return "ranks_masked" if masked else "ranks"


def metric_key(masked: bool) -> str:
    return "metrics_masked" if masked else "metrics"


def ndcg_gains(ranks: list[int]) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0)


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean over users."""
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for k in range(n):  # one resample at a time keeps memory at O(users)
        means[k] = values[rng.integers(0, len(values), size=len(values))].mean()
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_diff(a: list[int], b: list[int]) -> dict[str, Any]:
    """Per-user NDCG@10 of a minus b (same users, same targets): mean, 95% bootstrap CI, wins/losses."""
    d = ndcg_gains(a) - ndcg_gains(b)
    lo, hi = bootstrap_ci(d)
    return {
        "mean": float(d.mean()),
        "ci95": [lo, hi],
        "excludes_zero": bool(lo > 0 or hi < 0),
        "users_better": int((d > 0).sum()),
        "users_worse": int((d < 0).sum()),
    }
