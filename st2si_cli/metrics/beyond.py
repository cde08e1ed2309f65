"""Beyond-accuracy metrics of top-k lists, with RecBole's definitions (RecBole 1.2.1,
`recbole.evaluator.metrics`): what a head recommends across users, not whether it hits the target.

`top` is an [n_users, K] array of catalog indices, best first (K >= every k asked for). Popularity is
the number of training interactions of each item: every item of each history but the last two (the
validation and test targets), as RecBole's leave-one-out training split counts them.

- ItemCoverage@k: distinct items in all users' top-k / catalog size.
- AveragePopularity@k: per user, the mean popularity of their top-k items; averaged over users.
- GiniIndex@k: Gini coefficient of how often each catalog item is recommended (items never
  recommended count 0): 0 = every item equally often, near 1 = a few items everywhere.
- ShannonEntropy@k: -sum p(i) log p(i) over the recommended items, p(i) = the item's share of all
  recommendations, divided, as RecBole divides it, by the number of distinct items recommended.
- TailPercentage@k: per user, the share of their top-k in the long tail; averaged over users. The
  tail is the `tail_ratio` (0.1) fraction of the items with training interactions that have the
  fewest (ties by index; at least one item); a `tail_ratio` above 1 is a count: items with at most
  that many interactions. As in RecBole, an item with no training interaction is not in the tail.

Pure numpy; nothing heavy is imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

NAMES = ("ItemCoverage", "AveragePopularity", "GiniIndex", "ShannonEntropy", "TailPercentage")
TAIL_RATIO = 0.1


def _top(top: Any, k: int | None = None) -> np.ndarray:
    a = np.asarray(top.cpu() if hasattr(top, "cpu") else top, dtype=np.int64)
    if a.ndim != 2:
        raise ValueError(f"top-k lists must be [users, k], not shape {a.shape}")
    if k is not None:
        if k < 1 or k > a.shape[1]:
            raise ValueError(f"k = {k} is outside the lists' length 1..{a.shape[1]}")
        a = a[:, :k]
    return a


def training_popularity(sequences: Sequence[Sequence[int]], n_items: int, held_out: int = 2) -> np.ndarray:
    """Training interactions per item ([n_items] int64): each sequence without its last `held_out` items."""
    counts = np.zeros(n_items, dtype=np.int64)
    for seq in sequences:
        train = seq[: len(seq) - held_out] if held_out else seq
        if len(train):
            np.add.at(counts, np.asarray(train, dtype=np.int64), 1)
    return counts


def item_coverage(top: Any, n_items: int) -> float:
    a = _top(top)
    return float(np.unique(a).size / n_items) if n_items else 0.0


def average_popularity(top: Any, popularity: Any) -> float:
    a = _top(top)
    if a.size == 0:
        return 0.0
    pop = np.asarray(popularity, dtype=np.float64)
    return float(pop[a].mean(axis=1).mean())


def gini_index(top: Any, n_items: int) -> float:
    a = _top(top)
    if a.size == 0 or not n_items:
        return 0.0
    counts = np.sort(np.unique(a, return_counts=True)[1])
    idx = np.arange(n_items - counts.size + 1, n_items + 1)
    return float(np.sum((2 * idx - n_items - 1) * counts) / a.size / n_items)


def shannon_entropy(top: Any) -> float:
    a = _top(top)
    if a.size == 0:
        return 0.0
    counts = np.unique(a, return_counts=True)[1]
    p = counts / a.size
    return float(-(p * np.log(p)).sum() / counts.size)


def tail_items(popularity: Any, tail_ratio: float = TAIL_RATIO) -> np.ndarray:
    """Boolean [n_items]: the long-tail items (see the module's docstring)."""
    pop = np.asarray(popularity, dtype=np.int64)
    tail = np.zeros(pop.shape[0], dtype=bool)
    seen = np.nonzero(pop > 0)[0]
    if tail_ratio is None or tail_ratio <= 0:
        tail_ratio = TAIL_RATIO
    if tail_ratio > 1:
        tail[seen[pop[seen] <= tail_ratio]] = True
    elif seen.size:
        order = seen[np.lexsort((seen, pop[seen]))]  # fewest interactions first, then by index
        tail[order[: max(int(seen.size * tail_ratio), 1)]] = True
    return tail


def tail_percentage(top: Any, popularity: Any, tail_ratio: float = TAIL_RATIO) -> float:
    a = _top(top)
    if a.size == 0:
        return 0.0
    return float(tail_items(popularity, tail_ratio)[a].mean(axis=1).mean())


def beyond_accuracy(
    top: Any,
    popularity: Any,
    ks: Sequence[int] = (10,),
    *,
    n_items: int | None = None,
    tail_ratio: float = TAIL_RATIO,
) -> dict[str, float]:
    """{"ItemCoverage@k": ..., "AveragePopularity@k": ..., "GiniIndex@k": ..., "ShannonEntropy@k": ...,
    "TailPercentage@k": ...} for each k (lists cut to their first k items)."""
    n = int(n_items if n_items is not None else len(popularity))
    out: dict[str, float] = {}
    for k in ks:
        a = _top(top, k)
        out[f"ItemCoverage@{k}"] = item_coverage(a, n)
        out[f"AveragePopularity@{k}"] = average_popularity(a, popularity)
        out[f"GiniIndex@{k}"] = gini_index(a, n)
        out[f"ShannonEntropy@{k}"] = shannon_entropy(a)
        out[f"TailPercentage@{k}"] = tail_percentage(a, popularity, tail_ratio)
    return out
