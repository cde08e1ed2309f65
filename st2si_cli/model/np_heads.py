"""`recommend` without torch for the sequence-adapter heads (`adapter`, `sasrec`, `fusion`), in float32.

`np_forward.py` gives the backbone's query features; here they (or, for a head that reads no feature,
only their count) become scores, as the torch path computes them:

    `NumpyAdapter.score_histories` = `model/adapter.py::SequenceAdapter.score_histories` in eval mode:
    each history's newest min(rows, max_len) steps, left-aligned and right-padded; the input at a step is
    pos_emb(step) + LayerNorm(query_proj((feature - query_mean) / query_std)) (with use_text) +
    item_emb(ID) (with use_ids; an item outside the catalog has the unknown ID); then each
    `nn.TransformerEncoderLayer` (norm_first=True, GELU, dropout off): x + out_proj(attention(LN1(x)))
    with q|k|v from in_proj, heads of width hidden / heads, softmax(q k^T / sqrt(width) under the causal
    and the key padding masks) v, then x + linear2(GELU(linear1(LN2(x)))); final_norm; the last real
    step @ item_vectors().T. LayerNorms use torch's eps (1e-5) and biased variance, GELU is the exact
    (erf) one. In eval mode torch takes its fused encoder-layer kernel where it can
    (`torch._transformer_encoder_layer_fwd`: an even number of heads, no grad); that kernel computes the
    same math (masks merged into one additive mask), so the two differ by float rounding only. The last
    layer runs on each row's last real step alone (nothing later reads the other steps), as
    `NumpyLlama` does: with the causal mask a real step never reads padding, so this changes nothing.
    `NumpyFusion.score_histories` = `model/fusion.py::Fusion.score_histories`: w * log_softmax(the ILP's
    scores of the last query feature) + (1 - w) * the mean of each adapter's log_softmax, in float32;
    without an ILP the mean alone.
    `top_k` = `heads/base.py::batched_top_k`: 256 histories at a time, exclusions set to -inf, the k best
    per row, equal scores in catalog order (NaN first), as `model/scoring.py::best_k`.

The tensors are read from the head's safetensors file (`np_forward.read_safetensors`, no torch), the
settings from its meta (`train`, `d_feat`, `n_items`), as `heads/adapter.py` and `heads/fusion.py` load
theirs. `load_scorer` returns None for a head these cannot rebuild exactly (a setting or a tensor they do
not know, another shape): the torch path then answers, and says what is wrong. tests/test_np_heads.py
checks everything against torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from st2si_cli.model.fusion import ILP_TENSOR, fusion_parts
from st2si_cli.model.np_forward import best_k, read_safetensors

# `model/adapter.py::AdapterConfig`'s fields (that module imports torch; a test keeps the two equal). A
# recorded setting outside them is left to torch.
ADAPTER_FIELDS = frozenset(
    {
        "hidden",
        "layers",
        "heads",
        "dropout",
        "max_len",
        "lr",
        "weight_decay",
        "batch_size",
        "max_epochs",
        "patience",
        "seed",
        "use_ids",
        "use_text",
        "text_norm",
        "ties",
    }
)
LN_EPS = np.float32(1e-5)  # nn.LayerNorm's default eps, which every LayerNorm of the adapter keeps
BATCH = 256  # histories scored at once: `heads/base.py::batched_top_k`'s batch


# ---- exact GELU ------------------------------------------------------------------------------------------

_SQRT1_2 = 1.0 / math.sqrt(2.0)
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
_ERF_SERIES = 30  # Taylor terms for |z| < _ERF_CUT
_ERF_CUT = 2.0
_ERFC_DEPTH = 40  # continued-fraction depth for |z| >= _ERF_CUT
_ERF_COEF = [(-1) ** n / (math.factorial(n) * (2 * n + 1)) for n in range(_ERF_SERIES)]


def erf(z: np.ndarray) -> np.ndarray:
    """erf in float64 (numpy has none, and scipy is no dependency): the Maclaurin series below |z| = 2, the
    continued fraction of erfc above; within 1e-15 of `math.erf` (tests/test_np_heads.py)."""
    z = np.asarray(z, dtype=np.float64)
    a = np.abs(z)
    out = np.empty_like(a)
    small = a < _ERF_CUT
    zs = a[small]
    z2 = zs * zs
    acc = np.full_like(zs, _ERF_COEF[-1])
    for c in reversed(_ERF_COEF[:-1]):
        acc = acc * z2 + c
    out[small] = _TWO_OVER_SQRT_PI * zs * acc
    zl = a[~small]  # erfc(z) = exp(-z^2) / sqrt(pi) / (z + (1/2) / (z + 1 / (z + (3/2) / (z + ...))))
    k = zl.copy()
    for n in range(_ERFC_DEPTH, 0, -1):
        k = zl + (n / 2) / k
    with np.errstate(under="ignore"):
        out[~small] = 1.0 - np.exp(-zl * zl) / (math.sqrt(math.pi) * k)
    return np.copysign(out, z)  # erf is odd (NaN stays NaN)


def gelu(x: np.ndarray) -> np.ndarray:
    """`F.gelu(x)` (approximate='none'): x * 0.5 * (1 + erf(x / sqrt(2))), in float64, back to float32."""
    x64 = x.astype(np.float64)
    return (x64 * 0.5 * (1.0 + erf(x64 * _SQRT1_2))).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """nn.LayerNorm over the last axis in float32: (x - mean) / sqrt(biased var + eps) * weight + bias."""
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = np.mean(d * d, axis=-1, keepdims=True)
    return d * (np.float32(1.0) / np.sqrt(var + LN_EPS)) * weight + bias


def log_softmax(x: np.ndarray) -> np.ndarray:
    """torch.log_softmax(x, 1) of float32 rows: x - max - log(sum(exp(x - max)))."""
    s = x - x.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def _linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return x @ weight.T + bias


# ---- the adapter ---------------------------------------------------------------------------------------


@dataclass
class _EncoderLayer:
    in_w: np.ndarray  # [3H, H]: q | k | v
    in_b: np.ndarray
    out_w: np.ndarray
    out_b: np.ndarray
    lin1_w: np.ndarray  # [4H, H]
    lin1_b: np.ndarray
    lin2_w: np.ndarray  # [H, 4H]
    lin2_b: np.ndarray
    norm1_w: np.ndarray
    norm1_b: np.ndarray
    norm2_w: np.ndarray
    norm2_b: np.ndarray


class NumpyAdapter:
    """A stored `SequenceAdapter` (eval mode) in numpy: `score_histories` as the torch module's."""

    def __init__(self, tensors: Mapping[str, np.ndarray], cfg: Mapping[str, Any], d_feat: int, n_items: int):
        """From the adapter's state dict (float32 arrays) and its recorded `AdapterConfig.to_dict()`.

        KeyError: a tensor, or a setting, that `model/adapter.py::load_adapter` would not take the same way
        (the caller leaves the head to torch)."""
        if set(cfg) - ADAPTER_FIELDS:
            raise KeyError(f"adapter settings unknown here: {sorted(set(cfg) - ADAPTER_FIELDS)}")
        self.use_text = bool(cfg["use_text"])
        self.use_ids = bool(cfg["use_ids"])
        text_norm = bool(cfg.get("text_norm", False))  # load_adapter: adapters stored before it had none
        self.hidden, self.heads = int(cfg["hidden"]), int(cfg["heads"])
        self.max_len, n_layers = int(cfg["max_len"]), int(cfg["layers"])
        self.d_feat, self.n_items = d_feat, n_items
        if not (self.use_ids or self.use_text) or self.hidden % self.heads:
            raise KeyError("not an adapter torch builds")

        def t(name: str, *shape: int) -> np.ndarray:
            a = np.asarray(tensors[name], dtype=np.float32)
            if a.shape != shape:
                raise KeyError(f"{name} has shape {a.shape}, not {shape}")
            return a

        h, d, n = self.hidden, d_feat, n_items
        expected = {"item_text", "text_mean", "text_std", "query_mean", "query_std", "pos_emb.weight"}
        expected |= {"final_norm.weight", "final_norm.bias"}
        self.pos_emb = t("pos_emb.weight", self.max_len, h)
        self.final_norm = (t("final_norm.weight", h), t("final_norm.bias", h))
        for name in ("text_mean", "text_std", "query_mean", "query_std"):  # shapes load_state_dict checks
            t(name, d)
        t("item_text", n if self.use_text else 0, d)
        items = np.zeros((n, h), np.float32)
        if self.use_text:
            names = ["query_proj.weight", "query_proj.bias", "query_norm.weight", "query_norm.bias"]
            names += ["item_proj.weight", "item_proj.bias"]
            names += ["item_norm.weight", "item_norm.bias"] if text_norm else []
            expected |= set(names)
            self.query_mean, self.query_std = t("query_mean", d), t("query_std", d)
            self.query_proj = (t("query_proj.weight", h, d), t("query_proj.bias", h))
            self.query_norm = (t("query_norm.weight", h), t("query_norm.bias", h))
            # item_vectors(): item_norm(item_proj((item_text - text_mean) / text_std)) (+ the ID embedding)
            text = (t("item_text", n, d) - t("text_mean", d)) / t("text_std", d)
            items = _linear(text, t("item_proj.weight", h, d), t("item_proj.bias", h))
            if text_norm:
                items = layer_norm(items, t("item_norm.weight", h), t("item_norm.bias", h))
        if self.use_ids:
            expected.add("item_emb.weight")
            self.item_emb = t("item_emb.weight", n + 1, h)  # row n: unknown / padding
            items = items + self.item_emb[:n] if self.use_text else self.item_emb[:n].copy()
        self.item_vectors = np.ascontiguousarray(items.T)  # [H, N]: item_vectors().T, computed once
        self.layers = []
        for i in range(n_layers):
            p = f"encoder.layers.{i}."
            names = [
                "self_attn.in_proj_weight",
                "self_attn.in_proj_bias",
                "self_attn.out_proj.weight",
                "self_attn.out_proj.bias",
                "linear1.weight",
                "linear1.bias",
                "linear2.weight",
                "linear2.bias",
                "norm1.weight",
                "norm1.bias",
                "norm2.weight",
                "norm2.bias",
            ]
            expected |= {p + x for x in names}
            shapes = [(3 * h, h), (3 * h,), (h, h), (h,), (4 * h, h), (4 * h,), (h, 4 * h), (h,)]
            shapes += [(h,)] * 4
            self.layers.append(_EncoderLayer(*(t(p + x, *s) for x, s in zip(names, shapes))))
        if set(tensors) != expected:  # load_state_dict is strict
            raise KeyError(f"tensors {sorted(set(tensors) ^ expected)} differ from the adapter's")

    @property
    def reads_features(self) -> bool:
        """Whether the scores read the query features' values (else only their count)."""
        return self.use_text

    def score_histories(
        self, feats: Sequence[np.ndarray], catalog_ids: Sequence[Sequence[int | None]]
    ) -> np.ndarray:
        """Scores [B, N] float32 of histories given as their query features [rows, d] (newest window; any
        width where the adapter reads no text) and catalog IDs (None: an item outside the catalog)."""
        n = self.n_items
        lengths = np.array([min(len(f), self.max_len) for f in feats], dtype=np.int64)
        if len(lengths) and int(lengths.min()) < 1:
            raise ValueError("every row needs at least one step")
        b, t = len(feats), int(lengths.max()) if len(lengths) else 0
        ids = np.full((b, t), n, dtype=np.int64)
        x = np.zeros((b, t, self.d_feat), np.float32) if self.use_text else None
        for r, (f, cids) in enumerate(zip(feats, catalog_ids)):
            m = int(lengths[r])
            if x is not None:
                x[r, :m] = f[-m:]
            window = [n if c is None else c for c in cids[len(cids) - len(f) :]]
            ids[r, :m] = window[-m:]
        return self._last_hidden(x, ids, lengths) @ self.item_vectors

    def _last_hidden(self, feats: np.ndarray | None, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """final_norm of the encoder's output at each row's last real step, [B, H]."""
        b, t = ids.shape
        x = np.broadcast_to(self.pos_emb[:t][None], (b, t, self.hidden))
        if feats is not None:
            q = (feats - self.query_mean) / self.query_std
            x = x + layer_norm(_linear(q, *self.query_proj), *self.query_norm)
        if self.use_ids:
            x = x + self.item_emb[ids]
        x = np.ascontiguousarray(x, dtype=np.float32)
        steps = np.arange(t)
        # allowed[b, query, key]: key <= query (causal) and key a real step (key padding)
        allowed = (steps[None, None, :] <= steps[None, :, None]) & (
            steps[None, None, :] < lengths[:, None, None]
        )
        rows, last = np.arange(b), lengths - 1
        for i, layer in enumerate(self.layers):
            xn = layer_norm(x, layer.norm1_w, layer.norm1_b)
            if i == len(self.layers) - 1:  # only each row's last real step goes on
                x = x[rows, last][:, None]  # [B, 1, H]
                x = x + self._attention(layer, xn[rows, last][:, None], xn, allowed[rows, last][:, None])
            else:
                x = x + self._attention(layer, xn, xn, allowed)
            ff = gelu(_linear(layer_norm(x, layer.norm2_w, layer.norm2_b), layer.lin1_w, layer.lin1_b))
            x = x + _linear(ff, layer.lin2_w, layer.lin2_b)
        if not self.layers:
            x = x[rows, last][:, None]
        return layer_norm(x[:, 0], *self.final_norm)

    def _attention(
        self, layer: _EncoderLayer, xq: np.ndarray, xkv: np.ndarray, allowed: np.ndarray
    ) -> np.ndarray:
        """nn.MultiheadAttention (batch_first, need_weights=False): xq [B, Q, H] over xkv [B, T, H] where
        `allowed` [B, Q, T] -> [B, Q, H]."""
        h, nh = self.hidden, self.heads
        hd = h // nh
        b, nq, nk = xq.shape[0], xq.shape[1], xkv.shape[1]
        w, bias = layer.in_w, layer.in_b
        q = _linear(xq, w[:h], bias[:h]).reshape(b, nq, nh, hd).transpose(0, 2, 1, 3)  # [B, nh, Q, hd]
        k = _linear(xkv, w[h : 2 * h], bias[h : 2 * h]).reshape(b, nk, nh, hd).transpose(0, 2, 3, 1)
        v = _linear(xkv, w[2 * h :], bias[2 * h :]).reshape(b, nk, nh, hd).transpose(0, 2, 1, 3)
        s = np.matmul(q, k) * np.float32(1.0 / math.sqrt(hd))  # [B, nh, Q, T]
        s = np.where(allowed[:, None], s, np.float32(-np.inf))
        s -= s.max(axis=-1, keepdims=True)  # every query row allows its own step: no row is all -inf
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        o = np.matmul(s, v).transpose(0, 2, 1, 3).reshape(b, nq, h)
        return _linear(o, layer.out_w, layer.out_b)


# ---- the fusion ----------------------------------------------------------------------------------------


class NumpyFusion:
    """A stored `Fusion` in numpy: `score_histories` as `model/fusion.py::Fusion.score_histories`."""

    def __init__(self, ilp_weight: np.ndarray | None, adapters: list[NumpyAdapter], w: float):
        self.ilp_weight, self.adapters, self.w = ilp_weight, adapters, w

    @property
    def reads_features(self) -> bool:
        return self.ilp_weight is not None or any(a.reads_features for a in self.adapters)

    def score_histories(
        self, feats: Sequence[np.ndarray], catalog_ids: Sequence[Sequence[int | None]]
    ) -> np.ndarray:
        parts = [log_softmax(a.score_histories(feats, catalog_ids)) for a in self.adapters]
        adapters = parts[0] if len(parts) == 1 else np.mean(np.stack(parts), axis=0, dtype=np.float32)
        if self.ilp_weight is None:
            return adapters
        ilp = np.stack([np.asarray(f[-1], np.float32) for f in feats]) @ self.ilp_weight.T
        return np.float32(self.w) * log_softmax(ilp) + np.float32(1 - self.w) * adapters


ADAPTER_KINDS = ("adapter", "sasrec")  # heads whose scorer is one SequenceAdapter
KINDS = (*ADAPTER_KINDS, "fusion")  # the head kinds `load_scorer` rebuilds


def load_scorer(
    path: Path, kind: str, train: Mapping[str, Any] | None, d_feat: int, n_items: int
) -> NumpyAdapter | NumpyFusion | None:
    """The numpy scorer of an adapter, sasrec or fusion head from its head.safetensors and meta (the
    `train` settings, `d_feat`, `n_items`), as `heads/adapter.py` / `heads/fusion.py` `load` rebuild the
    torch one; None where it cannot be rebuilt exactly here (the torch path answers, or says why not)."""
    if kind not in KINDS:
        return None
    train = train or {}
    try:
        tensors = {k: v.float32() for k, v in read_safetensors(path).items()}
        if kind in ADAPTER_KINDS:
            return NumpyAdapter(tensors, train, d_feat, n_items)
        adapters = [NumpyAdapter(part, cfg, d_feat, n_items) for part, cfg in fusion_parts(tensors, train)]
        ilp = tensors.get(ILP_TENSOR)
        if ilp is not None and ilp.shape != (n_items, d_feat):
            return None
        return NumpyFusion(ilp, adapters, float(train["w"]))
    except (KeyError, TypeError, ValueError):  # a dtype, tensor or setting outside what torch stores
        return None


# ---- top-k ---------------------------------------------------------------------------------------------


def top_k(
    scorer: NumpyAdapter | NumpyFusion,
    feats: Sequence[np.ndarray],
    catalog_ids: Sequence[Sequence[int | None]],
    k: int,
    exclude: Sequence[Sequence[int]] | None,
    batch: int = BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """`heads/base.py::batched_top_k` of a numpy scorer: (scores float32, catalog indices int64)
    [B, min(k, N)], excluded items at -inf (a row with fewer than k items left ends in -inf entries)."""
    out_s, out_i = [], []
    for b0 in range(0, len(feats), batch):
        scores = scorer.score_histories(feats[b0 : b0 + batch], catalog_ids[b0 : b0 + batch])
        if exclude is not None:
            for r, items in enumerate(exclude[b0 : b0 + batch]):
                if items:
                    scores[r, list(items)] = -np.inf
        s, i = best_k(scores, k)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(out_s), np.concatenate(out_i)


__all__ = [
    "ADAPTER_FIELDS",
    "KINDS",
    "NumpyAdapter",
    "NumpyFusion",
    "erf",
    "gelu",
    "layer_norm",
    "load_scorer",
    "log_softmax",
    "top_k",
]
