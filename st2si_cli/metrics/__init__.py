"""Ranking metrics for sequential recommendation, usable on any score matrix.

Scores are torch tensors of shape [B, N] (B users, N items); numpy arrays are accepted and
converted with ``torch.as_tensor``. Every function reports per-user averages.

Tie rules (``ties``):

* ``"pessimistic"`` (default): rank = 1 + number of other items scoring >= the target. A model
  that scores every item the same gets rank N, the worst, so a degenerate model cannot look good.
* ``"optimistic"``: rank = 1 + number of items scoring strictly > the target. This is the
  original authors' rule; it gives a constant scorer rank 1 and is kept only to reproduce them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

TIE_RULES: tuple[str, ...] = ("pessimistic", "optimistic")

ArrayLike = Tensor | np.ndarray


def _check_ties(ties: str) -> str:
    if ties not in TIE_RULES:
        raise ValueError(f"ties must be one of {', '.join(TIE_RULES)}; got {ties!r}")
    return ties


def _beats(ties: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The comparison that says 'this item ranks at or above the target' under a tie rule."""
    return torch.ge if ties == "pessimistic" else torch.gt


def _as_scores(scores: ArrayLike, name: str = "scores", ndim: int = 2) -> Tensor:
    t = torch.as_tensor(scores)
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s); got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} must be real numbers; got dtype {t.dtype}")
    # A NaN compares false with everything, so it would silently rank the target first
    # (pessimistic) or drop an item from the count: refuse instead of reporting a wrong number.
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contain NaN")
    return t


def _as_targets(targets: ArrayLike | Sequence[int], batch: int, device: torch.device) -> Tensor:
    t = torch.as_tensor(targets)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"targets must have shape [{batch}]; got {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"targets must be integer item indices; got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.long)


def _check_target_range(targets: Tensor, n_items: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError(f"targets must be item indices in [0, {n_items}); got {targets.tolist()}")


def _exclusion_mask(
    exclude: Sequence[Sequence[int]], batch: int, n_items: int, device: torch.device
) -> Tensor:
    """Bool [B, N] mask, True where an item is excluded from row b's ranking."""
    if len(exclude) != batch:
        raise ValueError(f"exclude must have one list per row ({batch}); got {len(exclude)}")
    lengths = torch.tensor([len(row) for row in exclude], dtype=torch.long)
    cols = torch.tensor([int(i) for row in exclude for i in row], dtype=torch.long)
    if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n_items):
        raise ValueError(f"exclude holds an item index outside [0, {n_items})")
    rows = torch.repeat_interleave(torch.arange(batch), lengths)
    mask = torch.zeros(batch, n_items, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.to(device)


def _target_column_mask(targets: Tensor, width: int, start: int = 0) -> Tensor:
    """Bool [B, C] mask of the target column within columns [start, start + C)."""
    cols = torch.arange(start, start + width, device=targets.device)
    return cols.unsqueeze(0) == targets.unsqueeze(1)


def rank_of_target(
    scores: ArrayLike,
    targets: ArrayLike | Sequence[int],
    *,
    ties: str = "pessimistic",
    exclude: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """1-based rank of each row's target among all N items (full ranking).

    ``exclude`` lists, per row, items to drop from the ranking (history masking); they behave
    as if scored -inf and never count against the target. The target itself is never
    excluded even when listed: it is a repeat consumption, and hiding it would make the row
    unrankable. Returns a long tensor of shape [B]; NaN scores raise ValueError.
    """
    ties = _check_ties(ties)
    s = _as_scores(scores)
    batch, n_items = s.shape
    t = _as_targets(targets, batch, s.device)
    _check_target_range(t, n_items)

    target_scores = s.gather(1, t.unsqueeze(1))
    # Count with an explicit mask rather than filling -inf so that a -inf target does not
    # tie with the excluded items under the pessimistic rule.
    counts_against = ~_target_column_mask(t, n_items)
    if exclude is not None:
        counts_against &= ~_exclusion_mask(exclude, batch, n_items, s.device)
    beats = _beats(ties)(s, target_scores) & counts_against
    return beats.sum(dim=1, dtype=torch.long) + 1


class RankAccumulator:
    """Full-ranking ranks computed from score chunks over the item dimension.

    For catalogs too large to score at once: feed every column block exactly once with
    ``update`` and read ``ranks()``; the result equals ``rank_of_target`` on the full matrix.
    ``target_scores`` must be the scores the model gives the targets (the same values that
    appear in the target column); that column is skipped so the target never counts against
    itself.
    """

    def __init__(self, target_scores: ArrayLike, ties: str = "pessimistic") -> None:
        self.ties = _check_ties(ties)
        self._target_scores = _as_scores(target_scores, name="target_scores", ndim=1)
        self._counts = torch.zeros(
            self._target_scores.shape[0], dtype=torch.long, device=self._target_scores.device
        )
        self.n_items_seen = 0

    def update(
        self,
        chunk_scores: ArrayLike,
        chunk_start: int,
        targets: ArrayLike | Sequence[int],
        exclude_mask_chunk: ArrayLike | None = None,
    ) -> None:
        """Count the items in columns [chunk_start, chunk_start + C) that rank above the target."""
        s = _as_scores(chunk_scores, name="chunk_scores")
        batch, width = s.shape
        if batch != self._counts.shape[0]:
            raise ValueError(f"chunk_scores has {batch} rows; expected {self._counts.shape[0]}")
        if chunk_start < 0:
            raise ValueError(f"chunk_start must be >= 0; got {chunk_start}")
        t = _as_targets(targets, batch, s.device)
        counts_against = ~_target_column_mask(t, width, chunk_start)
        if exclude_mask_chunk is not None:
            m = torch.as_tensor(exclude_mask_chunk, device=s.device)
            if m.dtype != torch.bool or m.shape != s.shape:
                raise ValueError(f"exclude_mask_chunk must be a bool tensor of shape {tuple(s.shape)}")
            counts_against &= ~m
        ts = self._target_scores.to(s.device).unsqueeze(1)
        beats = _beats(self.ties)(s, ts) & counts_against
        self._counts += beats.sum(dim=1, dtype=torch.long).to(self._counts.device)
        self.n_items_seen += width

    def ranks(self) -> Tensor:
        """1-based ranks (long [B]) over all columns fed so far."""
        return self._counts + 1


def _as_ranks(ranks: ArrayLike | Sequence[int]) -> Tensor:
    r = torch.as_tensor(ranks)
    if r.dim() != 1:
        raise ValueError(f"ranks must be one-dimensional; got shape {tuple(r.shape)}")
    if r.numel() == 0:
        raise ValueError("ranks is empty: no users to average over")
    if r.is_floating_point() or r.dtype == torch.bool or r.is_complex():
        raise TypeError(f"ranks must be integers; got dtype {r.dtype}")
    if int(r.min()) < 1:
        raise ValueError("ranks are 1-based; got a rank below 1")
    return r.to(device="cpu", dtype=torch.long)


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(k) for k in ks)
    if any(k < 1 for k in out):
        raise ValueError(f"cut-offs must be >= 1; got {list(out)}")
    return out


def metrics_from_ranks(ranks: ArrayLike | Sequence[int], ks: Sequence[int] = (10,)) -> dict[str, float]:
    """NDCG@k, Recall@k, MRR@k per cut-off, MRR, and n_users, averaged per user.

    One target per row: NDCG@k = 1/log2(rank+1) if rank <= k else 0; Recall@k (= HitRatio@k)
    = 1 if rank <= k else 0; MRR@k = 1/rank if rank <= k else 0; MRR has no cut-off.
    """
    r = _as_ranks(ranks)
    ks = _check_ks(ks)
    rf = r.to(torch.float64)  # float64: averages over ~1e6 users should not drift
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        zero = torch.zeros_like(rf)
        out[f"NDCG@{k}"] = float(torch.where(hit, 1.0 / torch.log2(rf + 1.0), zero).mean())
        out[f"Recall@{k}"] = float(hit.to(torch.float64).mean())
        out[f"MRR@{k}"] = float(torch.where(hit, 1.0 / rf, zero).mean())
    out["MRR"] = float((1.0 / rf).mean())
    out["n_users"] = int(r.numel())
    return out


@dataclass
class MetricAccumulator:
    """Collects ranks across batches so metrics are per-user averages over every user.

    Averaging batch means would over-weight users in small (usually the last) batches.
    """

    _ranks: list[Tensor] = field(default_factory=list, repr=False)

    def add(self, ranks: ArrayLike | Sequence[int]) -> None:
        """Append one batch of 1-based ranks."""
        self._ranks.append(_as_ranks(ranks))

    @property
    def n_users(self) -> int:
        """Number of users (ranks) collected so far."""
        return sum(int(r.numel()) for r in self._ranks)

    def ranks(self) -> Tensor:
        """All ranks collected so far, in the order they were added."""
        if not self._ranks:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(self._ranks)

    def result(self, ks: Sequence[int] = (10,)) -> dict[str, float]:
        """``metrics_from_ranks`` over every user added; raises ValueError when empty."""
        return metrics_from_ranks(self.ranks(), ks)


def _eligible_negatives(n_items: int, target: int, history: Sequence[int]) -> Tensor:
    """Items that are neither the target nor in the history, ascending."""
    if not 0 <= target < n_items:
        raise ValueError(f"target {target} is outside [0, {n_items})")
    keep = torch.ones(n_items, dtype=torch.bool)
    hist = torch.tensor([int(i) for i in history], dtype=torch.long)
    if hist.numel() and (int(hist.min()) < 0 or int(hist.max()) >= n_items):
        raise ValueError(f"history holds an item index outside [0, {n_items})")
    keep[hist] = False
    keep[target] = False
    return keep.nonzero().squeeze(1)


def _draw(eligible: Tensor, n: int, generator: torch.Generator) -> Tensor:
    # randperm over the eligible list: uniform, distinct, and reproducible from the generator.
    return eligible[torch.randperm(eligible.numel(), generator=generator)[:n]]


def sample_candidates(
    n_items: int, target: int, history: Sequence[int], n: int, generator: torch.Generator
) -> Tensor:
    """Draw ``n`` distinct negatives uniformly from items not in ``history`` and not ``target``.

    This is exactly the draw ``candidate_hit_ratio`` makes for one user; returns long [n].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    eligible = _eligible_negatives(n_items, int(target), history)
    if eligible.numel() < n:
        raise ValueError(f"only {eligible.numel()} eligible negatives; need {n}")
    return _draw(eligible, n, generator)


def candidate_hit_ratio(
    scores: ArrayLike,
    targets: ArrayLike | Sequence[int],
    histories: Sequence[Sequence[int]],
    n_candidates: int = 20,
    seeds: Sequence[int] = range(20),
    ties: str = "pessimistic",
) -> dict[str, float]:
    """HitRatio@1 under the candidate-N protocol (LLaRA), averaged over seeds.

    For each seed and user, ``n_candidates - 1`` negatives are drawn with
    ``sample_candidates`` from a ``torch.Generator`` seeded with that seed (users drawn in row
    order), and the target is ranked among target + negatives with the same tie rule.
    Returns HitRatio@1 (mean over seeds), HitRatio@1_std (population std over seeds),
    n_seeds, n_candidates and n_users.
    """
    ties = _check_ties(ties)
    s = _as_scores(scores)
    batch, n_items = s.shape
    t = _as_targets(targets, batch, s.device)
    _check_target_range(t, n_items)
    if len(histories) != batch:
        raise ValueError(f"histories must have one list per row ({batch}); got {len(histories)}")
    if n_candidates < 2:
        raise ValueError(f"n_candidates must be >= 2 (target plus at least one negative); got {n_candidates}")
    seeds = [int(x) for x in seeds]
    if not seeds:
        raise ValueError("seeds is empty")
    if batch == 0:
        raise ValueError("scores has no rows: no users to average over")

    n_neg = n_candidates - 1
    # One generator per seed, each consumed in row order: identical draws to looping seeds
    # outermost, but each user's eligible list is built once instead of once per seed.
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    negatives = torch.empty(len(seeds), batch, n_neg, dtype=torch.long)
    t_cpu = t.cpu()
    for b in range(batch):
        eligible = _eligible_negatives(n_items, int(t_cpu[b]), histories[b])
        if eligible.numel() < n_neg:
            raise ValueError(
                f"row {b}: only {eligible.numel()} eligible negatives (items neither the target nor in "
                f"the history); n_candidates={n_candidates} needs {n_neg}"
            )
        for i, g in enumerate(gens):
            negatives[i, b] = _draw(eligible, n_neg, g)

    negatives = negatives.to(s.device)
    target_scores = s.gather(1, t.unsqueeze(1))  # [B, 1]
    neg_scores = s.unsqueeze(0).expand(len(seeds), -1, -1).gather(2, negatives)  # [S, B, n_neg]
    # Rank 1 among the candidates means no negative ranks at or above the target.
    hits = ~_beats(ties)(neg_scores, target_scores.unsqueeze(0)).any(dim=2)  # [S, B]
    per_seed = hits.to(torch.float64).mean(dim=1).cpu()
    mean = float(per_seed.mean())
    std = math.sqrt(float(((per_seed - mean) ** 2).mean()))  # population std over seeds
    return {
        "HitRatio@1": mean,
        "HitRatio@1_std": std,
        "n_seeds": len(seeds),
        "n_candidates": int(n_candidates),
        "n_users": int(batch),
    }


@dataclass
class RankingProtocol:
    """How ranks were computed, stored next to the numbers so results stay comparable."""

    ties: str = "pessimistic"
    mask_history: bool = False
    ks: tuple[int, ...] = (10,)
    ranking: str = "full"  # "full" (every item ranked) or "candidates-N" (the target among N - 1 sampled)

    def __post_init__(self) -> None:
        _check_ties(self.ties)
        self.ks = _check_ks(self.ks)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored alongside the metrics it produced."""
        out = {"ties": self.ties, "mask_history": self.mask_history, "ks": list(self.ks)}
        return out if self.ranking == "full" else {**out, "ranking": self.ranking}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankingProtocol:
        """Inverse of ``to_dict``."""
        return cls(
            ties=d["ties"],
            mask_history=bool(d["mask_history"]),
            ks=tuple(d["ks"]),
            ranking=d.get("ranking", "full"),
        )

    def record(self) -> dict[str, Any]:
        """The form a head's meta and `eval`'s JSON record: {"ranking", "ties", "mask_history"}."""
        return {"ranking": self.ranking, "ties": self.ties, "mask_history": self.mask_history}
