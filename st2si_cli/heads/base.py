"""The contract every head kind keeps (`HeadKind`), and what its operations exchange.

A head kind trains on a feature set (the frozen backbone's cached query features), loads a stored head
as a scorer, ranks each user's validation or test target, answers histories with the top k items
(exclusions set to -inf first), and extends a stored head to a grown catalog. `registry.py` finds the
kind of a stored head by the "head" string of its meta.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from st2si_cli.progress import Reporter
from st2si_cli.zoo.store import Artifact, Zoo


@dataclass
class Trained:
    """A head trained on a feature set, before it is stored."""

    tensors: dict[str, Any]  # what head.safetensors holds
    config: dict[str, Any]  # the kind's own config.json fields: kind, n_items, hidden, ...
    meta: dict[str, Any]  # `store.head_meta`'s record of the training


@dataclass
class Placing:
    """What extending a head to a grown catalog works from (`st2si items`)."""

    fs: Any  # the head's feature cache (with alignment rows of the trained items)
    n_trained: int  # rows learned in training; later rows were placed from text
    text: dict[int, Any]  # new item -> its alignment feature (trained items are never re-placed)
    n_items: int  # the grown catalog's size
    placement: str  # auto | ridge | text | neighbour
    id_from: dict[int, int] | None  # neighbour placement: new item -> its nearest trained item


@dataclass(frozen=True)
class How:
    """How `HeadKind.train` trains, beside the settings.

    `sweep_trials`: that many points of the kind's sweep grid (0: all), the best on validation kept
    (None: no sweep). `deadline` (a `time.monotonic()` value): no epoch (or sweep trial) starts after
    it; the best so far is kept and the meta says `cut_by_budget`. `start`: the tensors of a head of
    this kind and settings, cut by a deadline, to continue from (a sweep starts afresh)."""

    sweep_trials: int | None = None
    deadline: float | None = None
    start: dict[str, Any] | None = None


PLAIN = How()


class HeadKind(ABC):
    """One kind of head. `name` is the "head" string its meta records (and `adapt --head` takes)."""

    name: str
    config_kind: str  # the "kind" of its config.json
    reads_every_query: bool  # `recommend` reads every query position of a history (else only the last)

    @abstractmethod
    def default_config(self) -> Any:
        """The training settings `train` takes when none are given."""

    def accepts(self, cfg: Any) -> bool:
        """Whether `cfg` (settings given to `adapt`) trains a head of this kind."""
        return False

    @abstractmethod
    def train(self, fs: Any, ds: Any, cfg: Any, *, reporter: Reporter, how: How = PLAIN) -> Trained:
        """Train on the feature set `fs` of dataset `ds`, choosing on validation only.

        `how`: a sweep, a deadline, a start (`How`)."""

    @abstractmethod
    def load(self, zoo: Zoo, head: Artifact) -> Any:
        """The scorer of a stored head (an ILP weight, a `SequenceAdapter`, a `Fusion`)."""

    @abstractmethod
    def ranks(
        self, scorer: Any, fs: Any, sequences: Any, role: int, *, ties: str, exclude: Any = None
    ) -> Any:
        """Full-ranking rank of each user's VALID or TEST target ([n_users], user order); `exclude`: per
        user (in user order), items not ranked."""

    @abstractmethod
    def score_batches(
        self, scorer: Any, fs: Any, sequences: Any, role: int, batch: int
    ) -> Iterator[tuple[Any, Any]]:
        """(scores [b, N], targets [b]) of consecutive batches of at most `batch` users, in user order, on
        the VALID or TEST targets: every user's whole score row, for top-k lists (`heads.top_lists`)."""

    @abstractmethod
    def top_k(
        self, scorer: Any, feats: list[Any], catalog_ids: list[list[int | None]], k: int, exclude: Any
    ) -> tuple[Any, Any]:
        """(scores, catalog indices) [B, k] for histories given as their query features (every position
        where `reads_every_query`, else the last) and catalog IDs (None: an item outside the catalog)."""

    @abstractmethod
    def extend(
        self, zoo: Zoo, head: Artifact, tensors: dict[str, Any], placing: Placing
    ) -> tuple[dict, dict]:
        """(the head's tensors for the grown catalog, how the new items were placed). Existing rows are
        copied bit for bit; a ValueError says why the head cannot be extended."""

    def id_only(self, train: Any) -> bool:
        """Whether a head trained with these recorded settings reads item IDs only (no text): the
        in-tool ID-only reference a report draws the LM heads against."""
        return False

    def command(self, zoo: Zoo, head: Artifact, name_of: Callable[[str | None], str]) -> list[str] | None:
        """The shell commands that make `head` again where they are not `st2si adapt` with its recorded
        settings (None: they are); `name_of(ID)` names another artifact."""
        return None

    def ilp_weight(self, zoo: Zoo, head: Artifact) -> Any:
        """The ILP weight [N, d] a head of this kind ranks with alone (None: it has none), for the
        sampled-candidates protocol and text -> ID accuracy."""
        return None


def batched_top_k(
    scores_of: Callable[[list[Any], list[list[int | None]]], Any],
    feats: list[Any],
    catalog_ids: list[list[int | None]],
    k: int,
    exclude: list[list[int]] | None,
    batch: int = 256,
) -> tuple[Any, Any]:
    """Top-k of a head that scores histories from their query features and item IDs, `batch` at a time
    (equal scores in catalog order, as `model/scoring.py::top_k`)."""
    import torch

    from st2si_cli.model.scoring import best_k

    out_s, out_i = [], []
    for b0 in range(0, len(feats), batch):
        scores = scores_of(feats[b0 : b0 + batch], catalog_ids[b0 : b0 + batch])
        if exclude is not None:
            for r, items in enumerate(exclude[b0 : b0 + batch]):
                if items:
                    scores[r, items] = float("-inf")
        s, i = best_k(scores, k)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)


def budget_cut(result: Any, sweep: dict[str, Any] | None) -> bool | None:
    """True where a deadline stopped the training (an epoch loop, or a sweep before its last trial);
    None otherwise, so the meta of a head trained to the end is what it always was."""
    return True if getattr(result, "cut", False) or (sweep or {}).get("cut") else None
