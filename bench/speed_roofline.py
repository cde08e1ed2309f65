"""The speed benchmark's arithmetic: interleaved rounds and the ratios of their medians and minima, the
backbone's geometry and FLOPs per token, and one round of GEMMs over the backbone's own linear shapes (the
roofline a forward pass is measured against)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import log

# ---- interleaved timing ----------------------------------------------------------------------------------------


def interleave(rounds: int, steps: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Run every step once per round, in order (A B C A B C ...); each returns its seconds."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in steps.items():
            log(f"round {r + 1}/{rounds}: {name}")
            times[name].append(step())
    return times


def ratio(num: list[float], den: list[float], numerator: str, denominator: str) -> dict[str, Any]:
    """num / den from the medians and from the minima of interleaved rounds (seconds or rates alike)."""
    return {
        "median": statistics.median(num) / statistics.median(den),
        "min": min(num) / min(den),
        "numerator": numerator,
        "denominator": denominator,
        "numerator_rounds": [round(x, 4) for x in num],
        "denominator_rounds": [round(x, 4) for x in den],
    }


def stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "rounds": [round(x, 4) for x in xs]}


# ---- matmul roofline -----------------------------------------------------------------------------------------


def linear_shapes(model: Any) -> list[tuple[int, int, int]]:
    """Distinct (in, out) shapes of the backbone's nn.Linear layers with their counts."""
    import torch

    counts: dict[tuple[int, int], int] = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            key = (mod.in_features, mod.out_features)
            counts[key] = counts.get(key, 0) + 1
    return [(k, n, c) for (k, n), c in sorted(counts.items())]


def model_geometry(model: Any) -> dict[str, Any]:
    import torch

    cfg = model.config
    embedding = sum(
        p.numel()
        for mod in model.modules()
        if isinstance(mod, torch.nn.Embedding)
        for p in mod.parameters(recurse=False)
    )
    total = sum(p.numel() for p in model.parameters())
    hidden = int(getattr(cfg, "hidden_size", 0) or cfg.d_model)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return {
        "family": cfg.model_type,
        "hidden": hidden,
        "layers": int(cfg.num_hidden_layers),
        "heads": heads,
        "kv_heads": int(getattr(cfg, "num_key_value_heads", heads) or heads),
        "head_dim": head_dim,
        "parameters": int(total),
        "embedding_parameters": int(embedding),
        "non_embedding_parameters": int(total - embedding),
    }


def flops_per_token(geo: dict[str, Any], lengths: list[int]) -> dict[str, float]:
    """2 x non-embedding params + causal attention FLOPs, averaged over the real tokens of `lengths`."""
    linear = 2.0 * geo["non_embedding_parameters"]
    d_attn = geo["heads"] * geo["head_dim"]
    # Token at position p (1-based) attends to p keys: QK^T and AV are 2 x p x d_attn MACs = 4 p d_attn FLOPs.
    attn_total = sum(4.0 * d_attn * geo["layers"] * n * (n + 1) / 2 for n in lengths)
    attention = attn_total / max(1, sum(lengths))
    return {"linear": linear, "attention": attention, "total": linear + attention}


def gemm_round(shapes: list[tuple[int, int, int]], m: int, dtype: Any) -> Any:
    """A step timing one round of F.linear over the model's shapes; `.flops` is the round's FLOPs."""
    import torch
    import torch.nn.functional as F

    xs = {k: torch.randn(m, k, dtype=dtype) for k, _, _ in shapes}
    ws = [(torch.randn(n, k, dtype=dtype) * 0.02, k, c) for k, n, c in shapes]

    def step() -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            for w, k, c in ws:
                for _ in range(c):
                    F.linear(xs[k], w)
            return time.perf_counter() - t0

    step()  # warm-up (oneDNN primitive creation)
    step.flops = sum(2.0 * m * k * w.shape[0] * c for w, k, c in ws)  # type: ignore[attr-defined]
    return step
