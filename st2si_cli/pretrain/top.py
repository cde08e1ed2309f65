"""Top-K tuning (`st2si pretrain --tune-layers K`): layers L-K..L-1, the final norm and the ILP are tuned,
everything below is frozen.

    frozen below k = L-K --once--> activation cache: states entering layer k, every token of every
                                   training sample and validation input (activations.py)
    each step:  cached states [B, L, d] --layers k.., norm--> query states --ILP--> loss   (TopST2SI)

The training samples are full tuning's (`epoch_samples`: every training position of each history,
the alignment samples), batched and shuffled the same way, so top-K tuning gives the weights that
full tuning gives with the bottom frozen (tests/test_top_layers.py checks it). With
`activation_cache=False` (needed by `--sampling crop`, whose inputs change every epoch) the frozen
layers run at every step instead. The stored result is a whole backbone plus heads, as full tuning's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from st2si_cli.errors import St2siError
from st2si_cli.model.layers import FrozenBelowST2SI, TopST2SI, n_layers
from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.st2si import length_split_pays
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.activations import (
    ActivationCache,
    CachePlan,
    cache_name,
    open_or_build,
    with_uncovered,
)
from st2si_cli.pretrain.config import RunSetup
from st2si_cli.pretrain.corpus import Corpus, epoch_samples
from st2si_cli.pretrain.loop import TrainData, full_data


def backbone_layers(run: RunSetup) -> int:
    """The source backbone's decoder layer count, from its config (no weights loaded)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(run.zoo.view(run.backbone))
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise St2siError(f"{run.backbone.name or run.backbone.short_id}: no num_hidden_layers in its config")
    return int(n)


def check_tune_layers(run: RunSetup) -> int:
    """The K to tune: 0 (all layers) stays 0, K = L is full tuning (0); more than L is an error."""
    k = run.cfg.tune_layers
    if not k:
        return 0
    total = backbone_layers(run)
    if k > total:
        raise St2siError(
            f"--tune-layers {k}: {run.backbone.name or run.backbone.short_id} has {total} layers"
        )
    return 0 if k == total else k


def top_module_and_data(run: RunSetup, corpus: Corpus, model: nn.Module) -> tuple[nn.Module, TrainData]:
    """The frozen-below module on the run's device and the data the loop feeds it (cache built if needed)."""
    cfg, info = run.cfg, run.info
    first = n_layers(model) - cfg.tune_layers
    kind = TopST2SI if cfg.activation_cache else FrozenBelowST2SI
    module = kind(
        model,
        corpus.n_items,
        first,
        pad_id=corpus.pad_id,
        seed=cfg.seed,
        split_by_length=length_split_pays(info.device),
    )
    module.to(info.device)
    data = full_data(run, corpus, corpus.pad_id)
    if not cfg.activation_cache:
        return module, data
    train = epoch_samples(corpus, cfg, 1)  # sampling "all": the same samples every epoch
    module.eval()
    readers = _readers(train, data.valid, corpus)
    plan, stored = _plan(run, first, model, readers, corpus)
    reused = run.zoo.find(cache_name(plan.key()), kind="features") is not None
    art, cache = open_or_build(run.zoo, model, stored, plan, info, readers)
    run.activations = {
        "artifact": art.id,
        "layer": first,
        "bytes": art.meta["bytes"],
        "tokens": sum(len(s.tokens) for s in readers),  # read from it: training, validation, evaluation
        "tokens_stored": art.meta["tokens_stored"],
        "seconds": art.meta["timings"]["seconds"],
        "dtype": art.meta["dtype"],
        "reused": reused,
    }
    batches = CachedBatches(cache, corpus.pad_id, info.device)
    return module, TrainData(
        samples=lambda epoch: train,
        batch=batches,
        valid=data.valid,
        valid_features=_valid_features(module, batches, data.valid, len(train), run.precision),
    )


def _readers(train: list[Sample], valid: list[Sample], corpus: Corpus) -> list[Sample]:
    """What reads the cache, in this order: the training samples, the validation inputs and the final
    evaluation's inputs. The cache stores the last (each history whole, then the alignment samples)
    and any input none of them starts with (an earlier window of a history longer than one);
    training and validation inputs are otherwise prefixes of a history's whole input, and the
    alignment samples repeat the evaluation ones, so every training setting (alignment or not, every
    query or the last) reads the same cache."""
    return train + valid + corpus.eval_samples


def _plan(
    run: RunSetup, first: int, model: nn.Module, readers: list[Sample], corpus: Corpus
) -> tuple[CachePlan, list[Sample]]:
    """The cache's plan and what it stores: every history whole, every alignment sample, and the readers
    none of those starts with. The key holds a digest of the stored samples (owner and length each),
    so inputs that would store something else get a cache of their own."""
    cfg = run.cfg
    stored = with_uncovered(corpus.eval_samples, readers)
    digest = hashlib.sha256(json.dumps([[s.owner, len(s.tokens)] for s in stored]).encode()).hexdigest()
    identity = {
        "backbone": run.backbone.id,
        "datasets": [a.id for a in run.datasets],
        "text": run.text.to_dict(),
        "samples": "eval+uncovered",
        "stored": digest[:32],
    }
    plan = CachePlan(
        identity=identity,
        first_layer=first,
        dtype=cfg.cache_dtype,
        precision=run.precision,
        batch_tokens=cfg.eval_batch_tokens,
        max_batch=cfg.eval_max_batch,
        packed=packed_pass(model),
    )
    return plan, stored


def packed_pass(model: nn.Module) -> bool:
    """The activation pass runs packed for a Llama-family backbone (`model/fast.py`: no padding, fused
    weights), under bf16/fp16 autocast or in fp32; in fp32 it agrees with the plain forward within fp32
    rounding (tests/test_fast_forward.py), and it is the forward `st2si eval` runs. Other backbones run
    the plain forward."""
    from st2si_cli.model.fast import supports

    return supports(model)


@dataclass
class CachedBatches:
    """TopST2SI's inputs, (cached states, input_ids, query rows, query cols, targets), for some samples;
    sample i of `samples` is entry `offset + i` of the cache."""

    cache: ActivationCache
    pad_id: int
    device: str

    def __call__(self, samples: Sequence[Sample], ids: list[int], offset: int = 0) -> tuple[Any, ...]:
        batch = collate([samples[i] for i in ids], self.pad_id, self.device)
        return (self.cache.batch([offset + i for i in ids], self.device), *batch)


def cached_final_features(
    run: RunSetup, corpus: Corpus, best: dict[str, Tensor]
) -> tuple[nn.Module, Callable[[list[int]], Tensor]] | None:
    """For top-K tuning on an fp32 activation cache: (the best weights as a TopST2SI, `features_of(indices
    into corpus.eval_samples)` from the cache through the top K layers), so the final evaluation needs
    no pass through the frozen layers. The states entering layer L-K are then exactly what the whole
    forward computes, and so are the metrics. None (the whole forward runs) for a bf16 cache, whose
    rounding `st2si eval` does not have, or when the cache is gone."""
    from st2si_cli.pretrain.weights import load_trainable

    cfg = run.cfg
    if not (cfg.tune_layers and cfg.activation_cache and cfg.cache_dtype == "fp32"):
        return None
    model, _ = load_trainable(run.zoo, run.backbone, run.text.query)
    first = n_layers(model) - cfg.tune_layers
    train = epoch_samples(corpus, cfg, 1)
    valid = full_data(run, corpus, corpus.pad_id).valid
    readers = _readers(train, valid, corpus)
    plan, stored = _plan(run, first, model, readers, corpus)
    if run.zoo.find(cache_name(plan.key()), kind="features") is None:
        return None
    module = TopST2SI(
        model, corpus.n_items, first, pad_id=corpus.pad_id, split_by_length=length_split_pays(run.info.device)
    )
    module.load_state_dict(best)
    module.to(run.info.device).eval()
    _art, cache = open_or_build(run.zoo, model, stored, plan, run.info, readers)
    batches = CachedBatches(cache, corpus.pad_id, run.info.device)
    return module, _valid_features(
        module, batches, corpus.eval_samples, len(train) + len(valid), run.precision
    )


def _valid_features(
    module: TopST2SI, batches: CachedBatches, valid: list[Sample], offset: int, precision: str
) -> Callable[[list[int]], Tensor]:
    """`features_of(indices)`: the top layers on the cached states of `valid` (the validation inputs, or
    the final evaluation's), entry `offset + i` of the cache for sample i."""

    def features_of(ids: list[int]) -> Tensor:
        hidden, input_ids, rows, cols, _ = batches(valid, ids, offset)
        with dist.autocast(str(module.device), precision):
            return module.top_states(hidden, input_ids, rows, cols)

    return features_of


__all__ = ["cached_final_features", "check_tune_layers", "top_module_and_data"]
