"""Text -> ID accuracy at catalog scale: ranked over a fixed sample of items past a cap (O(N^2) whole)."""

from __future__ import annotations

import torch

from st2si_cli.features.cache import FeatureSet
from st2si_cli.model.samples import ALIGN
from st2si_cli.train.head import alignment_accuracy


def feature_set(n: int, d: int = 64) -> tuple[torch.Tensor, FeatureSet]:
    feats = torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(1)), dim=1
    )
    weight = feats.clone()  # an item's own row scores highest for its text: accuracy 1
    weight[::3] = -weight[::3]  # except every third item, whose own row scores lowest
    roles = torch.full((n,), ALIGN, dtype=torch.int8)
    ids = torch.arange(n)
    return weight, FeatureSet(feats, ids, roles, ids, ids)


def test_alignment_accuracy_is_exact_under_the_cap_and_sampled_over_it():
    weight, fs = feature_set(300)
    whole = alignment_accuracy(weight, fs)
    assert whole["n_aligned"] == 300 and abs(whole["Acc@1"] - 200 / 300) < 1e-6
    sampled = alignment_accuracy(weight, fs, max_rows=120)
    assert sampled["n_aligned"] == 120
    assert abs(sampled["Acc@1"] - 2 / 3) < 0.15  # a sample of the same population
    assert alignment_accuracy(weight, fs, max_rows=120) == sampled  # fixed seed: the same sample
