"""Evaluating and recommending with a head on a tiny randomly initialised OPT: the checks that refuse a head
that does not fit, `st2si recommend` run as a process, and the chunked ranking both use."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import quick_head, run_cli_here, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.data.prepare import store_dataset
from st2si_cli.errors import MismatchError
from st2si_cli.metrics import rank_of_target
from st2si_cli.model.scoring import rank_rows, top_k
from st2si_cli.train.head import HeadConfig


def test_eval_refuses_a_head_with_another_backbone(zoo):
    quick_head(zoo, "toy")
    with pytest.raises(MismatchError):
        evaluate(zoo, "toy", backbone="tiny-llama", feature_opts=FeatureOptions(dtype="fp32"))
    result = evaluate(zoo, "toy", feature_opts=FeatureOptions(dtype="fp32"))
    assert result["metrics"]["n_users"] == 40 and "Acc@1" in result["metrics"]


def test_eval_refuses_a_head_whose_catalog_changed(zoo, tmp_path):
    quick_head(zoo, "toy")
    other = synthetic_dataset(n_items=30, seed=1)
    store_dataset(zoo, other, domain="toy", fmt="synthetic", source="synthetic", replace=True)
    try:
        with pytest.raises(MismatchError):
            evaluate(zoo, "toy", feature_opts=FeatureOptions(dtype="fp32"))
    finally:
        store_dataset(
            zoo, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic", replace=True
        )


def test_recommend_cli_reads_ids_and_texts_and_keeps_input_order(zoo):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=2))
    lines = [
        {"user": "a", "history": [{"title": "red lamp"}, {"title": "something never seen"}]},
        {"user": "b", "history": ["3", "4", {"id": "5"}]},
        {"user": "c", "history": ["7"]},
    ]
    r = run_cli_here(
        zoo,
        "recommend",
        "--domain",
        "toy",
        "--user-history",
        "-",
        "-k",
        "5",
        "--exclude-history",
        input="".join(json.dumps(x) + "\n" for x in lines),
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["user"] for row in rows] == ["a", "b", "c"]
    assert all(len(row["items"]) == 5 for row in rows)
    assert not {"3", "4", "5"} & {it["id"] for it in rows[1]["items"]}
    assert all({"id", "title", "score"} <= set(it) for it in rows[0]["items"])


def test_recommend_bad_line_is_one_error_naming_the_line(zoo, tmp_path):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1))
    f = tmp_path / "h.jsonl"
    f.write_text(
        '{"user": "a", "history": ["1"]}\n{"user": "b", "history": ["nope"]}\n{"user": "c", "history": []}\n'
    )
    r = run_cli_here(zoo, "recommend", "--domain", "toy", "--user-history", str(f))
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("Error: ") and f"{f}:2:" in r.stderr
    r = run_cli_here(zoo, "recommend", "--domain", "toy", "--user-history", str(f), "--skip-bad")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert "items" in rows[0] and rows[1]["line"] == 2 and "error" in rows[1] and "empty" in rows[2]["error"]


def test_chunked_ranking_and_top_k_equal_full():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-2, 3, (40, 4), generator=g).float()  # small integers: many exact ties
    h = torch.randint(-2, 3, (9, 4), generator=g).float()
    t = torch.randint(0, 40, (9,), generator=g)
    exclude = [[1, 2, 3]] * 9
    full = rank_of_target(h @ w.T, t, exclude=exclude)
    assert torch.equal(rank_rows(w, h, t, exclude=exclude, item_chunk=7, row_chunk=4), full)
    s1, i1 = top_k(w, h, 5, item_chunk=6)
    s2, _ = (h @ w.T).topk(5, dim=1)
    torch.testing.assert_close(s1, s2)
    assert i1.shape == (9, 5)
