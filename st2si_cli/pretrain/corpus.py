"""The training data of full tuning: one item space over the union of the domains, each epoch's samples
and its shuffle, split across ranks and micro-steps the same way for any world size."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from st2si_cli.errors import St2siError
from st2si_cli.model.samples import (
    ALIGN,
    TRAIN,
    VALID,
    Sample,
    alignment_sample,
    build_samples,
    history_samples,
)
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.pretrain.config import PretrainConfig
from st2si_cli.zoo.store import Artifact, Zoo


@dataclass
class Corpus:
    """Tokenised domains with item IDs offset into one union space (domain k's items after domain k-1's)."""

    domains: list[str]
    datasets: list[Artifact]
    offsets: list[int]  # first union item ID of each domain
    sizes: list[int]  # items per domain
    itok: ItemTokenizer
    item_tokens: list[list[int]]  # union item ID -> text tokens (without [Q])
    train_items: list[list[int]]  # per history: union IDs of its training part (all but valid and test items)
    eval_samples: list[Sample]  # histories (VALID, TEST queries) then alignment samples, union IDs
    eval_domain: list[int]  # domain index of each eval sample

    @property
    def n_items(self) -> int:
        return sum(self.sizes)

    @property
    def pad_id(self) -> int:
        return self.itok.pad_id


def build_corpus(zoo: Zoo, datasets: Sequence[Artifact], tokenizer: Any, text: TextConfig) -> Corpus:
    from st2si_cli.data.prepare import load_dataset

    itok = ItemTokenizer.create(tokenizer, text)
    offsets, sizes, item_tokens, train_items, eval_samples, eval_domain = [], [], [], [], [], []
    histories, aligns = [], []
    for k, art in enumerate(datasets):
        ds = load_dataset(zoo, art.id)
        off = len(item_tokens)
        offsets.append(off)
        sizes.append(ds.n_items)
        toks = itok.encode_items(ds.items)
        item_tokens += toks
        train_items += [[off + i for i in seq[:-2]] for seq in ds.sequences]
        for s in build_samples(ds, itok, toks, alignment=True, every_position=False):
            shifted = Sample(s.tokens, s.query_pos, [off + t for t in s.targets], s.roles, s.owner)
            (aligns if s.roles == [ALIGN] else histories).append((shifted, k))
    for s, k in histories + aligns:
        eval_samples.append(s)
        eval_domain.append(k)
    return Corpus(
        [a.name or a.id for a in datasets],
        list(datasets),
        offsets,
        sizes,
        itok,
        item_tokens,
        train_items,
        eval_samples,
        eval_domain,
    )


def epoch_samples(corpus: Corpus, cfg: PretrainConfig, epoch: int) -> list[Sample]:
    """The training samples of one epoch: one per history with a training position, then one per item.

    sampling "all": the history's whole training part, every query a training position (the paper's
    Eq. 3). sampling "crop" (the authors' code): per user, a target index `end` drawn uniformly from the
    training part (never its first item) and a start uniformly before it; the crop is the input and each
    query predicts the item after it. Seeded by (seed, epoch), the same on every rank.
    """
    itok, toks = corpus.itok, corpus.item_tokens
    rng = random.Random(cfg.seed * 1_000_003 + epoch)
    out: list[Sample] = []
    for u, items in enumerate(corpus.train_items):
        n = len(items)
        if n < 2:
            continue
        if cfg.sampling == "crop":
            end = rng.randint(1, n - 1)
            start = rng.randint(0, end - 1)
            inputs, targets = items[start:end], items[start + 1 : end + 1]
        else:
            inputs, targets = items[:-1], items[1:]
        # The newest window of the inputs that fits; query j predicts targets[j].
        [s] = history_samples(
            itok, [toks[i] for i in inputs], targets, [TRAIN] * len(targets), u, every_position=False
        )
        if not cfg.multi_query:
            s.query_pos, s.targets, s.roles = s.query_pos[-1:], s.targets[-1:], s.roles[-1:]
        out.append(s)
    if cfg.alignment:
        out += [alignment_sample(itok, ids, i) for i, ids in enumerate(toks)]
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffle: depends on (seed, epoch) only, never on the world size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def split_even(items: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` consecutive slices whose sizes differ by at most one (the first ones larger)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(list(items[start : start + size]))
        start += size
    return out


def valid_view(s: Sample) -> Sample | None:
    """A history sample cut after its VALID query (what validation needs; causal, so the same feature)."""
    if VALID not in s.roles:
        return None
    j = s.roles.index(VALID)
    p = s.query_pos[j]
    return Sample(s.tokens[: p + 1], [p], [s.targets[j]], [VALID], s.owner)


def steps_per_epoch(corpus: Corpus, cfg: PretrainConfig, world_size: int) -> int:
    """Optimizer steps per epoch: each takes batch_size x grad_accum x world_size samples."""
    n_train = len(epoch_samples(corpus, cfg, 1))  # the same count every epoch
    if n_train == 0:
        raise St2siError(
            "no training samples: every user needs at least 4 items (or keep the alignment samples)"
        )
    return -(-n_train // (cfg.batch_size * cfg.grad_accum * world_size))


__all__ = [
    "Corpus",
    "build_corpus",
    "epoch_order",
    "epoch_samples",
    "split_even",
    "steps_per_epoch",
    "valid_view",
]
