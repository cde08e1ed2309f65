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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from st2si_cli.errors import St2siError
from st2si_cli.model.layers import FrozenBelowST2SI, TopST2SI, n_layers
from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.st2si import length_split_pays
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.activations import ActivationCache, CachePlan, cache_name, open_or_build
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
    samples = train + data.valid
    module.eval()
    plan = _plan(run, first, model)
    reused = run.zoo.find(cache_name(plan.key()), kind="features") is not None
    art, cache = open_or_build(run.zoo, model, samples, plan, info)
    run.activations = {
        "artifact": art.id,
        "layer": first,
        "bytes": art.meta["bytes"],
        "tokens": art.meta["tokens"],
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


def _plan(run: RunSetup, first: int, model: nn.Module) -> CachePlan:
    cfg = run.cfg
    identity = {
        "backbone": run.backbone.id,
        "datasets": [a.id for a in run.datasets],
        "text": run.text.to_dict(),
        "alignment": cfg.alignment,
        "samples": "train+valid",
    }
    return CachePlan(
        identity=identity,
        first_layer=first,
        dtype=cfg.cache_dtype,
        precision=run.precision,
        batch_tokens=cfg.eval_batch_tokens,
        max_batch=cfg.eval_max_batch,
        packed=packed_pass(model, run.precision),
    )


def packed_pass(model: nn.Module, precision: str) -> bool:
    """The activation pass runs packed for a Llama-family backbone under bf16/fp16 autocast (in fp32
    the plain forward runs, so the cache is exactly what full tuning's frozen layers compute)."""
    from st2si_cli.model.fast import supports

    return precision != "fp32" and supports(model)


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


def _valid_features(
    module: TopST2SI, batches: CachedBatches, valid: list[Sample], offset: int, precision: str
) -> Callable[[list[int]], Tensor]:
    """`features_of(indices)` for validation: the top layers on the cached states of the valid inputs."""

    def features_of(ids: list[int]) -> Tensor:
        hidden, input_ids, rows, cols, _ = batches(valid, ids, offset)
        with dist.autocast(str(module.device), precision):
            return module.top_states(hidden, input_ids, rows, cols)

    return features_of


__all__ = ["check_tune_layers", "top_module_and_data"]
