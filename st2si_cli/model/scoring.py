"""Scoring with the item linear projection, in bounded memory.

The ILP is d x N: a million-item catalog means B x 1M logits per batch. Everything here works in
chunks of rows (users) and of items, so memory stays O(row_chunk x item_chunk) whatever N is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from st2si_cli.metrics import RankAccumulator, rank_of_target

ROW_CHUNK = 1024
ITEM_CHUNK = 65536


def rank_rows(
    weight: Tensor,
    hidden: Tensor,
    targets: Tensor,
    *,
    ties: str = "pessimistic",
    exclude: Sequence[Sequence[int]] | None = None,
    row_chunk: int = ROW_CHUNK,
    item_chunk: int = ITEM_CHUNK,
) -> Tensor:
    """Full-ranking rank of each row's target under logits = hidden @ weight.T.

    weight: [N, d]; hidden: [B, d]; targets: [B] -> ranks [B] (1-based, long).
    """
    n_items = weight.shape[0]
    out = torch.empty(hidden.shape[0], dtype=torch.long)
    w = weight.float()
    for r0 in range(0, hidden.shape[0], row_chunk):
        h = hidden[r0 : r0 + row_chunk].float()
        t = targets[r0 : r0 + row_chunk].long()
        ex = exclude[r0 : r0 + row_chunk] if exclude is not None else None
        if n_items <= item_chunk:
            out[r0 : r0 + row_chunk] = rank_of_target(h @ w.T, t, ties=ties, exclude=ex)
            continue
        # Two passes over item chunks: the target's score must come from the same matmul as the
        # others', or a last-bit difference would decide ties.
        target_scores = torch.empty(h.shape[0])
        for c0 in range(0, n_items, item_chunk):
            c1 = min(n_items, c0 + item_chunk)
            rows = torch.nonzero((t >= c0) & (t < c1)).flatten()
            if rows.numel():
                target_scores[rows] = (h[rows] @ w[c0:c1].T).gather(1, (t[rows] - c0)[:, None]).squeeze(1)
        acc = RankAccumulator(target_scores, ties=ties)
        for c0 in range(0, n_items, item_chunk):
            c1 = min(n_items, c0 + item_chunk)
            scores = h @ w[c0:c1].T  # [b, c]
            mask = None
            if ex is not None:
                mask = torch.zeros_like(scores, dtype=torch.bool)
                for i, items in enumerate(ex):
                    cols = [j - c0 for j in items if c0 <= j < c1]
                    if cols:
                        mask[i, cols] = True
            acc.update(scores, c0, t, exclude_mask_chunk=mask)
        out[r0 : r0 + row_chunk] = acc.ranks()
    return out


def top_k(
    weight: Tensor,
    hidden: Tensor,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    item_chunk: int = ITEM_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Top-k items per row without materialising all N logits at once. Returns (scores, indices) [B, k],
    best first; equal scores in catalog order (so every engine, and every chunk size, gives one answer)."""
    n_items = weight.shape[0]
    k = min(k, n_items)
    best_s = torch.full((hidden.shape[0], 0), float("-inf"))
    best_i = torch.zeros((hidden.shape[0], 0), dtype=torch.long)
    h = hidden.float()
    w = weight.float()
    for c0 in range(0, n_items, item_chunk):
        c1 = min(n_items, c0 + item_chunk)
        scores = h @ w[c0:c1].T
        if exclude is not None:
            for i, items in enumerate(exclude):
                cols = [j - c0 for j in items if c0 <= j < c1]
                if cols:
                    scores[i, cols] = float("-inf")
        # the kept ones (lower catalog indices) first: position order is catalog order among equals
        cand_s = torch.cat([best_s, scores], 1)
        cand_i = torch.cat([best_i, torch.arange(c0, c1).expand_as(scores)], 1)
        best_s, pos = best_k(cand_s, k)
        best_i = cand_i.gather(1, pos)
    return best_s, best_i


def best_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values, positions) of the k best of each row, best first, equal values in position order (NaN
    first, as torch sorts). topk, then a stable sort of the k; rows with a tie at the k-th value (or a
    NaN) are sorted whole, since topk may have kept any of the equal ones."""
    k = min(k, scores.shape[1])
    s, pos = scores.topk(k, dim=1)
    pos, order = pos.sort(dim=1)
    s, order = s.gather(1, order).sort(dim=1, descending=True, stable=True)
    pos = pos.gather(1, order)
    if k:
        redo = ((scores >= s[:, -1:]).sum(1) > k) | torch.isnan(s).any(1)
        rows = torch.nonzero(redo).flatten()
        if rows.numel():
            full_s, full_pos = scores[rows].sort(dim=1, descending=True, stable=True)
            s[rows], pos[rows] = full_s[:, :k], full_pos[:, :k]
    return s, pos


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = hidden @ weight.T without keeping [B, N] logits for backward.

    Forward computes the log-sum-exp chunk by chunk; backward recomputes each chunk's softmax.
    """

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        b = hidden.shape[0]
        lse = torch.full((b,), float("-inf"), dtype=torch.float32, device=hidden.device)
        for c0 in range(0, weight.shape[0], chunk):
            logits = (hidden @ weight[c0 : c0 + chunk].T).float()
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        target_logit = (hidden * weight[targets]).sum(-1).float()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, targets, lse = ctx.saved_tensors
        b = hidden.shape[0]
        scale = grad_out / b
        grad_h = torch.zeros_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)
        for c0 in range(0, weight.shape[0], ctx.chunk):
            w = weight[c0 : c0 + ctx.chunk]
            p = torch.exp((hidden @ w.T).float() - lse[:, None])  # softmax probabilities of this chunk
            in_chunk = (targets >= c0) & (targets < c0 + w.shape[0])
            rows = torch.nonzero(in_chunk).flatten()
            p[rows, targets[rows] - c0] -= 1.0
            p = p * scale
            grad_h += p @ w.float()
            grad_w[c0 : c0 + w.shape[0]] += p.T @ hidden.float()
        return grad_h.to(hidden.dtype), grad_w.to(weight.dtype), None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = ITEM_CHUNK) -> Tensor:
    """Mean CE over rows; plain for small catalogs, chunked (bounded memory) for large ones."""
    if weight.shape[0] <= chunk:
        return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
