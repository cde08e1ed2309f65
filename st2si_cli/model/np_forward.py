"""`recommend` without torch: the packed Llama forward and the ILP top-k in numpy, for inference in float32.

`import torch` alone takes longer than a whole answer of a small backbone on the CPU, so `recommend`
answers with these where it can (`st2si_cli/recommend.py::RecommendModel` says when: an ILP head, or an
adapter, sasrec or fusion head, whose scores `model/np_heads.py` computes from these features; a folder
the fast loader takes, the CPU, float32; a head that reads no feature skips the forward altogether).
Everything mirrors the torch path op for op, in float32:

    `NumpyLlama.query_states` = `model/fast.py::PackedLlama.query_states`: embedding rows; per layer
    RMSNorm (statistics in float32), q|k|v, RoPE with the 'default' tables computed as `_DefaultRope`
    computes them, causal attention per sample (GQA: query head h reads key/value head h // (H / KV)),
    o_proj, RMSNorm, SiLU(gate) * up, down; the last layer on the query rows only; the final norm.
    `ilp_top_k` = `model/scoring.py::top_k`: scores = hidden @ W.T per catalog chunk, exclusions set
    to -inf, the k best per row, equal scores in catalog order (as in torch).

The weights are read-only numpy views of a memory map of the safetensors file(s) (nothing is read
until used, nothing is copied); BF16 and F16 weights are widened to float32 once at load (exactly, as
`tensor.to(torch.float32)` does), the embedding row by row when looked up. Results equal the torch
path's up to float32 rounding (BLAS summation order, the last bit of exp/cos/pow), not bit for bit
(tests/test_np_forward.py).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from st2si_cli.backbones.fast_load import read_safetensors_header
from st2si_cli.model.samples import Sample, plan_batches

ITEM_CHUNK = 65536  # model.scoring.ITEM_CHUNK (that module imports torch; a test keeps them equal)

# safetensors dtype -> how the bytes are viewed (BF16 as its raw 16 bits); any other dtype: KeyError
_NP_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


@dataclass(frozen=True)
class Stored:
    """One tensor of a safetensors file as stored: a read-only view of the file's memory map."""

    dtype: str  # F32 | F16 | BF16
    data: np.ndarray  # float32, float16, or uint16 holding bfloat16 bits

    def float32(self, rows: Any = None) -> np.ndarray:
        """The tensor (or `rows` of it) in float32: a view for F32 (unless rows are taken), else a copy."""
        a = self.data if rows is None else self.data[rows]
        if self.dtype == "BF16":  # bf16 is the upper half of a float32: widen exactly
            return np.left_shift(a.astype(np.uint32), 16).view(np.float32)
        return a if a.dtype == np.float32 else a.astype(np.float32)


def read_safetensors(path: Path) -> dict[str, Stored]:
    """Every tensor of a safetensors file, memory-mapped read-only (shared with the page cache).

    KeyError for a dtype other than F32, F16, BF16 (the caller then leaves the file to torch)."""
    with open(path, "rb") as f:
        header, base = read_safetensors_header(f)
        size = f.seek(0, 2)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    out: dict[str, Stored] = {}
    for name, info in header.items():
        dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        if hi == lo:
            data = np.empty(shape, dtype=dtype)
        else:  # np.frombuffer takes any offset (a misaligned view is slower, still right)
            data = np.frombuffer(mm, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=base + lo)
            data = data.reshape(shape)
        out[name] = Stored(info["dtype"], data)
    return out


@dataclass
class _Layer:
    norm1: np.ndarray
    q: np.ndarray  # [H hd, d]
    k: np.ndarray  # [KV hd, d]
    v: np.ndarray
    o: np.ndarray  # [d, H hd]
    norm2: np.ndarray
    gate: np.ndarray  # [I, d]
    up: np.ndarray
    down: np.ndarray  # [d, I]


class NumpyLlama:
    """A Llama base model's weights (float32) and its packed inference forward in numpy."""

    def __init__(self, cfg: dict[str, Any], weights: dict[str, Stored], rope_theta: float):
        """From a base model's tensors (names without the `model.` prefix) and its config.json, as
        `PackedLlama.from_weights` builds its own. KeyError: a weight is missing."""
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // self.heads)
        self.eps = float(cfg["rms_norm_eps"])
        if self.heads % self.kv_heads:
            raise KeyError("num_key_value_heads does not divide num_attention_heads")

        def w(name: str) -> np.ndarray:
            return weights[name].float32()

        self.layers = []
        for i in range(int(cfg["num_hidden_layers"])):
            p = f"layers.{i}."
            self.layers.append(
                _Layer(
                    norm1=w(p + "input_layernorm.weight"),
                    q=w(p + "self_attn.q_proj.weight"),
                    k=w(p + "self_attn.k_proj.weight"),
                    v=w(p + "self_attn.v_proj.weight"),
                    o=w(p + "self_attn.o_proj.weight"),
                    norm2=w(p + "post_attention_layernorm.weight"),
                    gate=w(p + "mlp.gate_proj.weight"),
                    up=w(p + "mlp.up_proj.weight"),
                    down=w(p + "mlp.down_proj.weight"),
                )
            )
        self.embed = weights["embed_tokens.weight"]  # widened row by row when looked up
        self.final_norm = w("norm.weight")
        self.hidden_size = int(self.embed.data.shape[1])
        dim = self.head_dim
        # _DefaultRope's inv_freq, op for op in float32: 1.0 / (theta ** (arange(0, dim, 2) / dim))
        expo = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        self.inv_freq = np.float32(1.0) / (np.float32(rope_theta) ** expo)

    @classmethod
    def from_files(cls, cfg: dict[str, Any], files: Sequence[Path], rope_theta: float) -> NumpyLlama:
        weights: dict[str, Stored] = {}
        for path in files:
            weights.update(read_safetensors(path))
        if any(k.startswith("model.") for k in weights):
            weights = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
        return cls(cfg, weights, rope_theta)

    def _norm(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        # LlamaRMSNorm in float32: x * rsqrt(mean(x^2) + eps), then the weight
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return weight * (x * (np.float32(1.0) / np.sqrt(ms + np.float32(self.eps))))

    def _rope_tables(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [n, hd] at `positions`, as _DefaultRope: freqs = pos * inv_freq, cat(freqs, freqs)."""
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return np.cos(emb), np.sin(emb)

    def query_states(self, samples: Sequence[Sample]) -> np.ndarray:
        """Hidden states at the samples' query positions, in sample order: [P, d] float32."""
        lengths = [len(s.tokens) for s in samples]
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids = np.fromiter((t for s in samples for t in s.tokens), dtype=np.int64, count=sum(lengths))
        pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])  # restarts per sample
        qpos = [np.asarray(s.query_pos, dtype=np.int64) for s in samples]
        rows = np.concatenate([starts[j] + qpos[j] for j in range(len(samples))])
        x = self.embed.float32(ids)  # [T, d]
        cos, sin = self._rope_tables(pos)
        h, kv, hd = self.heads, self.kv_heads, self.head_dim
        last = len(self.layers) - 1
        with np.errstate(over="ignore"):  # exp overflow in SiLU gives the right limit (x / inf = -0)
            for i, layer in enumerate(self.layers):
                xn = self._norm(x, layer.norm1)
                k = _rope((xn @ layer.k.T).reshape(-1, kv, hd), cos, sin)
                v = (xn @ layer.v.T).reshape(-1, kv, hd)
                if i == last:  # only the query rows go on: their queries alone are needed
                    q = _rope((xn[rows] @ layer.q.T).reshape(-1, h, hd), cos[rows], sin[rows])
                    att = self._attention(q, k, v, starts, lengths, qpos)
                    x = x[rows]
                else:
                    q = _rope((xn @ layer.q.T).reshape(-1, h, hd), cos, sin)
                    att = self._attention(q, k, v, starts, lengths, None)
                x = x + att @ layer.o.T
                xn = self._norm(x, layer.norm2)
                gate = xn @ layer.gate.T
                x = x + ((gate / (np.float32(1.0) + np.exp(-gate))) * (xn @ layer.up.T)) @ layer.down.T
        return self._norm(x, self.final_norm)

    def _attention(
        self,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        starts: np.ndarray,
        lengths: list[int],
        qpos: list[np.ndarray] | None,
    ) -> np.ndarray:
        """Causal attention of each sample's queries over its own keys: q [Q, H, hd] (every token, or with
        `qpos` the samples' query positions in order), k, v [T, KV, hd] -> [Q, H hd]."""
        h, kv, hd = self.heads, self.kv_heads, self.head_dim
        g = h // kv
        scale = np.float32(1.0 / math.sqrt(hd))
        out = np.empty((q.shape[0], h * hd), dtype=np.float32)
        r0 = 0
        for j, (start, n) in enumerate(zip(starts.tolist(), lengths)):
            at = np.arange(n) if qpos is None else qpos[j]
            m = len(at)
            qs = q[r0 : r0 + m].reshape(m, kv, g, hd).transpose(1, 2, 0, 3)  # [KV, G, m, hd]
            ks = k[start : start + n].transpose(1, 2, 0)[:, None]  # [KV, 1, hd, n]
            vs = v[start : start + n].transpose(1, 0, 2)[:, None]  # [KV, 1, n, hd]
            s = np.matmul(np.ascontiguousarray(qs), np.ascontiguousarray(ks)) * scale  # [KV, G, m, n]
            s[..., np.arange(n)[None, :] > at[:, None]] = -np.inf  # causal: key position <= query position
            s -= s.max(axis=-1, keepdims=True)
            np.exp(s, out=s)
            s /= s.sum(axis=-1, keepdims=True)
            o = np.matmul(s, np.ascontiguousarray(vs))  # [KV, G, m, hd]
            out[r0 : r0 + m] = o.transpose(2, 0, 1, 3).reshape(m, h * hd)
            r0 += m
        return out


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [T, heads, hd] rotated by the per-token angles (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def features_per_sample(
    model: NumpyLlama, samples: Sequence[Sample], batch_tokens: int = 16384, max_batch: int = 64
) -> list[np.ndarray]:
    """Each sample's query features [q, d] (float32), in the batches `features/forward.py` makes.

    A batch of at most ONE_THREAD_TOKENS tokens runs its GEMMs on one BLAS thread (see there)."""
    out: list[Any] = [None] * len(samples)
    for batch in plan_batches([len(s.tokens) for s in samples], batch_tokens, max_batch):
        small = sum(len(samples[i].tokens) for i in batch) <= ONE_THREAD_TOKENS
        with one_blas_thread(small):
            h = model.query_states([samples[i] for i in batch])
        cuts = np.cumsum([len(samples[i].query_pos) for i in batch])[:-1]
        for i, f in zip(batch, np.split(h, cuts)):
            out[i] = f
    return out


# A forward of this few tokens runs on one BLAS thread: its ~7 GEMMs per layer are thin (bound by reading
# the weights), so a second thread gains little, and where another process keeps a core busy every one
# of those few hundred calls waits for the descheduled thread (measured on 2 busy cores: a one-history
# answer of SmolLM2-135M in 0.2 s on one thread, 1.2-2.7 s on two). Larger batches keep the default.
ONE_THREAD_TOKENS = 256


@contextmanager
def one_blas_thread(active: bool = True) -> Iterator[None]:
    """numpy's OpenBLAS on one thread inside the block (restored after); nothing where `active` is false,
    where OPENBLAS_NUM_THREADS / OMP_NUM_THREADS set the count, or where no OpenBLAS is found."""
    api = _openblas_threads() if active else None
    if api is None:
        yield
        return
    get, put = api
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


_OPENBLAS: list[Any] = []  # [(get, set) or None], found once


def _openblas_threads() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get, set) of the thread count of the OpenBLAS loaded in this process (numpy's first), Linux only."""
    if os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS"):
        return None
    if not _OPENBLAS:
        _OPENBLAS.append(_find_openblas())
    return _OPENBLAS[0]


def _find_openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = {line.split(None, 5)[-1].strip() for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    numpy_libs = str(Path(np.__file__).resolve().parent) + ".libs"  # where a numpy wheel keeps its OpenBLAS
    for path in sorted((p for p in paths if p.startswith("/")), key=lambda p: not p.startswith(numpy_libs)):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("openblas", "64_"), ("openblas", "")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                get.restype, get.argtypes = ctypes.c_int, []
                put.restype, put.argtypes = None, [ctypes.c_int]
                return get, put
    return None


def read_ilp_weight(path: Path) -> np.ndarray | None:
    """The ILP weight [N, d] of a head's safetensors file in float32; None where it holds no such tensor."""
    try:
        stored = read_safetensors(path).get("weight")
    except KeyError:
        return None
    if stored is None or stored.data.ndim != 2:
        return None
    return stored.float32()


# ---- top-k ----------------------------------------------------------------------------------------------


def _best_first(v: np.ndarray) -> np.ndarray:
    """Positions of each row of v [B, n] best first: NaN first (as torch sorts), then by value, equal
    values in position order (`model/scoring.py::top_k` orders them the same way)."""
    nan = np.isnan(v)
    return np.lexsort((-np.where(nan, 0.0, v), ~nan), axis=-1)


def best_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`model/scoring.py::best_k` in numpy: (values, positions) [B, min(k, n)] of the k best of each row,
    best first, equal values in position order, NaN first. Only the values at or above a row's k-th
    largest are sorted (all of them, ties at the k-th included), so the order is the full sort's."""
    rows, n = scores.shape
    k = min(k, n)
    pos = np.empty((rows, k), np.int64)
    for r in range(rows):
        row = scores[r]
        if k == 0:
            continue
        if k == n or np.isnan(row).any():
            cand = np.arange(n)
        else:
            kth = -np.partition(-row, k - 1)[k - 1]  # the k-th largest value
            cand = np.flatnonzero(row >= kth)  # in position order
        pos[r] = cand[_best_first(row[cand][None])[0][:k]]
    return np.take_along_axis(scores, pos, axis=1), pos


def ilp_top_k(
    weight: np.ndarray,
    hidden: np.ndarray,
    k: int,
    *,
    exclude: Sequence[Sequence[int]] | None = None,
    item_chunk: int = ITEM_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """`model/scoring.py::top_k` in numpy: (scores float32, catalog indices int64) [B, min(k, N)], best
    first, equal scores in catalog order; excluded items score -inf (with fewer than k items left a row
    ends in -inf entries)."""
    n_items, rows = int(weight.shape[0]), int(hidden.shape[0])
    k = min(k, n_items)
    if k <= 0 or rows == 0:
        return np.zeros((rows, max(k, 0)), np.float32), np.zeros((rows, max(k, 0)), np.int64)
    h = np.asarray(hidden, dtype=np.float32)
    best_v = np.empty((rows, 0), np.float32)
    best_i = np.empty((rows, 0), np.int64)
    for c0 in range(0, n_items, item_chunk):
        c1 = min(n_items, c0 + item_chunk)
        s = h @ weight[c0:c1].T  # [B, c] float32
        if exclude is not None:
            for r, items in enumerate(exclude):
                cols = [j - c0 for j in items if c0 <= j < c1]
                if cols:
                    s[r, cols] = -np.inf
        # the kept ones (lower catalog indices) first: position order is catalog order among equals
        v = np.concatenate([best_v, s], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(np.arange(c0, c1), s.shape)], axis=1)
        best_v, order = best_k(v, k)
        best_i = np.take_along_axis(i, order, axis=1)
    return best_v, best_i


__all__ = [
    "best_k",
    "ITEM_CHUNK",
    "NumpyLlama",
    "ONE_THREAD_TOKENS",
    "Stored",
    "features_per_sample",
    "ilp_top_k",
    "one_blas_thread",
    "read_ilp_weight",
    "read_safetensors",
]
