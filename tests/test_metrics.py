"""Behaviour of the ranking metrics in st2si_cli.metrics."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from st2si_cli.metrics import (
    MetricAccumulator,
    RankAccumulator,
    RankingProtocol,
    candidate_hit_ratio,
    metrics_from_ranks,
    rank_of_target,
    sample_candidates,
)

INV_LOG2_3 = 1.0 / math.log2(3)  # NDCG of rank 2
INV_LOG2_4 = 0.5  # NDCG of rank 3
INV_LOG2_6 = 1.0 / math.log2(6)  # NDCG of rank 5

FAST = settings(max_examples=60, deadline=None)


# ---------------------------------------------------------------- pure-Python references


def ref_rank(row: list[float], target: int, ties: str, exclude: list[int]) -> int:
    """Sort-based rank: drop excluded items (never the target), sort by score, find the target."""
    items = [i for i in range(len(row)) if i == target or i not in exclude]
    # Pessimistic: the target sorts after every item it ties with; optimistic: before.
    tie_key = (lambda i: i == target) if ties == "pessimistic" else (lambda i: i != target)
    order = sorted(items, key=lambda i: (-row[i], tie_key(i)))
    return order.index(target) + 1


def ref_metrics(ranks: list[int], ks: list[int]) -> dict[str, float]:
    n = len(ranks)
    out: dict[str, float] = {}
    for k in ks:
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / n
        out[f"Recall@{k}"] = sum(1 for r in ranks if r <= k) / n
        out[f"MRR@{k}"] = sum(1 / r for r in ranks if r <= k) / n
    out["MRR"] = sum(1 / r for r in ranks) / n
    out["n_users"] = n
    return out


def assert_metrics_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# ---------------------------------------------------------------- hand-built examples


def test_hand_built_2x5_ranks_and_metrics() -> None:
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.9, 0.5],  # target 3 ties with item 1 at the top
            [0.5, 0.4, 0.3, 0.2, 0.1],  # target 4 is last
        ]
    )
    targets = torch.tensor([3, 4])
    ranks = rank_of_target(scores, targets)
    assert ranks.tolist() == [2, 5]
    assert ranks.dtype == torch.long
    assert rank_of_target(scores, targets, ties="optimistic").tolist() == [1, 5]

    m = metrics_from_ranks(ranks, ks=(3, 10))
    assert_metrics_close(
        m,
        {
            "NDCG@3": (INV_LOG2_3 + 0) / 2,
            "NDCG@10": (INV_LOG2_3 + INV_LOG2_6) / 2,
            "Recall@3": 0.5,
            "Recall@10": 1.0,
            "MRR@3": (1 / 2 + 0) / 2,
            "MRR@10": (1 / 2 + 1 / 5) / 2,
            "MRR": 0.35,
            "n_users": 2,
        },
    )


def test_hand_built_3x4_ranks_and_metrics_under_both_tie_rules() -> None:
    scores = torch.tensor(
        [
            [4.0, 3.0, 2.0, 1.0],  # target 0 is best
            [1.0, 1.0, 1.0, 1.0],  # all tied
            [0.2, 0.8, 0.5, 0.8],  # two items strictly above target 2
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 2, 2])

    pess = rank_of_target(scores, targets)
    assert pess.tolist() == [1, 4, 3]
    assert_metrics_close(
        metrics_from_ranks(pess, ks=(2, 10)),
        {
            "NDCG@2": 1 / 3,
            "Recall@2": 1 / 3,
            "MRR@2": 1 / 3,
            "NDCG@10": (1 + 1 / math.log2(5) + INV_LOG2_4) / 3,
            "Recall@10": 1.0,
            "MRR@10": 19 / 36,
            "MRR": 19 / 36,  # (1 + 1/4 + 1/3) / 3
            "n_users": 3,
        },
    )

    opt = rank_of_target(scores, targets, ties="optimistic")
    assert opt.tolist() == [1, 1, 3]
    m = metrics_from_ranks(opt, ks=(2,))
    assert m["NDCG@2"] == pytest.approx(2 / 3)
    assert m["MRR"] == pytest.approx(7 / 9)  # (1 + 1 + 1/3) / 3


def test_numpy_inputs_give_the_same_ranks_as_tensors() -> None:
    scores = np.array([[0.1, 0.9, 0.3, 0.9, 0.5], [0.5, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    targets = np.array([3, 4], dtype=np.int32)
    assert rank_of_target(scores, targets).tolist() == [2, 5]
    assert metrics_from_ranks(np.array([2, 5]))["MRR"] == pytest.approx(0.35)


def test_constant_scores_rank_last_under_pessimistic_ties() -> None:
    n_items = 25
    scores = torch.full((3, n_items), 0.5)
    targets = torch.tensor([0, 7, 24])

    ranks = rank_of_target(scores, targets)
    assert ranks.tolist() == [n_items] * 3
    m = metrics_from_ranks(ranks, ks=(10,))
    assert m["NDCG@10"] == 0.0
    assert m["Recall@10"] == 0.0

    # The authors' rule gives a model that learned nothing a perfect score: kept only to
    # reproduce their numbers.
    optimistic = rank_of_target(scores, targets, ties="optimistic")
    assert optimistic.tolist() == [1, 1, 1]
    assert metrics_from_ranks(optimistic)["NDCG@10"] == 1.0


def test_unknown_tie_rule_is_rejected() -> None:
    with pytest.raises(ValueError, match="ties"):
        rank_of_target(torch.zeros(1, 3), torch.tensor([0]), ties="mean")
    with pytest.raises(ValueError, match="ties"):
        RankAccumulator(torch.zeros(1), ties="random")
    with pytest.raises(ValueError, match="ties"):
        RankingProtocol(ties="average")


# ---------------------------------------------------------------- history masking


def test_history_masking_moves_the_target_up() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5]])
    targets = torch.tensor([4])
    assert rank_of_target(scores, targets).tolist() == [4]
    assert rank_of_target(scores, targets, exclude=[[0, 2]]).tolist() == [2]
    assert rank_of_target(scores, targets, exclude=[[0, 1, 2]]).tolist() == [1]


def test_history_masking_never_masks_the_target_itself() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.5]])
    targets = torch.tensor([1])
    # The target appears in its own history (a repeat consumption): it stays in the ranking.
    assert rank_of_target(scores, targets, exclude=[[1]]).tolist() == [2]
    assert rank_of_target(scores, targets, exclude=[[0, 1]]).tolist() == [1]


def test_masked_items_do_not_tie_with_a_minus_inf_target() -> None:
    inf = float("inf")
    scores = torch.tensor([[-inf, -inf, 0.0]])
    assert rank_of_target(scores, torch.tensor([1])).tolist() == [3]
    assert rank_of_target(scores, torch.tensor([1]), exclude=[[0]]).tolist() == [2]


def test_exclusion_lists_are_validated() -> None:
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="one list per row"):
        rank_of_target(scores, torch.tensor([0, 1]), exclude=[[1]])
    with pytest.raises(ValueError, match="outside"):
        rank_of_target(scores, torch.tensor([0, 1]), exclude=[[4], []])


def test_targets_out_of_range_or_wrong_shape_are_rejected() -> None:
    scores = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="targets"):
        rank_of_target(scores, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="targets"):
        rank_of_target(scores, torch.tensor([0]))
    with pytest.raises(TypeError, match="targets"):
        rank_of_target(scores, torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- NaN


def test_nan_scores_raise() -> None:
    scores = torch.tensor([[0.1, float("nan"), 0.3]])
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(scores, torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        RankAccumulator(torch.tensor([float("nan")]))
    acc = RankAccumulator(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(scores, 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="NaN"):
        candidate_hit_ratio(scores, torch.tensor([0]), [[]], n_candidates=2, seeds=[0])


# ---------------------------------------------------------------- property tests

SCORE_VALUES = st.sampled_from([0.0, 0.5, 1.0, 2.0, float("inf"), float("-inf")])


@st.composite
def ranking_problems(draw: st.DrawFn) -> tuple[list[list[float]], list[int], list[list[int]]]:
    """Small matrices drawn from few distinct values, so ties are common."""
    batch = draw(st.integers(1, 4))
    n_items = draw(st.integers(1, 9))
    rows = draw(
        st.lists(st.lists(SCORE_VALUES, min_size=n_items, max_size=n_items), min_size=batch, max_size=batch)
    )
    targets = draw(st.lists(st.integers(0, n_items - 1), min_size=batch, max_size=batch))
    exclude = draw(
        st.lists(st.lists(st.integers(0, n_items - 1), max_size=n_items), min_size=batch, max_size=batch)
    )
    return rows, targets, exclude


@FAST
@given(ranking_problems(), st.sampled_from(["pessimistic", "optimistic"]), st.booleans())
def test_rank_of_target_matches_sort_based_reference(problem, ties: str, use_exclude: bool) -> None:
    rows, targets, exclude = problem
    got = rank_of_target(
        torch.tensor(rows, dtype=torch.float64),
        torch.tensor(targets),
        ties=ties,
        exclude=exclude if use_exclude else None,
    )
    want = [
        ref_rank(row, t, ties, ex if use_exclude else [])
        for row, t, ex in zip(rows, targets, exclude, strict=True)
    ]
    assert got.tolist() == want


@FAST
@given(ranking_problems(), st.sampled_from(["pessimistic", "optimistic"]), st.booleans(), st.data())
def test_rank_accumulator_over_random_chunks_matches_full_ranking(
    problem, ties: str, use_exclude: bool, data
) -> None:
    rows, targets, exclude = problem
    scores = torch.tensor(rows, dtype=torch.float32)
    t = torch.tensor(targets)
    batch, n_items = scores.shape
    full = rank_of_target(scores, t, ties=ties, exclude=exclude if use_exclude else None)

    mask = torch.zeros(batch, n_items, dtype=torch.bool)
    for b, ex in enumerate(exclude):
        mask[b, ex] = True  # includes the target when listed: the accumulator must ignore it

    acc = RankAccumulator(scores[torch.arange(batch), t], ties=ties)
    start = 0
    while start < n_items:
        width = data.draw(st.integers(1, n_items - start), label="chunk width")
        chunk_mask = mask[:, start : start + width] if use_exclude else None
        acc.update(scores[:, start : start + width], start, t, chunk_mask)
        start += width
    assert acc.n_items_seen == n_items
    assert torch.equal(acc.ranks(), full)


@FAST
@given(
    st.lists(st.integers(1, 40), min_size=1, max_size=30),
    st.lists(st.integers(1, 30), min_size=1, max_size=4, unique=True),
)
def test_metrics_from_ranks_matches_reference(ranks: list[int], ks: list[int]) -> None:
    assert_metrics_close(metrics_from_ranks(torch.tensor(ranks), ks), ref_metrics(ranks, ks))


def test_metrics_from_ranks_rejects_empty_and_non_positive_ranks() -> None:
    with pytest.raises(ValueError, match="empty"):
        metrics_from_ranks(torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="1-based"):
        metrics_from_ranks(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="cut-offs"):
        metrics_from_ranks(torch.tensor([1]), ks=(0,))


def test_metrics_keys_are_exact() -> None:
    m = metrics_from_ranks(torch.tensor([1, 2]), ks=(5, 20))
    assert set(m) == {"NDCG@5", "Recall@5", "MRR@5", "NDCG@20", "Recall@20", "MRR@20", "MRR", "n_users"}


# ---------------------------------------------------------------- accumulation across batches


def test_metric_accumulator_averages_per_user_not_per_batch() -> None:
    acc = MetricAccumulator()
    acc.add(torch.tensor([1]))  # one user, a hit
    acc.add(torch.tensor([20, 20, 20]))  # three users, misses
    m = acc.result(ks=(10,))
    assert m["n_users"] == 4
    assert m["Recall@10"] == pytest.approx(1 / 4)  # the mean of batch means would be 1/2
    assert m["NDCG@10"] == pytest.approx(1 / 4)
    assert m["MRR"] == pytest.approx((1 + 3 / 20) / 4)
    assert m == metrics_from_ranks(torch.tensor([1, 20, 20, 20]), ks=(10,))


def test_empty_metric_accumulator_raises() -> None:
    with pytest.raises(ValueError):
        MetricAccumulator().result()


# ---------------------------------------------------------------- candidate-N protocol


def _random_problem(batch: int = 8, n_items: int = 60, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(batch, n_items, generator=g)
    targets = torch.randint(0, n_items, (batch,), generator=g)
    histories = [torch.randperm(n_items, generator=g)[: 5 + b].tolist() for b in range(batch)]
    return scores, targets, histories


def test_candidate_protocol_is_deterministic_for_the_same_seeds() -> None:
    scores, targets, histories = _random_problem()
    a = candidate_hit_ratio(scores, targets, histories, n_candidates=10, seeds=range(5))
    b = candidate_hit_ratio(scores, targets, histories, n_candidates=10, seeds=range(5))
    assert a == b
    assert a["n_seeds"] == 5 and a["n_candidates"] == 10 and a["n_users"] == 8


def test_candidate_protocol_matches_per_seed_sampling_with_sample_candidates() -> None:
    scores, targets, histories = _random_problem()
    # Targets near the top but not at it: hits then vary from seed to seed, so the std is
    # non-zero and population vs sample std can be told apart.
    scores[torch.arange(len(targets)), targets] = 0.8
    seeds = [3, 11, 42, 7, 5]
    got = candidate_hit_ratio(scores, targets, histories, n_candidates=6, seeds=seeds)

    per_seed = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        hits = 0
        for b in range(len(targets)):
            t = int(targets[b])
            negs = sample_candidates(scores.shape[1], t, histories[b], 5, g)
            hits += int(all(scores[b, int(j)] < scores[b, t] for j in negs))
        per_seed.append(hits / len(targets))
    assert got["HitRatio@1"] == pytest.approx(statistics.fmean(per_seed))
    assert statistics.pstdev(per_seed) > 0
    assert got["HitRatio@1_std"] == pytest.approx(statistics.pstdev(per_seed))


def test_candidate_protocol_perfect_scorer_hits_every_time() -> None:
    scores, targets, histories = _random_problem()
    scores[torch.arange(len(targets)), targets] = 2.0  # above every rand() score
    r = candidate_hit_ratio(scores, targets, histories)
    assert r["HitRatio@1"] == 1.0
    assert r["HitRatio@1_std"] == 0.0
    assert r["n_seeds"] == 20 and r["n_candidates"] == 20


def test_candidate_protocol_constant_scores_never_hit_under_pessimistic_ties() -> None:
    scores = torch.zeros(4, 30)
    targets = torch.tensor([0, 1, 2, 3])
    histories = [[5, 6], [], [7], [0, 1]]
    assert candidate_hit_ratio(scores, targets, histories, seeds=range(3))["HitRatio@1"] == 0.0
    optimistic = candidate_hit_ratio(scores, targets, histories, seeds=range(3), ties="optimistic")
    assert optimistic["HitRatio@1"] == 1.0


def test_candidate_protocol_never_draws_history_items() -> None:
    # History items outscore the target, everything else is below it: a single history item
    # among the negatives would cost a hit.
    scores, targets, histories = _random_problem(n_items=40)
    scores.fill_(0.0)
    for b, hist in enumerate(histories):
        scores[b, hist] = 10.0
        scores[b, int(targets[b])] = 1.0
    r = candidate_hit_ratio(scores, targets, histories, n_candidates=20, seeds=range(10))
    assert r["HitRatio@1"] == 1.0


def test_candidate_protocol_names_the_row_without_enough_negatives() -> None:
    scores = torch.rand(2, 6)
    histories = [[1], [0, 1, 2, 4]]  # row 1: only item 5 is eligible
    with pytest.raises(ValueError, match="row 1"):
        candidate_hit_ratio(scores, torch.tensor([0, 3]), histories, n_candidates=3, seeds=[0])


@FAST
@given(st.data())
def test_sample_candidates_draws_distinct_eligible_items(data) -> None:
    n_items = data.draw(st.integers(2, 30), label="n_items")
    target = data.draw(st.integers(0, n_items - 1), label="target")
    history = data.draw(st.lists(st.integers(0, n_items - 1), max_size=n_items), label="history")
    eligible = set(range(n_items)) - set(history) - {target}
    n = data.draw(st.integers(0, len(eligible)), label="n")
    seed = data.draw(st.integers(0, 2**31), label="seed")

    negs = sample_candidates(n_items, target, history, n, torch.Generator().manual_seed(seed))
    assert negs.dtype == torch.long
    assert len(negs) == n
    assert len(set(negs.tolist())) == n
    assert set(negs.tolist()) <= eligible

    again = sample_candidates(n_items, target, history, n, torch.Generator().manual_seed(seed))
    assert torch.equal(negs, again)

    with pytest.raises(ValueError, match="eligible"):
        sample_candidates(n_items, target, history, len(eligible) + 1, torch.Generator().manual_seed(seed))


def test_sample_candidates_covers_every_eligible_item() -> None:
    # Uniformity smoke check: over many draws every eligible item shows up, others never do.
    g = torch.Generator().manual_seed(0)
    seen = torch.zeros(12, dtype=torch.long)
    for _ in range(300):
        seen[sample_candidates(12, 3, [0, 7], 4, g)] += 1
    assert seen[[0, 3, 7]].tolist() == [0, 0, 0]
    eligible_counts = seen[[i for i in range(12) if i not in (0, 3, 7)]]
    assert int(eligible_counts.min()) > 0
    # 300 * 4 / 9 ≈ 133 expected per item; a gross bias would fall far outside this band.
    assert 80 < int(eligible_counts.min()) and int(eligible_counts.max()) < 190


# ---------------------------------------------------------------- protocol record


def test_ranking_protocol_round_trips_through_a_dict() -> None:
    p = RankingProtocol(ties="optimistic", mask_history=True, ks=(5, 10))
    d = p.to_dict()
    assert d == {"ties": "optimistic", "mask_history": True, "ks": [5, 10]}
    assert RankingProtocol.from_dict(d) == p
    assert RankingProtocol().to_dict() == {"ties": "pessimistic", "mask_history": False, "ks": [10]}
