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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

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
    """The backbone with only layers k.. in its layer list (restored afterwards)."""
    parent, attr, layers = decoder_stack(backbone)
    setattr(parent, attr, nn.ModuleList(list(layers)[k:]))
    try:
        yield layers
    finally:
        setattr(parent, attr, layers)


def run_from(backbone: nn.Module, input_ids: Tensor, hidden: Tensor, k: int) -> Tensor:
    """Layers k.. and the final norm on `hidden` [B, L, d] (the states entering layer k) -> [B, L, d].

    `input_ids` [B, L] only give the model its shapes: their embeddings are replaced by `hidden`.
    """

    def swap(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h = hidden.to(_hidden_arg(args, kwargs).dtype)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    with _cut_at(backbone, k) as layers:
        handle = layers[k].register_forward_pre_hook(swap, with_kwargs=True)
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
    final metrics) still runs the whole backbone.
    """

    def top_states(self, hidden: Tensor, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor) -> Tensor:
        k = self.first_tuned
        groups = (
            self._length_groups(query_rows, query_cols, input_ids.shape[0]) if self.split_by_length else None
        )
        if groups is None:
            return run_from(self.backbone, input_ids, hidden, k)[query_rows, query_cols]  # [P, d]
        parts = []
        for rows, width in groups:
            h = run_from(self.backbone, input_ids[rows, :width], hidden[rows, :width], k)  # [b, w, d]
            where = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            where[rows] = torch.arange(rows.numel(), device=input_ids.device)
            sel = torch.nonzero(where[query_rows] >= 0).flatten()  # the queries of these rows
            parts.append((sel, h[where[query_rows[sel]], query_cols[sel]]))
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
    "TopST2SI",
    "decoder_stack",
    "freeze_below",
    "n_layers",
    "run_from",
    "states_entering",
]
