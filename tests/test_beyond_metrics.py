"""Beyond-accuracy metrics (`st2si_cli.metrics.beyond`): equal to RecBole's own metric classes on the same top-k
lists, computed from the lists every head kind gives (`st2si_cli.heads.top_lists`), and carried by `eval --json`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from helpers import build_zoo, quick_adapter, quick_head, run_cli, synthetic_dataset

from st2si_cli.adapt import evaluate
from st2si_cli.features.cache import load_feature_set
from st2si_cli.heads.fusion import fuse_heads
from st2si_cli.heads.registry import user_ranks
from st2si_cli.heads.top_lists import user_top_k
from st2si_cli.metrics.beyond import NAMES, beyond_accuracy, tail_items, training_popularity
from st2si_cli.model.samples import TEST, VALID
from st2si_cli.model.scoring import top_k
from st2si_cli.zoo.meta import Inputs

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """A zoo with the synthetic domain "toy" and three heads on one feature cache: ILP, adapter, fusion."""
    zoo = build_zoo(tmp_path_factory.mktemp("beyond") / "zoo", {"toy": synthetic_dataset()})
    ilp = quick_head(zoo, "toy", name="toy/ilp")
    ad = quick_adapter(zoo, "toy", name="toy/ad", max_epochs=2)
    fused = fuse_heads(zoo, ilp, [ad], name="toy/fused")
    fs = load_feature_set(zoo, zoo.get(Inputs.of(ilp).first("features"), kind="features"))
    return zoo, {"ilp": ilp, "adapter": ad, "fusion": fused}, fs


def recbole_metrics(top: np.ndarray, counts: Counter, n_items: int, ks, tail_ratio=0.1) -> dict:
    """RecBole 1.2.1's own metric classes on `top`, fed the way its evaluator feeds them."""
    metrics = pytest.importorskip("recbole.evaluator.metrics")
    from recbole.evaluator.collector import DataStruct

    config = {"topk": list(ks), "metric_decimal_place": 12, "tail_ratio": tail_ratio}
    data = DataStruct()
    data.set("rec.items", torch.as_tensor(top))
    data.set("data.num_items", n_items)
    data.set("data.count_items", counts)
    out = {}
    for name in NAMES:
        cls = getattr(metrics, name)
        for key, value in cls(config).calculate_metric(data).items():
            metric, k = key.split("@")
            out[f"{next(n for n in NAMES if n.lower() == metric)}@{k}"] = value
    return out


def assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-10), key


@pytest.mark.parametrize("tail_ratio", [0.1, 0.3, 3])
def test_equal_to_recbole_on_random_lists(tail_ratio):
    rng = np.random.default_rng(7)
    n_items, n_users = 60, 45
    # Skewed lists (a few items everywhere), and items with no training interaction.
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.2
    weights /= weights.sum()
    top = np.stack([rng.choice(n_items, size=12, replace=False, p=weights) for _ in range(n_users)])
    pop = rng.poisson(3.0, size=n_items) * (rng.random(n_items) > 0.2)
    counts = Counter({i: int(c) for i, c in enumerate(pop) if c})  # RecBole's item counter: seen items only
    ours = beyond_accuracy(top, pop, (1, 5, 10, 12), n_items=n_items, tail_ratio=tail_ratio)
    assert_same(ours, recbole_metrics(top, counts, n_items, (1, 5, 10, 12), tail_ratio))


def test_hand_computed_values():
    top = np.array([[0, 1], [0, 1], [0, 2]])
    pop = np.array([5, 1, 0, 2])
    m = beyond_accuracy(top, pop, (2,))
    assert m["ItemCoverage@2"] == pytest.approx(3 / 4)
    assert m["AveragePopularity@2"] == pytest.approx(((5 + 1) / 2 * 2 + (5 + 0) / 2) / 3)
    # counts 3, 2, 1 for the recommended items, 0 for item 3: sum (2i - 5) P_(i) / (4 * 6)
    assert m["GiniIndex@2"] == pytest.approx(((-1) * 1 + 1 * 2 + 3 * 3) / (4 * 6))
    p = np.array([3, 2, 1]) / 6
    assert m["ShannonEntropy@2"] == pytest.approx(-(p * np.log(p)).sum() / 3)
    # tail: max(int(3 * 0.1), 1) = 1 item of the 3 with interactions, the least popular: item 1
    assert tail_items(pop).tolist() == [False, True, False, False]
    assert m["TailPercentage@2"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)


@pytest.mark.parametrize("kind", ["ilp", "adapter", "fusion"])
@pytest.mark.parametrize("role", [VALID, TEST])
def test_top_lists_rank_as_eval_ranks(heads, kind, role):
    zoo, by_kind, fs = heads
    head = by_kind[kind]
    ds = synthetic_dataset()
    lists = user_top_k(zoo, head, fs, ds.sequences, role, k=5)
    assert torch.equal(lists.ranks, user_ranks(zoo, head, fs, ds.sequences, role))
    assert lists.items.shape == (len(ds.sequences), 5)
    cut = 2 if role == VALID else 1
    assert lists.targets.tolist() == [seq[-cut] for seq in ds.sequences]
    hit = (lists.items == lists.targets[:, None]).any(1)
    assert torch.equal(hit, lists.ranks <= 5)  # a target is listed iff it ranks in the top 5
    masked = user_top_k(zoo, head, fs, ds.sequences, role, k=5, mask_history=True)
    assert torch.equal(masked.ranks, user_ranks(zoo, head, fs, ds.sequences, role, mask_history=True))
    for row, seq in zip(masked.items.tolist(), ds.sequences):
        assert not set(row) & set(seq[:-cut])


def test_ilp_lists_are_the_chunked_top_k(heads):
    zoo, by_kind, fs = heads
    ds = synthetic_dataset()
    lists = user_top_k(zoo, by_kind["ilp"], fs, ds.sequences, TEST, k=4)
    rows = fs.rows(TEST)
    rows = rows[torch.argsort(fs.owner[rows])]
    weight = zoo.file(by_kind["ilp"], "head.safetensors")
    from safetensors.torch import load_file

    [w] = load_file(weight).values()
    scores, idx = top_k(w, fs.feats[rows], 4)
    assert torch.allclose(lists.scores, scores) and torch.equal(lists.items, idx)


def test_equal_to_recbole_on_every_head_kind(heads):
    zoo, by_kind, fs = heads
    ds = synthetic_dataset()
    n_items = len(ds.items)
    counts = Counter(i for seq in ds.sequences for i in seq[:-2])  # RecBole's training split counter
    pop = training_popularity(ds.sequences, n_items)
    assert {i: int(c) for i, c in enumerate(pop) if c} == dict(counts)
    for kind, head in by_kind.items():
        top = user_top_k(zoo, head, fs, ds.sequences, TEST, k=10).items.numpy()
        ours = beyond_accuracy(top, pop, (5, 10), n_items=n_items)
        assert_same(ours, recbole_metrics(top, counts, n_items, (5, 10)))
        assert 0 < ours["ItemCoverage@10"] <= 1, kind


def test_eval_reports_beyond_metrics_in_json(heads):
    zoo, by_kind, _ = heads
    result = evaluate(zoo, "toy", head_ref="toy/ilp")
    for name in NAMES:
        assert f"{name}@10" in result["metrics"]
    proc = run_cli(zoo, "eval", "--domain", "toy", "--head", "toy/ad", "--json")
    assert proc.returncode == 0, proc.stderr
    [line] = proc.stdout.splitlines()
    metrics = json.loads(line)["metrics"]
    assert {f"{n}@10" for n in NAMES} <= set(metrics)
    assert metrics["ItemCoverage@10"] > 0 and metrics["AveragePopularity@10"] > 0
