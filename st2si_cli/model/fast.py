"""A packed inference forward for Llama-family backbones: the feature pass without padding waste.

The plain path pads a batch to its longest sample and runs every layer over [B, L_max]. Here the
samples' real tokens are concatenated into one [T, d] matrix, so every linear layer (90% of the
FLOPs) runs on real tokens only, as one GEMM per weight:

    ids [T] --embed--> x [T, d]
    per layer: x += o_proj(attention(rope(qkv_proj(rms_norm(x)))))      (q, k, v: one fused weight)
               x += down_proj(silu(gate) * up), gate|up = gate_up_proj(rms_norm(x))   (one fused weight)
    the last layer's o_proj, MLP and the final norm run on the query rows only.

Attention alone is padded, per group of samples of similar length (scattered into [b, H, L, hd],
causal SDPA, gathered back; a lone sample is not padded): with right padding a real token never
attends to a pad, so the result is the plain path's. Positions restart at
0 in every sample, as in a right-padded row. Same weights, same operations, same dtypes (bf16
residual stream, fp32 statistics inside the norm): features equal the plain forward's in fp32 up to
float rounding and within bf16 rounding in bf16 (tests/test_fast_forward.py).

Inference only (no autograd through the fused weights); other families use the plain forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from st2si_cli.model.samples import Sample

SUPPORTED = ("llama",)


def supports(backbone: nn.Module) -> bool:
    """A Llama-family base model with plain RoPE, SiLU MLP and no sliding window."""
    cfg = getattr(backbone, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in SUPPORTED:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "sliding_window", None):
        return False
    if any(hasattr(p, "ds_id") for p in backbone.parameters()):  # DeepSpeed ZeRO-3: partitioned weights
        return False
    if any(".lora_" in n for n, _ in backbone.named_parameters()):  # LoRA (pretrain --lora): not folded in
        return False
    return all(hasattr(backbone, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


@dataclass
class _Layer:
    norm1: Tensor
    qkv: Tensor  # [(H + 2 KV) hd, d]
    qkv_bias: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    norm2: Tensor
    gate_up: Tensor  # [2 I, d]
    gate_up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None


def _cat_bias(*lins: nn.Linear) -> Tensor | None:
    if all(lin.bias is None for lin in lins):
        return None
    return torch.cat(
        [lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in lins]
    )


class PackedLlama:
    """Fused weights of one Llama backbone (built once; copies q|k|v and gate|up, ~the MLP+attn size)."""

    def __init__(self, backbone: nn.Module):
        cfg = backbone.config
        self.model = backbone
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads)
        self.eps = float(cfg.rms_norm_eps)
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in backbone.layers:
                a, m = layer.self_attn, layer.mlp
                self.layers.append(
                    _Layer(
                        norm1=layer.input_layernorm.weight.detach(),
                        qkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach(),
                        qkv_bias=_cat_bias(a.q_proj, a.k_proj, a.v_proj),
                        o=a.o_proj.weight.detach(),
                        o_bias=a.o_proj.bias,
                        norm2=layer.post_attention_layernorm.weight.detach(),
                        gate_up=torch.cat([m.gate_proj.weight, m.up_proj.weight]).detach(),
                        gate_up_bias=_cat_bias(m.gate_proj, m.up_proj),
                        down=m.down_proj.weight.detach(),
                        down_bias=m.down_proj.bias,
                    )
                )
        self.embed = backbone.embed_tokens.weight.detach()
        self.final_norm = backbone.norm.weight.detach()
        self.rope = backbone.rotary_emb  # (x, positions [1, T]) -> cos, sin [1, T, hd]

    @classmethod
    def from_weights(
        cls, cfg: dict[str, Any], weights: dict[str, Tensor], dtype: torch.dtype, rope_theta: float
    ) -> PackedLlama:
        """From a base model's state dict (names without the `model.` prefix) and its config.json,
        without building the transformers module: the same fused weights in `dtype`, and RoPE tables
        computed as transformers' LlamaRotaryEmbedding computes them ('default' RoPE)."""
        self = cls.__new__(cls)
        self.model = None
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // self.heads)
        self.eps = float(cfg["rms_norm_eps"])

        def w(name: str) -> Tensor:
            t = weights[name]
            return t if t.dtype == dtype else t.to(dtype)

        self.layers = []
        with torch.no_grad():
            for i in range(int(cfg["num_hidden_layers"])):
                p = f"layers.{i}."
                self.layers.append(
                    _Layer(
                        norm1=w(p + "input_layernorm.weight"),
                        qkv=cat_rows([w(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
                        qkv_bias=None,
                        o=w(p + "self_attn.o_proj.weight"),
                        o_bias=None,
                        norm2=w(p + "post_attention_layernorm.weight"),
                        gate_up=cat_rows([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]),
                        gate_up_bias=None,
                        down=w(p + "mlp.down_proj.weight"),
                        down_bias=None,
                    )
                )
        self.embed = w("embed_tokens.weight")
        self.final_norm = w("norm.weight")
        dim = self.head_dim
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.rope = _DefaultRope(inv_freq)
        return self

    def _norm(self, x: Tensor, weight: Tensor) -> Tensor:
        # LlamaRMSNorm: statistics in fp32, normalised value back in the input dtype, then the weight.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * xf.to(x.dtype)

    def query_states(self, samples: Sequence[Sample]) -> Tensor:
        """Hidden states at the samples' query positions, in sample order: [P, d] (the backbone's dtype)."""
        return self._run(samples, len(self.layers), queries=True)

    def states_entering(self, samples: Sequence[Sample], k: int) -> Tensor:
        """The states entering layer k at every token, samples concatenated in order: [T, d] (the
        activation cache of top-K tuning; k = 0 gives the embeddings)."""
        if not 0 <= k <= len(self.layers):
            raise ValueError(f"layer {k} is not in 0..{len(self.layers)}")
        return self._run(samples, k, queries=False)

    def _run(self, samples: Sequence[Sample], stop: int, queries: bool) -> Tensor:
        """Layers 0..stop-1 on the packed tokens; with `queries`, all layers, the last one on the query
        rows only, and the final norm."""
        device = self.embed.device
        lengths = [len(s.tokens) for s in samples]
        ids = torch.tensor([t for s in samples for t in s.tokens], dtype=torch.long, device=device)
        pos = torch.cat([torch.arange(n, device=device) for n in lengths])  # [T], restarts per sample
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        x = F.embedding(ids, self.embed)  # [T, d]
        if stop == 0:
            return x
        rows = None
        if queries:
            rows = torch.tensor(
                [starts[k] + p for k, s in enumerate(samples) for p in s.query_pos],
                dtype=torch.long,
                device=device,
            )
        groups = attention_groups(lengths, starts, device)
        cos, sin = self.rope(x, pos[None])  # [1, T, hd] each, x's dtype
        cos, sin = cos[0, :, None, :], sin[0, :, None, :]  # [T, 1, hd]
        h, kv, hd = self.heads, self.kv_heads, self.head_dim
        for i, layer in enumerate(self.layers[:stop]):
            y = F.linear(self._norm(x, layer.norm1), layer.qkv, layer.qkv_bias)  # [T, (H + 2 KV) hd]
            q, k, v = y.split([h * hd, kv * hd, kv * hd], dim=-1)
            q = _rope(q.view(-1, h, hd), cos, sin)
            k = _rope(k.view(-1, kv, hd), cos, sin)
            att = self._attention(q, k, v.view(-1, kv, hd), groups)  # [T, H hd]
            if rows is not None and i == len(self.layers) - 1:  # only the query rows go on
                att, x = att[rows], x[rows]
            x = x + F.linear(att, layer.o, layer.o_bias)
            gu = F.linear(self._norm(x, layer.norm2), layer.gate_up, layer.gate_up_bias)
            gate, up = gu.chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down, layer.down_bias)
        return self._norm(x, self.final_norm) if queries else x

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, groups: list[_Group]) -> Tensor:
        """Causal attention per sample: packed [T, heads, hd] -> per group of similar lengths, padded
        [b, heads, L, hd] -> SDPA -> back to packed [T, H hd]."""
        gqa = self.kv_heads != self.heads
        out = q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
        for g in groups:
            if g.rows == 1:  # one sample: no padding at all
                qs, ks, vs = (t.narrow(0, g.start, g.width).transpose(0, 1)[None] for t in (q, k, v))
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
                out.narrow(0, g.start, g.width).copy_(o[0].transpose(0, 1).reshape(g.width, -1))
                continue

            def padded(t: Tensor, g: _Group = g) -> Tensor:
                buf = t.new_zeros(g.rows * g.width, t.shape[1], t.shape[2])
                buf.index_copy_(0, g.slot, t.index_select(0, g.tokens))
                return buf.view(g.rows, g.width, t.shape[1], t.shape[2]).transpose(1, 2)  # [b, heads, L, hd]

            o = F.scaled_dot_product_attention(
                padded(q), padded(k), padded(v), is_causal=True, enable_gqa=gqa
            )
            o = o.transpose(1, 2).reshape(g.rows * g.width, -1)
            out.index_copy_(
                0, g.tokens, o.index_select(0, g.slot).to(out.dtype)
            )  # autocast: SDPA may return bf16
        return out


@dataclass
class _Group:
    """Samples whose attention runs as one padded SDPA: their packed token indices and padded slots."""

    rows: int
    width: int
    start: int  # packed index of the first token (used when rows == 1)
    tokens: Tensor  # [t] packed indices of the group's tokens
    slot: Tensor  # [t] their places in the padded [rows * width] layout


def attention_groups(lengths: list[int], starts: list[int], device: Any, fill: float = 0.8) -> list[_Group]:
    """Samples by length, cut where a sample is under `fill` of its group's longest: padding in attention
    stays under 1 - fill of a group (attention is where the packed forward still pads)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    cut: list[list[int]] = []
    for i in order:
        if not cut or lengths[i] < fill * lengths[cut[-1][0]]:
            cut.append([])
        cut[-1].append(i)
    groups = []
    for members in cut:
        width = lengths[members[0]]
        tokens = torch.cat([torch.arange(starts[i], starts[i] + lengths[i], device=device) for i in members])
        slot = torch.cat([r * width + torch.arange(lengths[i], device=device) for r, i in enumerate(members)])
        groups.append(_Group(len(members), width, starts[members[0]], tokens, slot))
    return groups


class _DefaultRope:
    """transformers' LlamaRotaryEmbedding.forward for 'default' RoPE (attention scaling 1.0), op for op."""

    def __init__(self, inv_freq: Tensor):
        self.inv_freq = inv_freq

    def __call__(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * 1.0
        sin = emb.sin() * 1.0
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


class PackedST2SI:
    """The feature pass of an ST2SI module without an ILP, on a PackedLlama alone (inference only)."""

    def __init__(self, packed: PackedLlama):
        self.packed = packed

    def hidden_at(self, samples: Sequence[Sample]) -> Tensor:
        return self.packed.query_states(samples)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [T, heads, hd] rotated by the per-token angles (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _weights_version(backbone: nn.Module) -> int:
    return sum(p._version for p in backbone.parameters())


def packed_for(backbone: nn.Module, cache: dict[str, Any]) -> PackedLlama | None:
    """The PackedLlama of `backbone`, kept in `cache`; None where unsupported.

    Rebuilt when a weight changed in place since (pretraining steps bump the tensors' version counters).
    """
    if not supports(backbone):
        return None
    version = _weights_version(backbone)
    if cache.get("version") != version:
        cache["packed"], cache["version"] = PackedLlama(backbone), version
    return cache["packed"]


__all__ = ["PackedLlama", "PackedST2SI", "packed_for", "supports"]


def cat_rows(parts: list[Any]) -> Any:
    """torch.cat(parts) (2-D, along rows); a view without a copy where the parts already lie one after
    another in one storage (gate_proj and up_proj do in a safetensors file: its names are sorted)."""
    import torch

    first = parts[0]
    adjacent = all(p.is_contiguous() and p.dtype == first.dtype for p in parts)
    if adjacent:
        storage = first.untyped_storage().data_ptr()
        end = first.data_ptr() + first.nbytes
        for p in parts[1:]:
            if (
                p.untyped_storage().data_ptr() != storage
                or p.data_ptr() != end
                or p.shape[1:] != first.shape[1:]
            ):
                adjacent = False
                break
            end += p.nbytes
    if not adjacent:
        return torch.cat(parts)
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride())
