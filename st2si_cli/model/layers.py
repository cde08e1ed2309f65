"""A backbone cut at layer k: the states entering layer k, and layers k.. run on given states.

Top-k tuning (`st2si pretrain --tune-layers K`, k = L-K) freezes everything below layer k: the
embeddings (and OPT's learned positions, added before layer 0) and layers 0..k-1. Their output, the
state entering layer k, is then fixed, so it is computed once and cached; each step runs only
layers k..L-1 and the final norm. Both halves go through the model's own forward, so the causal
mask, the position ids and the rotary embeddings (Llama: computed by the model, passed to every
layer) are exactly those of a full forward:

    states_entering(k): a pre-hook on layer k takes its input, then stops the forward
    run_from(k, h):     the model's forward with its layer list cut to k.., a pre-hook on layer k
                        swapping the embeddings (a lookup, thrown away) for h

Frozen parts stay in eval mode whatever mode the module is in (no dropout below k), so a frozen
full forward and the cached path compute the same thing.

Only the query positions' final states are read, so the last layer of a Llama-family backbone runs
at those positions alone (`LastAtQueries`): keys and values at every token, then the attention output,
the MLP and both residual adds at the queries only. Everything else in that layer scales with the
queries, a few percent of the tokens, so top-1 tuning costs a fraction of a layer per token and
top-K saves most of one of its K layers. Same arithmetic as the layer's own forward, through its own
submodules (so LoRA and the dropout hooks act as they do there); tests/test_top_layers.py compares
the two, values and gradients.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from st2si_cli.errors import St2siError
from st2si_cli.model.st2si import ST2SI

BELOW = ("embed_tokens", "embed_positions", "project_in", "rotary_emb")  # run before layer 0: frozen
ABOVE = ("norm", "final_layer_norm", "project_out")  # run after the last layer: tuned


def decoder_stack(backbone: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module holding the decoder layers, its attribute name, the layers): OPT decoder.layers, Llama layers."""
    for name, mod in backbone.named_modules():
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers":
            parent_name, _, attr = name.rpartition(".")
            return (backbone.get_submodule(parent_name) if parent_name else backbone), attr, mod
    raise St2siError(f"{type(backbone).__name__} has no decoder layer list: top-layer tuning needs one")


def n_layers(backbone: nn.Module) -> int:
    return len(decoder_stack(backbone)[2])


def freeze_below(backbone: nn.Module, k: int) -> list[nn.Module]:
    """requires_grad=False for everything below layer k; returns the frozen modules (kept in eval mode).

    An unknown part of the decoder (neither a known embedding nor a known final norm) is an error
    rather than a guess on which side of the cut it runs.
    """
    parent, attr, layers = decoder_stack(backbone)
    if not 0 < k < len(layers):
        raise ValueError(f"the first tuned layer must be in 1..{len(layers) - 1}, not {k}")
    for p in backbone.parameters():
        p.requires_grad_(False)
    frozen: list[nn.Module] = list(layers[:k])
    for name, child in parent.named_children():
        if name == attr:
            continue
        if name in ABOVE:
            child.requires_grad_(True)
        elif name in BELOW:
            frozen.append(child)
        elif any(True for _ in child.parameters()):
            raise St2siError(
                f"top-layer tuning does not know where {type(parent).__name__}.{name} runs; tune all layers"
            )
    for layer in layers[k:]:
        layer.requires_grad_(True)
    return frozen


class _Stop(Exception):
    pass


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def states_entering(backbone: nn.Module, input_ids: Tensor, k: int) -> Tensor:
    """The hidden states entering layer k: [B, L, d], from the model's own forward stopped there."""
    layers = decoder_stack(backbone)[2]
    box: dict[str, Tensor] = {}

    def grab(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        box["h"] = _hidden_arg(args, kwargs)
        raise _Stop

    handle = layers[k].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["h"]


@contextlib.contextmanager
def _cut_at(backbone: nn.Module, k: int) -> Iterator[nn.ModuleList]:
    """The backbone with only layers k.. in its layer list (restored afterwards); yields that list."""
    parent, attr, layers = decoder_stack(backbone)
    cut = nn.ModuleList(list(layers)[k:])
    setattr(parent, attr, cut)
    try:
        yield cut
    finally:
        setattr(parent, attr, layers)


def at_queries_fits(layer: nn.Module) -> bool:
    """A Llama-family decoder layer (plain RoPE attention without dropout, pre-norm, MLP) with its
    weights in place (not partitioned by DeepSpeed ZeRO-3), which `LastAtQueries` can stand in for."""
    attn = getattr(layer, "self_attn", None)
    return (
        type(layer).__name__ == "LlamaDecoderLayer"
        and attn is not None
        and not getattr(getattr(attn, "config", None), "attention_dropout", 0.0)
        and all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))
        and all(hasattr(layer, a) for a in ("input_layernorm", "post_attention_layernorm", "mlp"))
        and not any(hasattr(p, "ds_id") for p in layer.parameters())
    )


class LastAtQueries(nn.Module):
    """The last decoder layer computed at the query positions (rows, cols) only.

    Returns its input with the layer's output written at those positions: the other positions are
    never read (only the query states go on to the ILP), so nothing else is computed for them.
    """

    def __init__(self, layer: nn.Module, rows: Tensor, cols: Tensor):
        super().__init__()
        self.layer = layer
        self.rows, self.cols = rows, cols

    def forward(self, hidden_states: Tensor, position_embeddings: Any = None, **_: Any) -> Tensor:
        from st2si_cli.model.fast import _rope

        layer, attn = self.layer, self.layer.self_attn
        x, rows, cols = hidden_states, self.rows, self.cols
        b, w, _d = x.shape
        p, hd = rows.numel(), attn.head_dim
        cos, sin = (t.expand(b, -1, -1) for t in position_embeddings)  # [b, w, hd]
        h = layer.input_layernorm(x)
        q = _rope(attn.q_proj(h[rows, cols]).view(p, -1, hd), cos[rows, cols, None], sin[rows, cols, None])
        k = _rope(attn.k_proj(h).view(b, w, -1, hd), cos[:, :, None], sin[:, :, None])  # [b, w, KV, hd]
        v = attn.v_proj(h).view(b, w, -1, hd)
        # each row's queries side by side: [b, m, H, hd], slot = the query's place within its row
        counts = torch.bincount(rows, minlength=b)
        order = torch.argsort(rows, stable=True)
        slot = torch.empty_like(rows)
        slot[order] = torch.arange(p, device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows[order]]
        m = int(counts.max())
        qpad = q.new_zeros(b, m, q.shape[1], hd).index_put((rows, slot), q)
        qcol = torch.zeros(b, m, dtype=torch.long, device=rows.device).index_put((rows, slot), cols)
        allowed = torch.arange(w, device=rows.device)[None, None, :] <= qcol[:, :, None]  # causal, [b, m, w]
        o = F.scaled_dot_product_attention(
            qpad.transpose(1, 2),
            k.transpose(1, 2).to(q.dtype),
            v.transpose(1, 2).to(q.dtype),
            attn_mask=allowed[:, None],
            scale=attn.scaling,
            enable_gqa=k.shape[2] != q.shape[1],
        )  # [b, H, m, hd]
        y = x[rows, cols] + attn.o_proj(o.transpose(1, 2)[rows, slot].reshape(p, -1))
        y = y + layer.mlp(layer.post_attention_layernorm(y))
        return x.index_put((rows, cols), y.to(x.dtype))


def run_from(
    backbone: nn.Module,
    input_ids: Tensor,
    hidden: Tensor,
    k: int,
    queries: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Layers k.. and the final norm on `hidden` [B, L, d] (the states entering layer k) -> [B, L, d].

    `input_ids` [B, L] only give the model its shapes: their embeddings are replaced by `hidden`.
    With `queries` (rows, cols), only those positions of the result are meant to be read: the last
    layer then runs at them alone where it can (`LastAtQueries`); the other positions hold anything.
    """

    def swap(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h = hidden.to(_hidden_arg(args, kwargs).dtype)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    with _cut_at(backbone, k) as cut:
        if queries is not None and at_queries_fits(cut[-1]):
            cut[-1] = LastAtQueries(cut[-1], *queries)
        handle = cut[0].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            return backbone(input_ids=input_ids, use_cache=False).last_hidden_state
        finally:
            handle.remove()


class FrozenBelowST2SI(ST2SI):
    """ST2SI with everything below layer `first_tuned` frozen: no gradients, eval mode (no dropout)."""

    def __init__(self, backbone: nn.Module, n_items: int, first_tuned: int, **kwargs: Any):
        super().__init__(backbone, n_items, **kwargs)
        self.first_tuned = first_tuned
        self._frozen = freeze_below(backbone, first_tuned)

    def train(self, mode: bool = True) -> FrozenBelowST2SI:
        super().train(mode)
        for m in self._frozen:
            m.train(False)
        return self


class TopST2SI(FrozenBelowST2SI):
    """The frozen-below module fed with cached states: `forward(hidden, input_ids, rows, cols, targets)`.

    `hidden` [B, L, d] holds the states entering layer `first_tuned`, right padded like `input_ids`.
    Rows of very different lengths run as separate narrower forwards, grouped as `ST2SI.query_states`
    groups them, so a frozen full forward and this one see the same widths. `hidden_at` (validation,
    final metrics) still runs the whole backbone. `last_at_queries` (default on) runs the last layer at
    the query positions only, where the backbone allows it (`LastAtQueries`); `ST2SI_WHOLE_LAST_LAYER=1`
    turns it off (to time or check one against the other).
    """

    def __init__(self, backbone: nn.Module, n_items: int, first_tuned: int, **kwargs: Any):
        super().__init__(backbone, n_items, first_tuned, **kwargs)
        self.last_at_queries = not os.environ.get("ST2SI_WHOLE_LAST_LAYER")

    def top_states(self, hidden: Tensor, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor) -> Tensor:
        k = self.first_tuned
        groups = (
            self._length_groups(query_rows, query_cols, input_ids.shape[0]) if self.split_by_length else None
        )
        at_queries = self.last_at_queries
        if groups is None:
            queries = (query_rows, query_cols) if at_queries else None
            return run_from(self.backbone, input_ids, hidden, k, queries)[query_rows, query_cols]  # [P, d]
        parts = []
        for rows, width in groups:
            where = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            where[rows] = torch.arange(rows.numel(), device=input_ids.device)
            sel = torch.nonzero(where[query_rows] >= 0).flatten()  # the queries of these rows
            qr, qc = where[query_rows[sel]], query_cols[sel]
            h = run_from(
                self.backbone,
                input_ids[rows, :width],
                hidden[rows, :width],
                k,
                (qr, qc) if at_queries else None,
            )  # [b, w, d]
            parts.append((sel, h[qr, qc]))
        out = parts[0][1].new_empty(query_rows.numel(), parts[0][1].shape[1])
        for sel, part in parts:
            out = out.index_put((sel,), part)
        return out

    def forward(  # type: ignore[override]
        self,
        hidden: Tensor,
        input_ids: Tensor,
        query_rows: Tensor,
        query_cols: Tensor,
        targets: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor | None]:
        from st2si_cli.model.scoring import linear_cross_entropy

        assert self.ilp is not None
        h = self.top_states(hidden, input_ids, query_rows, query_cols)
        if targets is None:
            return self.ilp(h), None
        return None, linear_cross_entropy(h, self.ilp.weight, targets)


__all__ = [
    "FrozenBelowST2SI",
    "LastAtQueries",
    "TopST2SI",
    "at_queries_fits",
    "decoder_stack",
    "freeze_below",
    "n_layers",
    "run_from",
    "states_entering",
]
