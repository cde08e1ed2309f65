"""The sequence adapter: a SASRec head that reads the frozen language model's features as well as item IDs.

Each user's history rows in a `FeatureSet` are positions j = 0..n-2 of its sequence: the feature
of the query after item seq[j], target seq[j + 1]. The adapter runs a causal transformer over those
positions; the input at a step is LN(query_proj(feature)) + item_emb(seq[j]) + pos_emb(step), and
items are scored against LN(item_proj(item text feature)) + item_emb(item). With `use_text=False` it
is plain SASRec on IDs; with `use_ids=False` it reads only the language model.

Layout: windows are right-padded and positions are left-aligned (the oldest step of a window has
position 0), as in RecBole's SASRec; with a causal mask, real steps never see padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

TEXT_GAIN = 0.02  # initial LayerNorm gain of the projected text features (the ID embeddings' init std)


@dataclass
class AdapterConfig:
    """Sequence-adapter settings, recorded with every adapter."""

    hidden: int = 64  # transformer width
    layers: int = 2  # transformer layers
    heads: int = 2  # attention heads
    dropout: float = 0.5  # hidden and attention dropout (RecBole SASRec's default)
    max_len: int = 50  # steps the transformer sees; older positions are cut off
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0
    batch_size: int = 128  # training windows (chunks of a user's history) per step
    max_epochs: int = 200
    patience: int = 10  # epochs without a better validation NDCG@10 before stopping
    seed: int = 0
    use_ids: bool = True  # ablation: False = text only (no item ID embeddings)
    use_text: bool = True  # ablation: False = plain SASRec on item IDs
    text_norm: bool = (
        True  # LayerNorm (gain 0.02 at init) on both projected text paths; False: the first version
    )
    ties: str = "pessimistic"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SequenceAdapter(nn.Module):
    """Causal transformer over a user's positions; scores = h_t @ item_vectors().T."""

    def __init__(
        self, cfg: AdapterConfig, d_feat: int, n_items: int, item_text: Tensor | None = None
    ) -> None:
        super().__init__()
        if not (cfg.use_ids or cfg.use_text):
            raise ValueError("the adapter needs use_ids or use_text")
        if cfg.use_text and (item_text is None or tuple(item_text.shape) != (n_items, d_feat)):
            raise ValueError(f"use_text needs item_text of shape ({n_items}, {d_feat})")
        self.cfg, self.d_feat, self.n_items = cfg, d_feat, n_items
        # Without text the buffer is empty, so the state dict keeps one layout without the weight.
        text = item_text.float() if cfg.use_text else torch.zeros(0, d_feat)
        self.register_buffer("item_text", text.clone().contiguous())
        # LM hidden states carry a few huge dimensions: both feature kinds are standardised per
        # dimension (item text with its own statistics, queries with the training rows', set by
        # `set_query_stats`) before their projections. Stored as buffers.
        self.register_buffer("text_mean", text.mean(0) if len(text) else torch.zeros(d_feat))
        self.register_buffer("text_std", text.std(0).clamp_min(1e-6) if len(text) > 1 else torch.ones(d_feat))
        self.register_buffer("query_mean", torch.zeros(d_feat))
        self.register_buffer("query_std", torch.ones(d_feat))
        if cfg.use_text:
            self.query_proj = nn.Linear(d_feat, cfg.hidden)
            self.query_norm = nn.LayerNorm(cfg.hidden)
            self.item_proj = nn.Linear(d_feat, cfg.hidden)
            self.item_norm = nn.LayerNorm(cfg.hidden) if cfg.text_norm else nn.Identity()
        if cfg.use_ids:
            self.item_emb = nn.Embedding(n_items + 1, cfg.hidden, padding_idx=n_items)  # n_items: unknown/pad
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(
            cfg.hidden,
            cfg.heads,
            4 * cfg.hidden,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(cfg.hidden)
        self.dropout = nn.Dropout(cfg.dropout)
        self.apply(_init_weights)
        if cfg.use_text and cfg.text_norm:
            # Both text paths start at the ID embeddings' scale (std 0.02 per dimension), so neither
            # kind of evidence drowns the other at the start; the LayerNorm gains learn the balance.
            for norm in (self.query_norm, self.item_norm):
                nn.init.constant_(norm.weight, TEXT_GAIN)
        if cfg.use_ids:
            with torch.no_grad():
                self.item_emb.weight[n_items].zero_()

    def set_query_stats(self, feats: Tensor) -> None:
        """Per-dimension mean and std of the query features the adapter will read ([rows, d])."""
        self.query_mean.copy_(feats.float().mean(0))
        self.query_std.copy_(feats.float().std(0).clamp_min(1e-6))

    def forward(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """feats [B, T, d], ids [B, T] (n_items = unknown/pad), lengths [B] -> hidden [B, T, hidden]."""
        b, t = ids.shape
        if t > self.cfg.max_len:
            raise ValueError(f"{t} steps exceed max_len={self.cfg.max_len}")
        if b and int(lengths.min()) < 1:
            raise ValueError("every row needs at least one step")
        steps = torch.arange(t, device=ids.device)
        pad = steps[None, :] >= lengths.to(ids.device)[:, None]  # True at padding; step 0 is always real
        x = self.pos_emb(steps)[None].expand(b, t, -1)
        if self.cfg.use_text:
            x = x + self.query_norm(self.query_proj((feats.float() - self.query_mean) / self.query_std))
        if self.cfg.use_ids:
            x = x + self.item_emb(ids)
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), diagonal=1)
        h = self.encoder(self.dropout(x), mask=causal, src_key_padding_mask=pad)
        return self.final_norm(h)

    def item_vectors(self) -> Tensor:
        """Output vector of every item, [n_items, hidden] (the unknown/pad ID is not an item)."""
        v = (
            self.item_norm(self.item_proj((self.item_text - self.text_mean) / self.text_std))
            if self.cfg.use_text
            else 0
        )
        if self.cfg.use_ids:
            v = v + self.item_emb.weight[: self.n_items]
        return v

    def score_last(self, feats: Tensor, ids: Tensor, lengths: Tensor) -> Tensor:
        """Scores of every item at each row's last real step, [B, n_items]."""
        h = self(feats, ids, lengths)
        last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return last @ self.item_vectors().T

    def score_histories(self, feats: list[Tensor], catalog_ids: list[list[int | None]]) -> Tensor:
        """Scores [B, N] of histories given as their query features (newest window) and catalog IDs (None:
        an item outside the catalog, which gets no ID embedding)."""
        max_len, n = self.cfg.max_len, self.n_items
        lengths = torch.tensor([min(len(f), max_len) for f in feats])
        width = int(lengths.max())
        x = torch.zeros(len(feats), width, feats[0].shape[1])
        ids = torch.full((len(feats), width), n, dtype=torch.long)
        for r, (f, cids) in enumerate(zip(feats, catalog_ids)):
            m = int(lengths[r])
            x[r, :m] = f[-m:].float()
            window = [n if c is None else c for c in cids[len(cids) - len(f) :]]
            ids[r, :m] = torch.tensor(window[-m:], dtype=torch.long)
        with torch.no_grad():
            return self.score_last(x, ids, lengths)


def _init_weights(m: nn.Module) -> None:
    # RecBole SASRec: N(0, 0.02) for linear and embedding weights, zero biases, unit LayerNorms.
    if isinstance(m, nn.Linear | nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
    if isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def adapter_tensors(model: SequenceAdapter) -> dict[str, Tensor]:
    """The state dict as contiguous float32 CPU tensors (safetensors-ready, no pickle)."""
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def load_adapter(
    tensors: dict[str, Tensor], cfg_dict: dict[str, Any], d_feat: int, n_items: int
) -> SequenceAdapter:
    """Rebuild an adapter (in eval mode) from `AdapterConfig.to_dict()` and `adapter_tensors`."""
    cfg_dict = {"text_norm": False, **cfg_dict}  # adapters stored before text_norm existed had none
    cfg = AdapterConfig(**cfg_dict)
    model = SequenceAdapter(cfg, d_feat, n_items, tensors["item_text"] if cfg.use_text else None)
    model.load_state_dict(tensors)
    return model.eval()
