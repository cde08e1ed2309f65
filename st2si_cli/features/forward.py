"""The one batched forward of query features: samples through the ST2SI module (`hidden_at`), in
token-budget batches (`model.samples.plan_batches`), each sample's query features back on the CPU in
fp32. The feature cache, `recommend` and `items` all run their samples through it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from st2si_cli.model.samples import Sample, plan_batches

if TYPE_CHECKING:
    from st2si_cli.backbones.load import Backbone
    from st2si_cli.model.st2si import ST2SI


def query_features(model: ST2SI, samples: Sequence[Sample]) -> list[Any]:
    """Each sample's query features [q, d] (fp32, CPU) from one forward of the samples together."""
    h = model.hidden_at(samples).float().cpu()  # [P, d]
    return list(h.split([len(s.query_pos) for s in samples]))


def forward_batch(backbone: Backbone, samples: Sequence[Sample]) -> list[Any]:
    """`query_features` through a loaded backbone's ST2SI module (no ILP)."""
    return query_features(backbone.st2si(), samples)


def run_batches(
    model: ST2SI,
    samples: Sequence[Sample],
    batches: Sequence[Sequence[int]],
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, Sequence[int], Any]]:
    """For each batch from `start` to `stop` (default: the last): (its index, its sample indices, their
    query features [P, d] in sample order, fp32 on the CPU). The caller chooses the grad mode
    (inference_mode for caches)."""
    for j in range(start, len(batches) if stop is None else stop):
        batch = batches[j]
        yield j, batch, model.hidden_at([samples[i] for i in batch]).float().cpu()


def features_per_sample(
    model: ST2SI, samples: Sequence[Sample], batch_tokens: int = 16384, max_batch: int = 64
) -> list[Any]:
    """Each sample's query features [q, d], the samples run in batches of at most `batch_tokens` tokens
    and `max_batch` samples, under inference mode."""
    import torch

    out: list[Any] = [None] * len(samples)
    batches = plan_batches([len(s.tokens) for s in samples], batch_tokens, max_batch)
    with torch.inference_mode():
        for _, batch, h in run_batches(model, samples, batches):
            for i, f in zip(batch, h.split([len(samples[i].query_pos) for i in batch])):
                out[i] = f
    return out
