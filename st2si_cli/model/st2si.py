"""The ST2SI module: a decoder-only LM whose hidden state at each [Q] goes through the ILP.

    samples --collate--> input_ids [B, L] (right padded), query (row, col) [P]
            --backbone--> last hidden states [B, L, d] --at the queries--> h [P, d]
            --ILP--> logits [P, N]  (with targets: chunked cross-entropy, logits never whole)

Every path computes its hidden states here: the feature cache (`hidden_at`, no ILP), eval and
recommend (through the cache or `hidden_at`), and pretraining (`forward`, backbone and ILP tuned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.scoring import linear_cross_entropy


def init_ilp_weight(n_items: int, hidden: int, generator: torch.Generator) -> Tensor:
    """A fresh ILP weight [N, d] in nn.Linear's default range, drawn from `generator` (so every rank
    and every rerun draws the same head)."""
    bound = 1.0 / hidden**0.5
    return (torch.rand(n_items, hidden, generator=generator) * 2 - 1) * bound


def hidden_size(backbone: nn.Module) -> int:
    cfg = backbone.config
    return int(getattr(cfg, "hidden_size", 0) or cfg.d_model)


def length_split_pays(device: Any) -> bool:
    """Whether a training batch should run as several narrower forwards, one per length group.

    On a CPU, compute grows with the padded width, so splitting a batch that mixes long histories with
    short alignment samples saves work. On a GPU a step of this size is bound by kernel launches, not
    arithmetic (an H200 ran a SmolLM2-135M train step in 0.126 s at batch 1 and 0.133 s at batch 64 of
    256 tokens: bench/results/2026-11-28-intel-xeon-16c-gpu-nvidia-h200.md), so each extra forward
    costs about as much as a whole step: one padded forward is faster.
    """
    return str(device).split(":")[0] == "cpu"


class ST2SI(nn.Module):
    """Backbone (a transformers base model, no LM head) + ILP `Linear(d, N, bias=False)`.

    `n_items=None` builds the module without an ILP: only `hidden_at` then (the feature pass).
    `split_by_length` runs rows of very different lengths as separate narrower forwards (pretraining,
    where a random batch mixes long histories with short alignment samples); the other paths keep
    one forward per batch, whose features the caches hold.
    """

    def __init__(
        self,
        backbone: nn.Module,
        n_items: int | None,
        *,
        pad_id: int = 0,
        seed: int = 0,
        split_by_length: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.pad_id = pad_id  # right padding: any token would do, causal attention never reads it
        self.split_by_length = split_by_length  # off under ZeRO-3: every rank must run the same forwards
        self.packed = True  # inference through model/fast.py where the family supports it
        self._packed_cache: dict = {}
        self.ilp: nn.Linear | None = None
        if n_items is not None:
            d = hidden_size(backbone)
            self.ilp = nn.Linear(d, n_items, bias=False)  # item linear projection, weight [N, d]
            with torch.no_grad():
                self.ilp.weight.copy_(init_ilp_weight(n_items, d, torch.Generator().manual_seed(seed)))

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def hidden_at(self, samples: Sequence[Sample]) -> Tensor:
        """Hidden states at the samples' query positions, in sample order: [P, d] (the backbone's dtype).

        Without autograd and in eval mode, a Llama-family backbone runs packed (`model/fast.py`: no
        padding in the linear layers, fused weights); the features are the same within rounding.
        """
        if self.packed and not torch.is_grad_enabled() and not self.backbone.training:
            from st2si_cli.model.fast import packed_for

            fast = packed_for(self.backbone, self._packed_cache)
            if fast is not None:
                return fast.query_states(samples)
        batch = collate(samples, self.pad_id, self.device)
        return self.query_states(batch.input_ids, batch.query_rows, batch.query_cols)

    def query_states(self, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor) -> Tensor:
        """input_ids [B, L] right padded; query_rows/cols [P] -> hidden states at the queries [P, d].

        Split by length, the features are the same: attention is causal, padding is on the right and
        a sample ends with its last query.
        """
        groups = (
            self._length_groups(query_rows, query_cols, input_ids.shape[0]) if self.split_by_length else None
        )
        if groups is None:
            h = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, d]
            return h[query_rows, query_cols]  # [P, d]
        out: Tensor | None = None
        for rows, width in groups:
            h = self.backbone(
                input_ids=input_ids[rows, :width], use_cache=False
            ).last_hidden_state  # [b, w, d]
            where = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            where[rows] = torch.arange(rows.numel(), device=input_ids.device)
            sel = torch.nonzero(where[query_rows] >= 0).flatten()  # the queries of these rows
            part = h[where[query_rows[sel]], query_cols[sel]]  # [p, d]
            if out is None:
                out = part.new_empty(query_rows.numel(), part.shape[1])
            out = out.index_put((sel,), part)
        return out

    @staticmethod
    def _length_groups(
        query_rows: Tensor, query_cols: Tensor, n_rows: int
    ) -> list[tuple[Tensor, int]] | None:
        """Rows by length (a row ends at its last query), cut where a row is under half the group's width."""
        lengths = torch.zeros(n_rows, dtype=torch.long, device=query_rows.device)
        lengths = lengths.scatter_reduce(0, query_rows, query_cols + 1, reduce="amax").tolist()
        order = sorted(range(n_rows), key=lambda r: -lengths[r])
        groups: list[list[int]] = [[order[0]]]
        for r in order[1:]:
            if 2 * lengths[r] < lengths[groups[-1][0]]:
                groups.append([])
            groups[-1].append(r)
        if len(groups) == 1:
            return None
        device = query_rows.device
        return [(torch.tensor(sorted(g), dtype=torch.long, device=device), lengths[g[0]]) for g in groups]

    def forward(
        self, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor, targets: Tensor | None = None
    ) -> tuple[Tensor | None, Tensor | None]:
        """(logits [P, N], None) without targets; (None, mean cross-entropy over the P queries) with them.

        With targets the logits are never materialised whole: the CE runs in item chunks for big catalogs.
        """
        if self.ilp is None:
            raise ValueError("this ST2SI module has no ILP (built with n_items=None)")
        h = self.query_states(input_ids, query_rows, query_cols)  # [P, d]
        if targets is None:
            return self.ilp(h), None  # [P, N]
        return None, linear_cross_entropy(h, self.ilp.weight, targets)


__all__ = ["ST2SI", "hidden_size", "init_ilp_weight"]
