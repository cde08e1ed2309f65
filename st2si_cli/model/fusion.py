"""The fusion of an ILP and sequence adapters over one feature cache: their log-probabilities mixed.

    score(item) = w * log p_ILP(item) + (1 - w) * mean_k log p_adapter_k(item)

The parts read different evidence: the ILP the language model's last query feature through a
full-rank projection, the adapter the sequence of query features with item IDs and item text. Several
adapters (e.g. trained from different seeds) are averaged as an ensemble before the mix. Without an ILP
(`ilp_weight` None, w 0) it is that ensemble alone: of ID-only adapters, the ID-only reference a recipe
is measured against. How w is chosen is `st2si_cli.heads.fusion`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ILP_TENSOR = "ilp.weight"  # the ILP's weight among a fusion's tensors
ADAPTER_PREFIX = "adapter."  # the first adapter's tensors; adapter{k}. for the k-th (k >= 1)


def adapter_prefix(k: int) -> str:
    return ADAPTER_PREFIX if k == 0 else f"adapter{k}."


@dataclass
class Fusion:
    ilp_weight: Any  # [N, d]; None: an ensemble of the adapters alone
    adapters: list[Any]  # SequenceAdapters, eval mode
    w: float  # weight of the ILP's log-probabilities (0 without an ILP)

    def ilp_scores(self, last_feats: Any) -> Any:
        """The ILP's scores [B, N] of the last query features [B, d] (None without an ILP)."""
        return None if self.ilp_weight is None else last_feats.float() @ self.ilp_weight.float().T

    def mix(self, ilp_scores: Any, adapter_scores: list[Any]) -> Any:
        import torch

        adapters = torch.stack([torch.log_softmax(a.float(), 1) for a in adapter_scores]).mean(0)
        if ilp_scores is None:
            return adapters
        return self.w * torch.log_softmax(ilp_scores.float(), 1) + (1 - self.w) * adapters

    def score_histories(self, feats: list[Any], catalog_ids: list[list[int | None]]) -> Any:
        """Scores [B, N] of histories given as query features (newest window) and catalog IDs."""
        import torch

        last = torch.stack([f[-1].float() for f in feats]) if self.ilp_weight is not None else None
        return self.mix(
            self.ilp_scores(last) if last is not None else None,
            [a.score_histories(feats, catalog_ids) for a in self.adapters],
        )

    def tensors(self, adapter_tensors: list[dict[str, Any]]) -> dict[str, Any]:
        """The tensors a fusion head stores: the ILP's (where it has one), and each adapter's under its prefix."""
        out = {} if self.ilp_weight is None else {ILP_TENSOR: self.ilp_weight.contiguous()}
        for k, tensors in enumerate(adapter_tensors):
            out.update({adapter_prefix(k) + n: v for n, v in tensors.items()})
        return out


def fusion_parts(tensors: Mapping[str, Any], train: Mapping[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """Each adapter of a stored fusion: (its tensors, prefix removed; its training settings), in order.
    Torch-free: the numpy engine reads a fusion with it too."""
    configs = train.get("adapters") or [train["adapter"]]
    parts = []
    for k, cfg in enumerate(configs):
        prefix = adapter_prefix(k)
        parts.append(({n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}, cfg))
    return parts


def load_fusion(tensors: dict[str, Any], train: dict[str, Any], d_feat: int, n_items: int) -> Fusion:
    """Rebuild a fusion from its stored tensors and training record ({"w", "adapter"[, "adapters"]})."""
    from st2si_cli.model.adapter import load_adapter

    adapters = [load_adapter(part, cfg, d_feat, n_items) for part, cfg in fusion_parts(tensors, train)]
    return Fusion(tensors.get(ILP_TENSOR), adapters, float(train["w"]))
