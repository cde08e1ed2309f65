"""The model path on a tiny randomly initialised OPT: samples, features, cache, head, eval, recommend."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from st2si_cli.adapt import FeatureOptions, adapt, evaluate, get_features
from st2si_cli.backbones import load_backbone, pull
from st2si_cli.data.dataset import RawInteraction, build_dataset
from st2si_cli.data.prepare import load_dataset, store_dataset
from st2si_cli.errors import MismatchError
from st2si_cli.features import (
    ALIGN,
    TEST,
    TRAIN,
    VALID,
    build_samples,
    compute_features,
    forward_batch,
    index_rows,
    live_features,
    plan_batches,
)
from st2si_cli.metrics import rank_of_target
from st2si_cli.scoring import linear_cross_entropy, rank_rows, top_k
from st2si_cli.text import ItemTokenizer, TextConfig
from st2si_cli.train.head import HeadConfig, train_head
from st2si_cli.zoo.store import Zoo

WORDS = "red blue green small large wooden steel glass paper cotton lamp chair table mug pen book clock fan".split()


def synthetic_dataset(n_users: int = 40, n_items: int = 25, seed: int = 0):
    rng = random.Random(seed)
    items = {str(i): {"title": " ".join(rng.sample(WORDS, 3)) + f" {i}"} for i in range(n_items)}
    rows, order = [], 0
    for u in range(n_users):
        # Users drift through the catalog so the next item is learnable.
        pos = rng.randrange(n_items)
        for t in range(rng.randint(4, 12)):
            pos = (pos + rng.choice([1, 1, 2])) % n_items
            rows.append(RawInteraction(user=f"u{u}", item=str(pos), timestamp=float(t), order=order))
            order += 1
    return build_dataset(items, rows, source="synthetic")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = Zoo(tmp_path_factory.mktemp("zoo"))
    store_dataset(z, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic")
    pull(z, "tiny-opt")
    pull(z, "tiny-llama")
    return z


@pytest.fixture(scope="module")
def backbone(zoo):
    return load_backbone(zoo, "tiny-opt", dtype="fp32")


def test_samples_put_test_target_last_and_valid_before_it(zoo, backbone):
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    toks = itok.encode_items(ds.items)
    samples = build_samples(ds, itok, toks)
    assert len(samples) == ds.n_users + ds.n_items
    for u, s in enumerate(samples[: ds.n_users]):
        seq = ds.sequences[u]
        assert s.roles[-1] == TEST and s.targets[-1] == seq[-1]
        assert s.roles[-2] == VALID and s.targets[-2] == seq[-2]
        assert all(r == TRAIN for r in s.roles[:-2])
        assert all(s.tokens[p] == itok.query_id for p in s.query_pos)
        assert s.tokens[-1] == itok.query_id  # the last [Q] closes the history without its test item
    align = samples[ds.n_users]
    assert align.roles == [ALIGN] and align.targets == [0]
    assert align.tokens[: len(itok.prompt_ids)] == itok.prompt_ids


def test_history_window_keeps_newest_items_within_item_and_token_caps(backbone):
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=3, max_tokens=12))
    items = [[1] * 3, [2] * 3, [3] * 3, [4] * 3]  # 4 tokens each with the query
    assert itok.history_window(items) == 3
    itok2 = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=50, max_tokens=9))
    assert itok2.history_window(items) == 2
    # The newest item is always kept, even when it alone is over budget.
    assert itok2.history_window([[5] * 40]) == 1


def test_attribute_cap_and_html_cleaning(backbone):
    cfg = TextConfig(attributes=("title", "brand"), max_attr_tokens=5)
    itok = ItemTokenizer.create(backbone.tokenizer, cfg)
    [ids] = itok.encode_items([{"title": "A &amp;  B" + " x" * 40, "brand": "Acme"}])
    assert len(ids) <= 10
    assert backbone.tokenizer.decode(ids[:5]) == "A & B"


def test_batched_right_padded_features_equal_one_by_one(zoo, backbone):
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items))[:12]
    with torch.inference_mode():
        together = forward_batch(backbone, samples)
        alone = [forward_batch(backbone, [s])[0] for s in samples]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batches_are_length_sorted_and_bounded():
    lengths = [5, 50, 7, 49, 6, 8, 51]
    batches = plan_batches(lengths, batch_tokens=110, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 110 or len(b) == 1
    assert batches[0][0] == 6  # longest first


def test_head_on_cache_equals_head_with_backbone_in_the_loop(zoo, backbone):
    ds = load_dataset(zoo, "toy")
    text = TextConfig()
    art, fs = compute_features(zoo, backbone, ds, zoo.get("toy").id, text)
    itok = ItemTokenizer.create(backbone.tokenizer, text)
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    cfg = HeadConfig(lr=1e-2, batch_size=16, max_epochs=4, patience=10, seed=3)
    cached = train_head(fs, ds.n_items, cfg)
    live_fs = index_rows(samples)
    live_fs.feats = None
    live = train_head(live_fs, ds.n_items, cfg, features_of=live_features(backbone, samples, live_fs))
    torch.testing.assert_close(cached.weight, live.weight, atol=1e-4, rtol=1e-4)
    assert cached.best_epoch == live.best_epoch
    for a, b in zip(cached.history, live.history):
        assert a["valid_NDCG@10"] == pytest.approx(b["valid_NDCG@10"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_killed_feature_pass_resumes_from_its_shards(tmp_path, backbone):
    z = Zoo(tmp_path / "zoo")
    dsa = store_dataset(z, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic")
    pull(z, "tiny-opt")
    ds = load_dataset(z, "toy")
    text = TextConfig()
    calls = {"n": 0}

    def die_in_the_second_shard(tokens, samples):
        calls["n"] += 1
        if calls["n"] == 3:  # shard 0 (batches 1-2) is on disk, shard 1 is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_features(z, backbone, ds, dsa.id, text, shard_samples=8, max_batch=4, on_progress=die_in_the_second_shard)
    assert z.ls(kind="features") == []  # nothing half-written is listed
    art, fs = compute_features(z, backbone, ds, dsa.id, text, shard_samples=8, max_batch=4)
    timings = art.meta["timings"]
    assert 0 < timings["tokens_computed"] < timings["tokens"]
    fresh_zoo = Zoo(tmp_path / "fresh")
    dsb = store_dataset(fresh_zoo, ds, domain="toy", fmt="synthetic", source="synthetic")
    _, fresh = compute_features(fresh_zoo, backbone, ds, dsb.id, text)
    torch.testing.assert_close(fs.feats, fresh.feats)
    assert torch.equal(fs.targets, fresh.targets)


def test_adapt_stores_head_and_second_adapt_reuses_the_cache(zoo):
    head = adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=3),
                 feature_opts=FeatureOptions(dtype="fp32"))
    assert head.kind == "head" and head.domain == "toy"
    assert set(head.meta["metrics"]) == {"valid", "test", "alignment"}
    for key in ("NDCG@10", "Recall@10", "MRR", "MRR@10"):
        assert 0.0 <= head.meta["metrics"]["test"][key] <= 1.0
    assert head.meta["inputs"]["backbone"] == zoo.get("tiny-opt").id
    n_caches = len(zoo.ls(kind="features"))
    messages = []

    class Recorder:
        def __getattr__(self, name):
            return lambda *a, **k: messages.append((name, a))

    head2 = adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(lr=3e-3, max_epochs=2),
                  feature_opts=FeatureOptions(dtype="fp32"), reporter=Recorder(), name="toy-lr")
    assert len(zoo.ls(kind="features")) == n_caches
    assert not any(name == "features_start" for name, _ in messages)
    assert head2.id != head.id and head2.meta["train"]["lr"] == 3e-3


def test_eval_refuses_a_head_with_another_backbone(zoo):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1), feature_opts=FeatureOptions(dtype="fp32"))
    with pytest.raises(MismatchError):
        evaluate(zoo, "toy", backbone="tiny-llama", feature_opts=FeatureOptions(dtype="fp32"))
    result = evaluate(zoo, "toy", feature_opts=FeatureOptions(dtype="fp32"))
    assert result["metrics"]["n_users"] == 40 and "Acc@1" in result["metrics"]


def test_eval_refuses_a_head_whose_catalog_changed(zoo, tmp_path):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1), feature_opts=FeatureOptions(dtype="fp32"))
    other = synthetic_dataset(n_items=30, seed=1)
    store_dataset(zoo, other, domain="toy", fmt="synthetic", source="synthetic")
    try:
        with pytest.raises(MismatchError):
            evaluate(zoo, "toy", feature_opts=FeatureOptions(dtype="fp32"))
    finally:
        store_dataset(zoo, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic")


def test_features_are_reused_for_the_same_key(zoo):
    dsa = zoo.get("toy", kind="dataset")
    a1, _, _ = get_features(zoo, "tiny-opt", dsa, TextConfig(), FeatureOptions(dtype="fp32"))
    a2, _, _ = get_features(zoo, "tiny-opt", dsa, TextConfig(), FeatureOptions(dtype="fp32"))
    assert a1.id == a2.id


def run_cli(zoo, *args, input=None):
    return subprocess.run([sys.executable, "-m", "st2si_cli", "--zoo", str(zoo.root), *args],
                          capture_output=True, text=True, input=input, timeout=300)


def test_recommend_cli_reads_ids_and_texts_and_keeps_input_order(zoo):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=2))
    lines = [
        {"user": "a", "history": [{"title": "red lamp"}, {"title": "something never seen"}]},
        {"user": "b", "history": ["3", "4", {"id": "5"}]},
        {"user": "c", "history": ["7"]},
    ]
    r = run_cli(zoo, "recommend", "--domain", "toy", "--user-history", "-", "-k", "5", "--exclude-history",
                input="".join(json.dumps(x) + "\n" for x in lines))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["user"] for row in rows] == ["a", "b", "c"]
    assert all(len(row["items"]) == 5 for row in rows)
    assert not {"3", "4", "5"} & {it["id"] for it in rows[1]["items"]}
    assert all({"id", "title", "score"} <= set(it) for it in rows[0]["items"])


def test_recommend_bad_line_is_one_error_naming_the_line(zoo, tmp_path):
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1))
    f = tmp_path / "h.jsonl"
    f.write_text('{"user": "a", "history": ["1"]}\n{"user": "b", "history": ["nope"]}\n{"user": "c", "history": []}\n')
    r = run_cli(zoo, "recommend", "--domain", "toy", "--user-history", str(f))
    assert r.returncode != 0 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("Error: ") and f"{f}:2:" in r.stderr
    r = run_cli(zoo, "recommend", "--domain", "toy", "--user-history", str(f), "--skip-bad")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert "items" in rows[0] and rows[1]["line"] == 2 and "error" in rows[1] and "empty" in rows[2]["error"]


def test_chunked_cross_entropy_equals_plain():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, generator=g, requires_grad=True)
    w = torch.randn(23, 5, generator=g, requires_grad=True)
    t = torch.randint(0, 23, (7,), generator=g)
    plain = torch.nn.functional.cross_entropy(h @ w.T, t)
    gh, gw = torch.autograd.grad(plain, (h, w))
    chunked = linear_cross_entropy(h, w, t, chunk=4)
    ch, cw = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(plain, chunked)
    torch.testing.assert_close(gh, ch)
    torch.testing.assert_close(gw, cw)


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
