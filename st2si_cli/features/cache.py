"""Samples and features: one forward pass per user yields every query position's hidden state.

Attention is causal, so over a user's history without its test item, the query after item j sees
items 1..j only: the last query predicts the test item, the one before it the validation item, and
the rest are training positions, all from one pass without leakage. With the backbone frozen in eval
mode these features are fixed, so they are computed once and cached in the zoo (in shards, so a killed
run resumes), and head training becomes epochs over a matrix. The hidden states come from the ST2SI
module's `hidden_at` (`model/st2si.py`), as in every other path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from st2si_cli import __version__
from st2si_cli.data.dataset import Dataset
from st2si_cli.features.forward import query_features
from st2si_cli.features.ranks import barrier, gather, split_blocks, world
from st2si_cli.features.shards import (
    finish_on_ranks,
    missing_runs,
    read_shards,
    resume_shards,
    run_shards,
)
from st2si_cli.model.samples import Sample, build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.zoo.artifact import Artifact, canonical_json, write_safetensors_atomic
from st2si_cli.zoo.store import Zoo

if TYPE_CHECKING:
    from st2si_cli.backbones.load import Backbone

FEATURE_FORMAT = 2  # bump when the layout or the sample definition changes


@dataclass
class FeatureSet:
    """Query-position features of a dataset, flattened over samples.

    feats:   [P, d] float32, hidden state at each query position
    targets: [P] long, the item each position predicts
    roles:   [P] int8, TRAIN / VALID / TEST / ALIGN
    owner:   [P] long, user index (history rows) or item index (alignment rows)
    sample:  [P] long, index of the sample the row came from
    """

    feats: Any
    targets: Any
    roles: Any
    owner: Any
    sample: Any

    def rows(self, role: int) -> Any:
        import torch

        return torch.nonzero(self.roles == role).flatten()

    def tensors(self) -> dict[str, Any]:
        return {
            "feats": self.feats,
            "targets": self.targets,
            "roles": self.roles,
            "owner": self.owner,
            "sample": self.sample,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, Any]) -> FeatureSet:
        return cls(t["feats"].float(), t["targets"].long(), t["roles"], t["owner"].long(), t["sample"].long())


def index_rows(samples: Sequence[Sample]) -> FeatureSet:
    """The FeatureSet layout (all but the features themselves) in sample order."""
    import torch

    targets, roles, owner, sample = [], [], [], []
    for k, s in enumerate(samples):
        targets += s.targets
        roles += s.roles
        owner += [s.owner] * len(s.targets)
        sample += [k] * len(s.targets)
    return FeatureSet(
        feats=None,
        targets=torch.tensor(targets, dtype=torch.long),
        roles=torch.tensor(roles, dtype=torch.int8),
        owner=torch.tensor(owner, dtype=torch.long),
        sample=torch.tensor(sample, dtype=torch.long),
    )


def cache_key(backbone_id: str, dataset_id: str, text: TextConfig, dtype: str, alignment: bool = True) -> str:
    spec = {
        "format": FEATURE_FORMAT,
        "backbone": backbone_id,
        "dataset": dataset_id,
        "text": text.to_dict(),
        "dtype": dtype,
        "alignment": alignment,
    }
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def cache_name(key: str) -> str:
    return f"features-{key[:16]}"


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def compute_features(
    zoo: Zoo, backbone: Backbone, ds: Dataset, dataset_id: str, text: TextConfig, **options: Any
) -> tuple[Artifact, FeatureSet]:
    """The feature cache for (backbone, dataset, text settings): loaded if present, else computed
    (`_compute_features`, whose keyword arguments `options` are). The work is claimed with a lock
    file: a second process with the same key waits for the first, then reuses its finished cache.

    Under `torchrun --nproc_per_node N` every rank calls it: each computes its block of the pass into
    the shared staging folder, rank 0 stores the cache, and every rank gets it back."""
    alignment = options.get("alignment", True)
    key = cache_key(backbone.artifact_id, dataset_id, text, dtype_name(backbone.dtype), alignment)
    rank, size = world()
    if size == 1:
        existing = zoo.find(cache_name(key), kind="features")
        if existing is not None:
            return existing, load_feature_set(zoo, existing)
        with zoo.claim(cache_name(key)):
            return _compute_features(zoo, backbone, ds, dataset_id, text, **options)
    # The lock under torchrun. The claim is an exclusive flock of one process: were every rank to take
    # it, rank 1 would block on the lock rank 0 holds while rank 0 waits for rank 1 at a meeting, for
    # ever. So rank 0 alone takes it, for the whole job, before the first meeting (in `_compute_features`,
    # where it tells the others whether the cache exists), and releases it once the cache is stored and
    # every rank has met for the last time: no rank ever waits on the lock while another waits for it
    # at a meeting, and no rank writes a shard before rank 0 owns the staging folder. Another process
    # with the same key (a second job) still waits for the claim, and `zoo prune` sees the folder in use.
    # Rank 0 waiting for such a process holds the others at the first meeting: hence the group's long
    # timeout (`ranks.GROUP_TIMEOUT`).
    with zoo.claim(cache_name(key)) if rank == 0 else contextlib.nullcontext():
        return _compute_features(zoo, backbone, ds, dataset_id, text, **options)


def _compute_features(
    zoo: Zoo,
    backbone: Backbone,
    ds: Dataset,
    dataset_id: str,
    text: TextConfig,
    *,
    alignment: bool = True,
    batch_tokens: int = 16384,
    max_batch: int = 64,
    shard_seconds: float = 120.0,
    on_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> tuple[Artifact, FeatureSet]:
    """The feature cache for (backbone, dataset, text settings): loaded if present, else computed.

    Work is written in shards under the zoo's tmp/ folder as it goes, one per `shard_seconds` of
    compute; a rerun after a kill skips the batches the shards already hold. The finished cache is
    one artifact (kind "features").
    `on_start(total_tokens, total_samples)` and `on_progress(tokens, samples)` drive a progress bar.

    Under torchrun (WORLD_SIZE > 1; rank 0 holds the claim, see `compute_features`) the batch plan is
    split into one contiguous block per rank of about equal padded tokens (`ranks.split_blocks`); each
    rank computes the batches of its block that no shard holds yet, into shards of the same staging
    folder named as in one process. After a meeting rank 0 reads the other blocks' shards and stores
    the cache (the same file and ID as one process's; its meta adds "ranks"), then tells the others
    its ID and they load it. On a rank the progress callbacks count its own block.
    """
    import torch

    key = cache_key(backbone.artifact_id, dataset_id, text, dtype_name(backbone.dtype), alignment)
    rank, size = world()
    existing = zoo.find(cache_name(key), kind="features") if rank == 0 else None
    if size > 1:  # rank 0 holds the claim: its answer is every rank's
        existing_id = gather(existing.id if existing is not None else None)[0]
        if existing_id is not None and existing is None:
            existing = zoo.get(existing_id, kind="features")
    if existing is not None:
        return existing, load_feature_set(zoo, existing)

    t0 = time.time()
    model = backbone.st2si()
    itok = ItemTokenizer.create(backbone.tokenizer, text)
    item_tokens = itok.encode_items(ds.items)
    if text.positions not in ("all", "newest"):
        raise ValueError(f"positions must be all or newest, not {text.positions!r}")
    samples = build_samples(
        ds, itok, item_tokens, alignment=alignment, every_position=text.positions == "all"
    )
    lengths = [len(s.tokens) for s in samples]
    batches = plan_batches(lengths, batch_tokens, max_batch)
    stage = zoo.staging_dir(cache_name(key))
    spec = {
        "key": key,
        "n_samples": len(samples),
        "batch_tokens": batch_tokens,
        "max_batch": max_batch,
    }
    spec_path = stage / "spec.json"
    if rank == 0:
        if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
            for old in stage.glob("shard-*.safetensors"):  # shards of another plan cannot be reused
                old.unlink()
        spec_path.write_text(json.dumps(spec))
    if size > 1:
        barrier()  # the shards of another plan are gone before any rank reads or writes one

    total_tokens = sum(lengths)
    lo, hi = split_blocks([len(b) * lengths[b[0]] for b in batches], size)[rank]
    if on_start:
        mine = batches[lo:hi]
        on_start(sum(lengths[i] for b in mine for i in b), sum(len(b) for b in mine))
    # Features land in one [P, d] matrix in sample order (no per-sample tensors: a million-item
    # catalog has a million alignment samples); plan_rows maps batches to its rows.
    first_row = torch.zeros(len(samples) + 1, dtype=torch.long)
    first_row[1:] = torch.tensor([len(s.query_pos) for s in samples], dtype=torch.long).cumsum(0)
    store: dict[int, Any] = {}

    def matrix(d: int) -> Any:  # allocated at the first result: its width is the backbone's output width
        if 0 not in store:
            with torch.inference_mode(False):  # a plain tensor: head training indexes it under autograd
                store[0] = torch.zeros(int(first_row[-1]), d)
        return store[0]

    if size == 1:  # one process: the shards continue one another from batch 0
        done = resume_shards(stage, batches, first_row, matrix)
        runs = [(done, len(batches))]
    else:  # a rank: its block's batches that no shard holds, wherever they are
        runs = missing_runs(read_shards(stage, batches, first_row, matrix, within=(lo, hi)))
    held = [b for j, b in enumerate(batches[lo:hi], lo) if not any(a <= j < e for a, e in runs)]
    if on_progress and held:
        on_progress(sum(lengths[i] for b in held for i in b), sum(len(b) for b in held))
    computed_tokens = 0
    for start, stop in runs:
        computed_tokens += run_shards(
            model,
            samples,
            batches,
            start,
            stop,
            first_row,
            matrix,
            stage,
            backbone.dtype,
            shard_seconds,
            on_progress,
        )

    def store_cache(computed_tokens: int) -> tuple[Artifact, FeatureSet]:
        seconds = time.time() - t0
        fs = index_rows(samples)
        fs.feats = matrix(backbone.hidden_size)
        out = stage / "features.safetensors"
        stored = fs.tensors()
        stored["feats"] = fs.feats.to(backbone.dtype)  # bf16 features are exact in bf16
        write_safetensors_atomic(stored, out)
        meta = {
            "key": key,
            "inputs": {"backbone": backbone.artifact_id, "dataset": dataset_id},
            "text": text.to_dict(),
            "dtype": dtype_name(backbone.dtype),
            "alignment": alignment,
            "positions": int(fs.targets.numel()),
            "samples": len(samples),
            "hidden": int(fs.feats.shape[1]),
            "timings": {
                "seconds": round(seconds, 2),
                "tokens": total_tokens,
                "tokens_computed": computed_tokens,
                "tokens_per_s": round(computed_tokens / seconds, 1) if seconds > 0 else None,
                "batches": len(batches),
                "padded_tokens": sum(len(b) * lengths[b[0]] for b in batches),
            },
            "versions": {"st2si": __version__, "torch": torch.__version__},
        }
        if size > 1:  # the meta, not the identity: the ID is the one a single process stores
            meta["ranks"] = size
        origin = getattr(model, "origin", None)  # an activation cache's reader, not a whole pass
        if origin:  # (features/from_activations.py)
            meta["origin"] = origin
        art = zoo.put(
            "features",
            {"features.safetensors": out},
            meta,
            name=cache_name(key),
            identity={"key": key},
            move=True,
        )
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        return art, fs

    if size == 1:
        return store_cache(computed_tokens)

    def read_the_rest() -> list[int]:  # the blocks after rank 0's (it holds its own)
        return read_shards(stage, batches, first_row, matrix, within=(hi, len(batches)))

    if rank != 0:
        store.clear()  # a worker's features are in its shards now; it loads the stored cache instead

    def load_cache(art_id: str) -> tuple[Artifact, FeatureSet]:
        art = zoo.get(art_id, kind="features")
        return art, load_feature_set(zoo, art)

    return finish_on_ranks(rank, computed_tokens, read_the_rest, store_cache, load_cache, stage)


def load_feature_set(zoo: Zoo, art: Artifact) -> FeatureSet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from st2si_cli.zoo.decoding import decoding

    path = zoo.file(art, "features.safetensors")
    with decoding(art, "features.safetensors", (SafetensorError, RuntimeError)):
        return FeatureSet.from_tensors(load_file(str(path)))


class LiveFeatures:
    """`features_of(rows)` that runs the backbone on the rows' samples: ILP tuning with the backbone in
    the loop (the authors' way).

    With the backbone frozen (no autograd), a sample's features are kept until `new_epoch()` (pass it
    as train_head's `on_epoch`), so each history runs once per epoch, as in the authors' loop; with
    autograd through a training backbone every call runs its samples. In eval mode it returns what
    the cache holds, which the exactness test relies on. `samples_run` counts the forwards per sample.
    """

    def __init__(self, backbone: Backbone, samples: Sequence[Sample], fs: FeatureSet, max_batch: int = 64):
        import torch

        self.backbone, self.samples, self.fs, self.max_batch = backbone, samples, fs, max_batch
        self.first_row = torch.zeros(len(samples) + 1, dtype=torch.long)
        self.first_row[1:] = torch.tensor([len(s.targets) for s in samples]).cumsum(0)
        self.kept: dict[int, Any] = {}
        self.samples_run = 0

    def new_epoch(self, record: Any = None) -> None:
        self.kept.clear()

    def __call__(self, rows: Any) -> Any:
        import torch

        model = self.backbone.st2si()
        sample_ids = self.fs.sample[rows]
        grad = torch.is_grad_enabled() and self.backbone.model.training
        kept = {} if grad else self.kept
        missing = sorted(set(sample_ids.tolist()) - kept.keys())
        with torch.set_grad_enabled(grad):
            for b0 in range(0, len(missing), self.max_batch):
                ids = missing[b0 : b0 + self.max_batch]
                kept.update(zip(ids, query_features(model, [self.samples[i] for i in ids])))
        self.samples_run += len(missing)
        return torch.stack([kept[int(s)][int(r - self.first_row[s])] for r, s in zip(rows, sample_ids)])


def live_features(
    backbone: Backbone, samples: Sequence[Sample], fs: FeatureSet, max_batch: int = 64
) -> LiveFeatures:
    """A `LiveFeatures` over `samples` (rows of `fs`)."""
    return LiveFeatures(backbone, samples, fs, max_batch)
