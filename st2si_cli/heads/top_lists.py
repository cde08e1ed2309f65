"""Every user's top-k list and target rank under any head, from its cached features in one scoring pass.

`eval` reads the top-k lists for the beyond-accuracy metrics (`st2si_cli.metrics.beyond`), `report` reads them
and the ranks for its users. Users are scored in batches, so memory stays O(batch x catalog): an ILP
head scores its users' last query features, an adapter its users' newest windows, a fusion mixes both,
exactly as `eval`'s ranks are computed (`user_ranks` of the head kinds; they agree, a test checks).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from st2si_cli.zoo.store import Artifact, Zoo

SCORES_PER_BATCH = 1 << 24  # users x items scored at once (64 MB of float32)


@dataclass
class TopLists:
    items: Any  # [n_users, k] long: catalog indices, best first (user order)
    scores: Any  # [n_users, k] float: their scores (-inf where fewer than k items were left)
    ranks: Any  # [n_users] long: the rank of each user's target (1 = first)
    targets: Any  # [n_users] long: each user's target


def _score_batches(zoo: Zoo, head: Artifact, fs: Any, sequences: Any, role: int) -> Iterator[tuple[Any, Any]]:
    """(scores [b, N], targets [b]) of consecutive batches of users, in user order."""
    from st2si_cli.heads.registry import kind_of

    kind = kind_of(head)
    n_items = int(head.meta.get("n_items") or 1)
    batch = max(1, min(256, SCORES_PER_BATCH // n_items))
    yield from kind.score_batches(kind.load(zoo, head), fs, sequences, role, batch)


def user_top_k(
    zoo: Zoo,
    head: Artifact,
    fs: Any,
    sequences: Sequence[Sequence[int]],
    role: int,
    k: int = 10,
    *,
    ties: str = "pessimistic",
    mask_history: bool = False,
    never: Sequence[int] = (),
) -> TopLists:
    """Top-k items and target rank of every user on the VALID or TEST targets, from the head's features
    `fs`. With `mask_history`, items of the user's input history are neither ranked nor listed (the
    target is always ranked); `never` items (retired ones) are left out of the lists only."""
    import torch

    from st2si_cli.metrics import rank_of_target
    from st2si_cli.model.samples import VALID
    from st2si_cli.model.scoring import best_k

    cut = 2 if role == VALID else 1
    items, scores, ranks, targets = [], [], [], []
    u0 = 0
    for s, t in _score_batches(zoo, head, fs, sequences, role):
        s, t = s.float(), t.long()
        b = s.shape[0]
        exclude = [list(seq[:-cut]) for seq in sequences[u0 : u0 + b]] if mask_history else None
        ranks.append(rank_of_target(s, t, ties=ties, exclude=exclude))
        masked = s.clone()
        for r, hist in enumerate(exclude or []):
            if hist:
                masked[r, hist] = float("-inf")
        if never:
            masked[:, list(never)] = float("-inf")
        top_s, top_i = best_k(masked, k)
        items.append(top_i)
        scores.append(top_s)
        targets.append(t)
        u0 += b
    if not items:
        empty = torch.empty(0, dtype=torch.long)
        return TopLists(empty.reshape(0, k), torch.empty(0, k), empty, empty)
    return TopLists(torch.cat(items), torch.cat(scores), torch.cat(ranks), torch.cat(targets))


def beyond_metrics(
    top: TopLists, sequences: Sequence[Sequence[int]], ks: Sequence[int], n_items: int
) -> dict[str, float]:
    """`st2si_cli.metrics.beyond.beyond_accuracy` of top-k lists (popularity: training interactions)."""
    from st2si_cli.metrics.beyond import beyond_accuracy, training_popularity

    ks = sorted({min(k, n_items) for k in ks})  # a list holds at most the whole catalog
    return beyond_accuracy(top.items, training_popularity(sequences, n_items), ks, n_items=n_items)
