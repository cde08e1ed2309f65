"""Samples: what the backbone reads, and which query positions of it matter.

A history sample is `T1 [Q] ... Tm [Q]` over a window of a user's items; query j predicts the item
after item j. An alignment sample is `Please give the index of the following item: T [Q]`, whose one
query predicts the item itself. Every path (feature cache, eval, recommend, pretrain) builds its
samples here and batches them with `collate`, under one padding rule: right padding.

Why right padding: attention is causal, so a real token never attends to the pads after it, and
positions start at 0 in every row; the features of a padded row equal those of the row alone, with
no attention mask and no position bookkeeping. (The paper's left padding needs both.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from st2si_cli.model.text import ItemTokenizer

if TYPE_CHECKING:
    from torch import Tensor

    from st2si_cli.data.dataset import Dataset

TRAIN, VALID, TEST, ALIGN = 0, 1, 2, 3  # the role of a query position


@dataclass
class Sample:
    """One backbone input: a user's history or an alignment instruction."""

    tokens: list[int]
    query_pos: list[int]  # indices into tokens of the [Q] tokens whose features are used
    targets: list[int]  # item ID each query predicts (empty where nothing is predicted yet)
    roles: list[int]  # TRAIN / VALID / TEST / ALIGN per query (empty with targets)
    owner: int  # user index (history) or item index (alignment)


def history_samples(
    itok: ItemTokenizer,
    items: Sequence[Sequence[int]],
    targets: Sequence[int] | None,
    roles: Sequence[int] | None,
    owner: int,
    every_position: bool = True,
) -> list[Sample]:
    """Samples over one history's item tokens (oldest first); query j predicts targets[j] in role roles[j].

    With `every_position` the history is cut into the windows of `ItemTokenizer.windows`, so every
    position gets exactly one feature; otherwise only the newest window that fits is built (the
    evaluation and inference input). Without targets the samples predict nothing (inference).
    """
    if every_position:
        windows = itok.windows(items)
    else:
        n = len(items)
        start = n - itok.history_window(items)
        windows = [(start, start, n)]
    out = []
    for start, used, end in windows:
        tokens, qpos = itok.sequence(items[start:end])
        tgts = list(targets[used:end]) if targets is not None else []
        rls = list(roles[used:end]) if roles is not None else []
        out.append(Sample(tokens, qpos[used - start :], tgts, rls, owner))
    return out


def alignment_sample(itok: ItemTokenizer, item_tokens: Sequence[int], item: int) -> Sample:
    """The ID-alignment instruction of one item: its one query predicts the item itself."""
    tokens = itok.alignment(item_tokens)
    return Sample(tokens, [len(tokens) - 1], [item], [ALIGN], item)


def build_samples(
    ds: Dataset,
    itok: ItemTokenizer,
    item_tokens: list[list[int]],
    alignment: bool = True,
    every_position: bool = True,
) -> list[Sample]:
    """A dataset's history samples (per user, oldest window first) then alignment samples (one per item).

    A user's input is the history without its test item: the last query predicts the test item (TEST),
    the one before it the validation item (VALID), the others TRAIN.
    """
    samples: list[Sample] = []
    for u, seq in enumerate(ds.sequences):
        n = len(seq)
        history = seq[:-1]  # everything but the test target
        roles = [TEST if j + 1 == n - 1 else VALID if j + 1 == n - 2 else TRAIN for j in range(len(history))]
        samples += history_samples(itok, [item_tokens[i] for i in history], seq[1:], roles, u, every_position)
    if alignment:
        samples += [alignment_sample(itok, ids, i) for i, ids in enumerate(item_tokens)]
    return samples


def plan_batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Sample indices grouped into batches of similar length (longest first, so memory peaks early).

    A batch holds at most `max_batch` samples and at most `batch_tokens` padded tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and (len(current) >= max_batch or (len(current) + 1) * width > batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class Batch(NamedTuple):
    """Collated samples, the tensors `ST2SI.forward` takes (a tuple: `model(*batch)` works)."""

    input_ids: Tensor  # [B, L] long, right padded
    query_rows: Tensor  # [P] long, the row of each query position
    query_cols: Tensor  # [P] long, its column
    targets: Tensor  # [P] long, the item it predicts (empty for samples without targets)


def collate(samples: Sequence[Sample], pad_id: int, device: Any = "cpu") -> Batch:
    """Samples -> one right-padded batch (see the module docstring for why right padding)."""
    import torch

    width = max(len(s.tokens) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for r, s in enumerate(samples):
        ids[r, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
        rows += [r] * len(s.query_pos)
        cols += s.query_pos
        targets += s.targets

    def as_long(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return Batch(ids.to(device), as_long(rows), as_long(cols), as_long(targets))


__all__ = [
    "ALIGN",
    "Batch",
    "Sample",
    "TEST",
    "TRAIN",
    "VALID",
    "alignment_sample",
    "build_samples",
    "collate",
    "history_samples",
    "plan_batches",
]
