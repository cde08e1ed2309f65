"""Samples and features: one forward pass per user yields every query position's hidden state.

Attention is causal, so over a user's history without its test item, the query after item j sees
items 1..j only: the last query predicts the test item, the one before it the validation item, and
the rest are training positions, all from one pass without leakage. With the backbone frozen in eval
mode these features are fixed, so they are computed once and cached in the zoo (in shards, so a killed
run resumes), and head training becomes epochs over a matrix. The hidden states come from the ST2SI
module's `hidden_at` (`model/st2si.py`), as in every other path.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from st2si_cli import __version__
from st2si_cli.data.dataset import Dataset
from st2si_cli.model.samples import Sample, build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.zoo.artifact import Artifact, canonical_json, write_safetensors_atomic
from st2si_cli.zoo.store import Zoo

if TYPE_CHECKING:
    from st2si_cli.backbones import Backbone
    from st2si_cli.model.st2si import ST2SI

FEATURE_FORMAT = 2  # bump when the layout or the sample definition changes


def query_features(model: ST2SI, samples: Sequence[Sample]) -> list[Any]:
    """Each sample's query features [q, d] (fp32, CPU) from one forward of the samples together."""
    h = model.hidden_at(samples).float().cpu()  # [P, d]
    return list(h.split([len(s.query_pos) for s in samples]))


def forward_batch(backbone: Backbone, samples: Sequence[Sample]) -> list[Any]:
    """`query_features` through a loaded backbone's ST2SI module (no ILP)."""
    return query_features(backbone.st2si(), samples)


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
    file: a second process with the same key waits for the first, then reuses its finished cache."""
    alignment = options.get("alignment", True)
    key = cache_key(backbone.artifact_id, dataset_id, text, dtype_name(backbone.dtype), alignment)
    existing = zoo.find(cache_name(key), kind="features")
    if existing is not None:
        return existing, load_feature_set(zoo, existing)
    with zoo.claim(cache_name(key)):
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
    shard_samples: int = 1024,
    on_progress: Callable[[int, int], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> tuple[Artifact, FeatureSet]:
    """The feature cache for (backbone, dataset, text settings): loaded if present, else computed.

    Work is written in shards under the zoo's tmp/ folder as it goes; a rerun after a kill skips
    the shards already written. The finished cache is one artifact (kind "features").
    `on_start(total_tokens, total_samples)` and `on_progress(tokens, samples)` drive a progress bar.
    """
    import torch
    from safetensors.torch import load_file

    key = cache_key(backbone.artifact_id, dataset_id, text, dtype_name(backbone.dtype), alignment)
    existing = zoo.find(cache_name(key), kind="features")
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
        "shard_samples": shard_samples,
    }
    spec_path = stage / "spec.json"
    if spec_path.exists() and json.loads(spec_path.read_text()) != spec:
        for old in stage.glob("shard-*.safetensors"):  # shards of another plan cannot be reused
            old.unlink()
    spec_path.write_text(json.dumps(spec))

    # Shards are runs of consecutive batches in plan order; each holds the features of its samples.
    shards: list[list[list[int]]] = []
    count = 0
    for b in batches:
        if not shards or count >= shard_samples:
            shards.append([])
            count = 0
        shards[-1].append(b)
        count += len(b)

    total_tokens = sum(lengths)
    if on_start:
        on_start(total_tokens, len(samples))
    computed_tokens = 0
    per_sample: dict[int, Any] = {}
    with torch.inference_mode():
        for k, shard in enumerate(shards):
            path = stage / f"shard-{k:05d}.safetensors"
            members = [i for b in shard for i in b]
            if path.exists():
                loaded = load_file(str(path))
                feats = loaded["feats"]
                offsets = loaded["offsets"].tolist()
                for j, i in enumerate(members):
                    per_sample[i] = feats[offsets[j] : offsets[j + 1]]
                if on_progress:
                    on_progress(sum(lengths[i] for i in members), len(members))
                continue
            shard_feats: list[Any] = []
            for b in shard:
                outs = query_features(model, [samples[i] for i in b])
                for i, f in zip(b, outs):
                    per_sample[i] = f
                    shard_feats.append(f)
                btok = sum(lengths[i] for i in b)
                computed_tokens += btok
                if on_progress:
                    on_progress(btok, len(b))
            sizes = [per_sample[i].shape[0] for i in members]
            offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.long)
            write_safetensors_atomic(
                {"feats": torch.cat(shard_feats).to(backbone.dtype), "offsets": offsets}, path
            )

    seconds = time.time() - t0
    fs = index_rows(samples)
    fs.feats = torch.cat([per_sample[i] for i in range(len(samples))]).float()
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


def load_feature_set(zoo: Zoo, art: Artifact) -> FeatureSet:
    from safetensors.torch import load_file

    return FeatureSet.from_tensors(load_file(str(zoo.file(art, "features.safetensors"))))


def live_features(
    backbone: Backbone, samples: Sequence[Sample], fs: FeatureSet, max_batch: int = 64
) -> Callable[[Any], Any]:
    """`features_of(rows)` that runs the backbone on the rows' samples at every call.

    This is ILP tuning with the backbone in the loop (the authors' way). With the backbone in eval
    mode it returns what the cache holds, which the exactness test relies on.
    """
    import torch

    model = backbone.st2si()
    first_row = torch.zeros(len(samples) + 1, dtype=torch.long)
    first_row[1:] = torch.tensor([len(s.targets) for s in samples]).cumsum(0)

    def features_of(rows: Any) -> Any:
        sample_ids = fs.sample[rows]
        unique = sorted(set(sample_ids.tolist()))
        where = {s: k for k, s in enumerate(unique)}
        grad = torch.is_grad_enabled() and backbone.model.training
        outs: list[Any] = []
        with torch.set_grad_enabled(grad):
            for b0 in range(0, len(unique), max_batch):
                outs += query_features(model, [samples[i] for i in unique[b0 : b0 + max_batch]])
        return torch.stack([outs[where[int(s)]][int(r - first_row[s])] for r, s in zip(rows, sample_ids)])

    return features_of
