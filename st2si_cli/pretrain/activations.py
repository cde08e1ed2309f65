"""The activation cache of top-K tuning: the hidden states entering the first tuned layer, every token
of every sample, computed once and read back memory-mapped.

    samples --prefix_roots--> the ones no other sample starts with (a user's training input is a prefix
            of their validation input) --plan_batches--> batches --states_entering(k)-->
            shard-<n>.safetensors ("hidden" [T, d]); index: per sample (shard, first row, rows)
            --> one zoo artifact (kind "features", type "activations"): the shards + index.safetensors

Like the feature cache (`features/cache.py`): shards are written atomically into a staging folder as they
are done, so a killed pass resumes where it stopped; ranks share the shards round-robin; the artifact
is put into the zoo once, at the end, by rank 0. Reading opens each shard with `safe_open` (a memory
map) and slices one sample's rows at a time: the cache is never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from st2si_cli import __version__
from st2si_cli.errors import St2siError
from st2si_cli.model.fast import PackedLlama
from st2si_cli.model.layers import states_entering
from st2si_cli.model.samples import Sample, collate, plan_batches
from st2si_cli.pretrain import distributed as dist
from st2si_cli.zoo.artifact import write_safetensors_atomic
from st2si_cli.zoo.store import Artifact, Zoo, canonical_json

ACTIVATION_FORMAT = 3  # bump when the layout or what is cached changes
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class CachePlan:
    """What to cache and how: the run-independent inputs of the key, and the pass's batching."""

    identity: dict[str, Any]  # backbone, datasets, text settings, samples' definition (the key's inputs)
    first_layer: int  # k: the states entering layer k are cached
    dtype: str = "bf16"
    precision: str = "fp32"  # autocast of the pass
    batch_tokens: int = 16384
    max_batch: int = 64
    shard_tokens: int = 65536  # tokens per shard: the resume granularity
    packed: bool = False  # the pass runs packed (model/fast.py: Llama family, under bf16/fp16 autocast)
    on_shard: Callable[[int], None] | None = field(default=None, compare=False)  # after each shard (tests)

    def key(self) -> str:
        spec = {
            "format": ACTIVATION_FORMAT,
            **self.identity,
            "layer": self.first_layer,
            "dtype": self.dtype,
            "precision": self.precision,
        }
        if self.packed:  # the plain pass keeps the keys it had before the packed one existed
            spec["pass"] = "packed"
        return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def cache_name(key: str) -> str:
    return f"activations-{key[:16]}"


class ActivationCache:
    """Per-sample states [len(tokens), d], sliced from memory-mapped shards on demand."""

    def __init__(self, files: Sequence[Path], index: Tensor):
        from safetensors import safe_open

        self._handles = [safe_open(str(f), framework="pt") for f in files]  # kept open: the maps
        self._hidden = [h.get_slice("hidden") for h in self._handles]
        self.index = index.tolist()  # per sample: (shard, first row, rows)
        self.hidden_size = int(self._hidden[0].get_shape()[1]) if self._hidden else 0

    def __len__(self) -> int:
        return len(self.index)

    def get(self, i: int) -> Tensor:
        shard, start, n = self.index[i]
        return self._hidden[shard][start : start + n]

    def batch(self, ids: Sequence[int], device: Any) -> Tensor:
        """The samples' states right padded with zeros (never read: causal attention): [B, L, d] fp32."""
        rows = [self.get(i) for i in ids]
        out = torch.zeros(len(rows), max(r.shape[0] for r in rows), self.hidden_size)
        for b, r in enumerate(rows):
            out[b, : r.shape[0]] = r.float()
        return out.to(device)


def _shards(batches: list[list[int]], lengths: Sequence[int], shard_tokens: int) -> list[list[list[int]]]:
    """Runs of consecutive batches holding about `shard_tokens` tokens each."""
    shards: list[list[list[int]]] = []
    count = shard_tokens
    for b in batches:
        if count >= shard_tokens:
            shards.append([])
            count = 0
        shards[-1].append(b)
        count += sum(lengths[i] for i in b)
    return shards


def prefix_roots(samples: Sequence[Sample]) -> list[int]:
    """Per sample, the sample whose cached rows it reads: itself, or the longest sample of the same owner
    that starts with its tokens (attention is causal, so a prefix's states are the first rows of the
    longer sample's), the first of equal ones. A user's training and validation inputs are prefixes
    of their whole history's, and a repeated sample reads the first: each cached once."""
    by_owner: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_owner.setdefault(s.owner, []).append(i)
    roots = list(range(len(samples)))
    for group in by_owner.values():
        for i in group:
            n, tokens = len(samples[i].tokens), samples[i].tokens
            covers = [
                j for j in group if (len(samples[j].tokens) > n or j < i) and samples[j].tokens[:n] == tokens
            ]
            if covers:
                roots[i] = max(covers, key=lambda j: (len(samples[j].tokens), -j))
    return roots


def covers(readers: Sequence[Sample], stored: Sequence[Sample]) -> list[int | None]:
    """Per reader, the stored sample whose first rows are its states: the longest of the same owner
    that starts with its tokens (the first of equal ones); None where there is none."""
    by_owner: dict[int, list[int]] = {}
    for j, s in enumerate(stored):
        by_owner.setdefault(s.owner, []).append(j)
    out: list[int | None] = []
    for r in readers:
        n = len(r.tokens)
        covers = [j for j in by_owner.get(r.owner, []) if stored[j].tokens[:n] == r.tokens]
        out.append(max(covers, key=lambda j: (len(stored[j].tokens), -j)) if covers else None)
    return out


def covering(readers: Sequence[Sample], stored: Sequence[Sample]) -> list[int]:
    """`covers`, where a reader no stored sample covers is an error (the cache was made for other inputs)."""
    out = covers(readers, stored)
    if any(j is None for j in out):
        raise St2siError("a training or validation input is not in the activation cache: rerun to rebuild it")
    return [j for j in out if j is not None]


def with_uncovered(stored: Sequence[Sample], readers: Sequence[Sample]) -> list[Sample]:
    """`stored` and, after it, each reader none of them covers (once per distinct owner and tokens): a
    window of a long history that the newest window does not start with, for instance."""
    extra: dict[tuple[int, tuple[int, ...]], Sample] = {}
    for r, j in zip(readers, covers(readers, stored)):
        if j is None:
            extra.setdefault((r.owner, tuple(r.tokens)), r)
    return [*stored, *extra.values()]


def open_or_build(
    zoo: Zoo,
    backbone: torch.nn.Module,
    samples: Sequence[Sample],
    plan: CachePlan,
    info: dist.DistInfo,
    readers: Sequence[Sample] | None = None,
) -> tuple[Artifact, ActivationCache]:
    """The cache of `samples` (built, or resumed, if the zoo lacks it); every rank opens it.

    `backbone` is the frozen-below model on this rank's device; the pass runs without gradients. The
    cache is read through `readers` (default: `samples`): entry i holds reader i's states, the first
    rows of the stored sample that covers it (`covering`), so inputs that are prefixes of stored ones
    (training and validation inputs of a history, whatever the training flags) need no pass of their own.
    """
    key = plan.key()
    lengths = [len(s.tokens) for s in samples]
    art = zoo.find(cache_name(key), kind="features")
    if art is None:
        _build(zoo, backbone, samples, plan, info)
        art = zoo.get(cache_name(key), kind="features")
    index = load_index(zoo, art)
    if index[:, 2].tolist() != lengths:
        raise St2siError(
            f"the activation cache {art.short_id} does not match these samples: rerun to rebuild it"
        )
    if readers is not None:
        cover = covering(readers, samples)
        index = torch.tensor(
            [[index[j, 0], index[j, 1], len(r.tokens)] for j, r in zip(cover, readers)], dtype=torch.long
        ).reshape(-1, 3)
    files = [zoo.file(art, f"shard-{n:05d}.safetensors") for n in range(art.meta["shards"])]
    return art, ActivationCache(files, index)


def load_index(zoo: Zoo, art: Artifact) -> Tensor:
    from safetensors.torch import load_file

    return load_file(str(zoo.file(art, "index.safetensors")))["index"]


def _build(
    zoo: Zoo, backbone: torch.nn.Module, samples: Sequence[Sample], plan: CachePlan, info: dist.DistInfo
) -> None:
    """Rank r computes shards r, r+W, ...; a shard already staged (a killed pass) is kept; rank 0 stores."""
    key = plan.key()
    t0 = time.time()
    lengths = [len(s.tokens) for s in samples]
    parents = prefix_roots(samples)
    roots = [i for i, r in enumerate(parents) if r == i]  # only these are computed and stored
    batches = plan_batches([lengths[i] for i in roots], plan.batch_tokens, plan.max_batch)
    shards = _shards([[roots[j] for j in b] for b in batches], lengths, plan.shard_tokens)
    stage = zoo.root / "tmp" / cache_name(key)
    spec = {"key": key, "samples": hashlib.sha256(canonical_json([lengths, parents]).encode()).hexdigest()}
    spec.update(batch_tokens=plan.batch_tokens, max_batch=plan.max_batch, shard_tokens=plan.shard_tokens)
    if info.is_main:
        zoo.staging_dir(stage.name)
        spec_path = stage / "spec.json"
        if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
            for old in stage.glob("shard-*.safetensors"):  # shards of another plan cannot be reused
                old.unlink()
        spec_path.write_text(json.dumps(spec))
    dist.barrier(info)
    pad = 0
    computed = 0
    dtype = DTYPES[plan.dtype]
    device = next(backbone.parameters()).device
    fast = PackedLlama(backbone) if plan.packed else None
    with torch.no_grad():
        for n in range(info.rank, len(shards), info.world_size):
            path = stage / f"shard-{n:05d}.safetensors"
            if path.exists():
                continue
            rows: list[Tensor] = []
            for b in shards[n]:
                with dist.autocast(str(device), plan.precision):
                    if fast is not None:  # [T, d]: the batch's tokens, samples in order
                        h = fast.states_entering([samples[i] for i in b], plan.first_layer)
                        rows.append(h.to("cpu", dtype))
                    else:
                        batch = collate([samples[i] for i in b], pad, device)
                        h = states_entering(backbone, batch.input_ids, plan.first_layer)  # [B, L, d]
                        rows += [h[r, : lengths[i]].to("cpu", dtype) for r, i in enumerate(b)]
                computed += sum(lengths[i] for i in b)
            write_safetensors_atomic({"hidden": torch.cat(rows)}, path)
            if plan.on_shard is not None:
                plan.on_shard(n)
    dist.barrier(info)
    seconds = time.time() - t0
    computed = int(dist.all_sum(info, [computed])[0])
    if info.is_main:
        layout = (parents, shards, lengths)
        _store(zoo, stage, layout, plan, {"seconds": seconds, "tokens_computed": computed})
    dist.barrier(info)


def _store(zoo: Zoo, stage: Path, layout: tuple[Any, ...], plan: CachePlan, timing: dict[str, Any]) -> None:
    """The shards and the per-sample index as one artifact; the staging folder goes."""
    parents, shards, lengths = layout
    index = torch.zeros(len(parents), 3, dtype=torch.long)
    for n, shard in enumerate(shards):
        start = 0
        for b in shard:
            for i in b:
                index[i] = torch.tensor([n, start, lengths[i]])
                start += lengths[i]
    for i, p in enumerate(parents):
        if p != i:  # a prefix: the first rows of its root
            index[i] = torch.tensor([index[p, 0], index[p, 1], lengths[i]])
    write_safetensors_atomic({"index": index}, stage / "index.safetensors")
    files = {f"shard-{n:05d}.safetensors": stage / f"shard-{n:05d}.safetensors" for n in range(len(shards))}
    size = sum(p.stat().st_size for p in files.values())
    key = plan.key()
    seconds = timing["seconds"]
    meta = {
        "type": "activations",
        "key": key,
        "inputs": plan.identity,
        "layer": plan.first_layer,
        "dtype": plan.dtype,
        "precision": plan.precision,
        "pass": "packed" if plan.packed else "plain",
        "samples": len(parents),
        "tokens": sum(lengths),
        "tokens_stored": sum(lengths[i] for i, p in enumerate(parents) if p == i),
        "shards": len(shards),
        "bytes": size,
        "timings": {
            "seconds": round(seconds, 2),
            "tokens_computed": timing["tokens_computed"],
            "tokens_per_s": round(timing["tokens_computed"] / seconds, 1) if seconds > 0 else None,
        },
        "versions": {"st2si": __version__, "torch": torch.__version__},
    }
    files["index.safetensors"] = stage / "index.safetensors"
    zoo.put("features", files, meta, name=cache_name(key), identity={"key": key}, move=True)
    shutil.rmtree(stage, ignore_errors=True)


__all__ = [
    "ActivationCache",
    "CachePlan",
    "cache_name",
    "covering",
    "covers",
    "load_index",
    "open_or_build",
    "prefix_roots",
    "with_uncovered",
]
