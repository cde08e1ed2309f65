"""Training the item linear projection head on a tiny randomly initialised OPT: on the feature cache or with
the backbone in the loop, through `adapt`, and the chunked loss it trains with."""

from __future__ import annotations

import pytest
import torch

from st2si_cli.adapt import FeatureOptions, adapt
from st2si_cli.data.prepare import load_dataset
from st2si_cli.features.cache import compute_features, index_rows, live_features
from st2si_cli.model.samples import build_samples
from st2si_cli.model.scoring import linear_cross_entropy
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.train.head import HeadConfig, train_head


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


def test_adapt_stores_head_and_second_adapt_reuses_the_cache(zoo):
    head = adapt(
        zoo,
        "toy",
        backbone="tiny-opt",
        head_cfg=HeadConfig(max_epochs=3),
        feature_opts=FeatureOptions(dtype="fp32"),
    )
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

    head2 = adapt(
        zoo,
        "toy",
        backbone="tiny-opt",
        head_cfg=HeadConfig(lr=3e-3, max_epochs=2),
        feature_opts=FeatureOptions(dtype="fp32"),
        reporter=Recorder(),
        name="toy-lr",
    )
    assert len(zoo.ls(kind="features")) == n_caches
    assert not any(name == "features_start" for name, _ in messages)
    assert head2.id != head.id and head2.meta["train"]["lr"] == 3e-3


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
