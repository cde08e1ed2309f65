"""`recommend` without torch for adapter, sasrec and fusion heads (model/np_heads.py): the numpy adapter
scores equal `SequenceAdapter.score_histories` (text and ID-only, either torch kernel), the fusion's mix
equals `Fusion.score_histories`, the numpy top-k orders items as `batched_top_k` does, and `recommend`
gives the same answers either way, without torch, and without the backbone for ID-only heads."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import run_cli, toy_zoo_with_llama
from safetensors.torch import save_file
from test_np_forward import LINES, engine_answers, reference_top_k, tiny_gqa_folder
from test_np_forward import TEXT as NP_FORWARD_TEXT

from st2si_cli.heads.base import batched_top_k
from st2si_cli.model import np_heads
from st2si_cli.model.adapter import AdapterConfig, SequenceAdapter, adapter_tensors
from st2si_cli.model.fusion import Fusion
from st2si_cli.recommend import Recommender, RecommendModel, RecommendOptions

D_FEAT, N_ITEMS = 24, 30

# ---- the math ------------------------------------------------------------------------------------------


def test_erf_and_gelu_are_torchs():
    xs = np.linspace(-9.0, 9.0, 20001)
    want = np.array([math.erf(x) for x in xs])
    assert np.max(np.abs(np_heads.erf(xs) - want)) < 1e-14
    assert np_heads.erf(np.array([0.0, np.inf, -np.inf]))[1:].tolist() == [1.0, -1.0]
    assert np.isnan(np_heads.erf(np.array([np.nan])))[0]
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 3
    got = np_heads.gelu(x.numpy())
    assert got.dtype == np.float32
    exact = torch.nn.functional.gelu(x.double()).float()  # float64, rounded once
    torch.testing.assert_close(torch.from_numpy(got), exact, rtol=2e-7, atol=1e-12)
    # torch's own fp32 gelu is an approximation whose error depends on the CPU's vector code (up to
    # 8e-7 on AVX-512): ours is within that error of it, element by element, plus our own rounding
    theirs = torch.nn.functional.gelu(x)
    ours = torch.from_numpy(got)
    assert torch.all((ours - theirs).abs() <= (theirs - exact).abs() + 2e-7 * exact.abs() + 1e-12)


def test_layer_norm_and_log_softmax_are_torchs():
    g = torch.Generator().manual_seed(1)
    x, w, b = (
        torch.randn(7, 16, generator=g) * 5 + 3,
        torch.randn(16, generator=g),
        torch.randn(16, generator=g),
    )
    want = torch.nn.functional.layer_norm(x, (16,), w, b)
    got = np_heads.layer_norm(x.numpy(), w.numpy(), b.numpy())
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-6)
    got = np_heads.log_softmax(x.numpy() * 10)
    torch.testing.assert_close(torch.from_numpy(got), torch.log_softmax(x * 10, 1), rtol=1e-6, atol=1e-5)


def test_adapter_fields_are_the_configs():
    assert np_heads.ADAPTER_FIELDS == {f.name for f in dataclasses.fields(AdapterConfig)}


def random_adapter(seed: int, **cfg) -> SequenceAdapter:
    """A SequenceAdapter (eval mode) with every weight and statistic random, far from its init."""
    g = torch.Generator().manual_seed(seed)
    c = AdapterConfig(**{"hidden": 16, "layers": 2, "heads": 2, "max_len": 8, **cfg})
    text = torch.randn(N_ITEMS, D_FEAT, generator=g) * 2 + 1 if c.use_text else None
    model = SequenceAdapter(c, D_FEAT, N_ITEMS, text)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
        model.set_query_stats(torch.randn(50, D_FEAT, generator=g) * 3 + 2)
    return model.eval()


def histories(seed: int, lengths=(1, 3, 8, 12, 20, 5)):
    """Query features (rows: the newest window) and catalog IDs (a few more items, some outside the
    catalog), histories shorter and longer than max_len."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, D_FEAT, generator=g) * 4 for n in lengths]
    ids = [
        [None if rng.random() < 0.2 else rng.randrange(N_ITEMS) for _ in range(n + rng.randrange(3))]
        for n in lengths
    ]
    return feats, ids


def numpy_adapter(model: SequenceAdapter) -> np_heads.NumpyAdapter:
    tensors = {k: v.numpy() for k, v in adapter_tensors(model).items()}
    return np_heads.NumpyAdapter(tensors, model.cfg.to_dict(), D_FEAT, N_ITEMS)


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"use_text": False},
        {"text_norm": False},
        {"use_ids": False},
        {"heads": 1, "layers": 3},  # an odd number of heads: torch's Python path, not its fused kernel
        {"hidden": 12, "heads": 4, "layers": 1, "max_len": 30},
    ],
)
@pytest.mark.parametrize("fastpath", [True, False])
def test_numpy_adapter_equals_score_histories(cfg, fastpath):
    model = random_adapter(len(cfg), **cfg)
    feats, ids = histories(len(cfg))
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        want = model.score_histories(feats, ids)
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    ad = numpy_adapter(model)
    assert ad.reads_features == model.cfg.use_text
    got = ad.score_histories([f.numpy() for f in feats], ids)
    assert got.dtype == np.float32 and got.shape == (len(feats), N_ITEMS)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(ad.item_vectors.T), model.item_vectors().detach())
    if not model.cfg.use_text:  # the features' values are never read: their count alone
        blank = [np.zeros((len(f), 0), np.float32) for f in feats]
        np.testing.assert_array_equal(ad.score_histories(blank, ids), got)


def test_the_batch_does_not_change_a_history_score():
    """Padding to the batch's longest history changes nothing but float rounding (each row alone)."""
    model = random_adapter(7)
    feats, ids = histories(7)
    ad = numpy_adapter(model)
    whole = ad.score_histories([f.numpy() for f in feats], ids)
    for r in range(len(feats)):
        alone = ad.score_histories([feats[r].numpy()], [ids[r]])
        np.testing.assert_allclose(alone[0], whole[r], rtol=1e-5, atol=1e-5)


def store(tmp_path, tensors, name="head.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("with_ilp", [True, False])
def test_numpy_fusion_equals_the_fusion(tmp_path, with_ilp):
    a1, a2 = random_adapter(1), random_adapter(2, use_text=False)
    ilp = torch.randn(N_ITEMS, D_FEAT, generator=torch.Generator().manual_seed(3)) * 0.2 if with_ilp else None
    fusion = Fusion(ilp, [a1, a2], 0.3 if with_ilp else 0.0)
    path = store(tmp_path, fusion.tensors([adapter_tensors(a1), adapter_tensors(a2)]))
    train = {"w": fusion.w, "adapter": a1.cfg.to_dict(), "adapters": [a1.cfg.to_dict(), a2.cfg.to_dict()]}
    scorer = np_heads.load_scorer(path, "fusion", train, D_FEAT, N_ITEMS)
    assert isinstance(scorer, np_heads.NumpyFusion) and scorer.reads_features
    feats, ids = histories(4)
    want = fusion.score_histories(feats, ids)
    got = scorer.score_histories([f.numpy() for f in feats], ids)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    # the head's top-k through both
    exclude = [[1, 2], [], list(range(0, N_ITEMS, 2)), [5], list(range(N_ITEMS)), []]
    for k in (1, 5, N_ITEMS):
        for ex in (None, exclude):
            with torch.no_grad():
                ws, wi = batched_top_k(fusion.score_histories, feats, ids, k, ex, batch=4)
            gs, gi = np_heads.top_k(scorer, [f.numpy() for f in feats], ids, k, ex, batch=4)
            assert np.array_equal(gi, wi.numpy()), (k, ex is not None)
            np.testing.assert_allclose(gs, ws.numpy(), rtol=1e-5, atol=1e-5)


def test_load_scorer_reads_adapter_heads_and_refuses_what_it_does_not_know(tmp_path):
    model = random_adapter(5, use_text=False)
    cfg = model.cfg.to_dict()
    path = store(tmp_path, adapter_tensors(model))
    scorer = np_heads.load_scorer(path, "sasrec", cfg, D_FEAT, N_ITEMS)
    assert isinstance(scorer, np_heads.NumpyAdapter) and not scorer.reads_features
    fusion_ids = store(
        tmp_path, {"adapter." + k: v for k, v in adapter_tensors(model).items()}, "f.safetensors"
    )
    ids_only = np_heads.load_scorer(fusion_ids, "fusion", {"w": 0.0, "adapter": cfg}, D_FEAT, N_ITEMS)
    assert isinstance(ids_only, np_heads.NumpyFusion) and not ids_only.reads_features
    assert np_heads.load_scorer(path, "sasrec", {**cfg, "new_setting": 1}, D_FEAT, N_ITEMS) is None
    assert np_heads.load_scorer(path, "sasrec", cfg, D_FEAT, N_ITEMS + 1) is None  # another catalog size
    assert np_heads.load_scorer(path, "adapter", {**cfg, "layers": 3}, D_FEAT, N_ITEMS) is None
    assert np_heads.load_scorer(path, "ilp", cfg, D_FEAT, N_ITEMS) is None  # not a kind it rebuilds
    extra = store(tmp_path, {**adapter_tensors(model), "spare": torch.zeros(2)}, "x.safetensors")
    assert np_heads.load_scorer(extra, "sasrec", cfg, D_FEAT, N_ITEMS) is None  # load_state_dict is strict
    f16 = store(
        tmp_path, {k: v.to(torch.float16) for k, v in adapter_tensors(model).items()}, "h.safetensors"
    )
    assert np_heads.load_scorer(f16, "sasrec", cfg, D_FEAT, N_ITEMS) is not None  # widened, as torch does


def test_best_k_orders_as_torch():
    from st2si_cli.model.scoring import best_k

    rng = random.Random(8)
    for n in (1, 2, 5, 17, 64):
        for k in sorted({1, 2, 5, 10, n}):
            for _ in range(6):
                levels = rng.choice([2, 3, 1000])
                values = [float(rng.randrange(levels)) for _ in range(n)]
                for j in rng.sample(range(n), min(n, rng.choice([0, 0, 2]))):
                    values[j] = rng.choice([math.nan, -math.inf, math.inf])
                want = reference_top_k(values, k)
                got_s, got_i = np_heads.best_k(np.array([values, values[::-1]], np.float32), k)
                assert got_i[0].tolist() == want, (n, k, values)
                _, torch_i = best_k(torch.tensor([values[::-1]]), k)
                assert got_i[1].tolist() == torch_i[0].tolist()


# ---- recommend -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The toy dataset (two items retired) on a GQA Llama with bf16 weights, and on its fp32 features: an
    ILP, an adapter and a sasrec head; the fusion of the three (w fixed at 0.4), the fusion of the adapter
    alone; and with a token budget that cuts long histories short (48 tokens), two sasrec heads and their
    ID-only ensemble."""
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.backbones.pull import _store_folder
    from st2si_cli.heads.fusion import fuse_heads
    from st2si_cli.items import update_items
    from st2si_cli.model.text import TextConfig
    from st2si_cli.train.head import HeadConfig

    z = toy_zoo_with_llama(tmp_path_factory.mktemp("npheads"))
    folder = tmp_path_factory.mktemp("gqa")
    tiny_gqa_folder(folder)
    _store_folder(z, folder, "tiny-gqa", {"family": "llama", "hidden": 64, "layers": 2})
    fp32 = FeatureOptions(dtype="fp32")

    def head(cfg, name, text=None):
        return adapt(z, "toy", backbone="tiny-gqa", head_cfg=cfg, feature_opts=fp32, name=name, text=text)

    small = {"hidden": 16, "layers": 2, "heads": 2, "max_len": 8, "batch_size": 16, "max_epochs": 1}
    ilp = head(HeadConfig(max_epochs=1), "toy/ilp")
    adapter = head(AdapterConfig(**small), "toy/adapter")
    sasrec = head(AdapterConfig(**small, use_text=False), "toy/sasrec")
    fuse_heads(z, ilp, [adapter, sasrec], name="toy/fusion", weights=(0.4,))
    fuse_heads(z, None, [adapter], name="toy/fusion-text")
    short = TextConfig(max_tokens=48)
    ids = {**small, "max_len": 16, "use_text": False}
    a = head(AdapterConfig(**ids), "toy/ids-a", short)
    b = head(AdapterConfig(**{**ids, "heads": 1, "seed": 1}), "toy/ids-b", short)
    fuse_heads(z, None, [a, b], name="toy/fusion-ids")
    update_items(z, "toy", ["4", "9"], retire=True)
    return z


TEXT = NP_FORWARD_TEXT + json.dumps({"user": "f", "history": [{"title": "not in the catalog"}]}) + "\n"
HEADS = ["toy/sasrec", "toy/adapter", "toy/fusion", "toy/fusion-text", "toy/ids-a", "toy/fusion-ids"]
ID_ONLY = {"toy/sasrec", "toy/ids-a", "toy/fusion-ids"}


def answers(zoo, monkeypatch, engine, head, **opts):
    rows, has_backbone = engine_answers(zoo, monkeypatch, engine, head, TEXT, **opts)
    if engine == "numpy":
        assert has_backbone == (head not in ID_ONLY)  # no backbone for an ID-only head
    return rows


@pytest.mark.parametrize("head", HEADS)
def test_recommend_answers_equal_the_torch_paths(zoo, monkeypatch, head):
    from st2si_cli.heads.choice import id_only

    assert id_only(zoo.get(head, kind="head")) == (head in ID_ONLY)
    for opts in ({"k": 5}, {"k": 100, "exclude_history": True}):
        fast = answers(zoo, monkeypatch, "numpy", head, **opts)
        slow = answers(zoo, monkeypatch, "torch", head, **opts)
        assert fast == slow, (head, opts)  # ids, titles, scores to 4 decimals, provenance, unresolved
        assert all(not {"4", "9"} & {it["id"] for it in row["items"]} for row in fast)


def test_an_id_only_head_reads_no_backbone_weight(zoo, monkeypatch):
    """The tokenizer alone: the history's window of IDs is the one the text settings give (48 tokens cut
    user d's 30 items short of the heads' max_len)."""
    from st2si_cli.model.np_forward import NumpyLlama

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone's weights were read")

    want = answers(zoo, monkeypatch, "torch", "toy/fusion-ids", k=5)
    monkeypatch.setattr(NumpyLlama, "from_files", refuse)
    assert answers(zoo, monkeypatch, "numpy", "toy/fusion-ids", k=5) == want
    model = RecommendModel(zoo, zoo.get("toy/ids-a", kind="head"), RecommendOptions())
    [long] = [r for r in Recommender(zoo, "toy").parse([(1, json.dumps(LINES[3]))], "<test>")]
    [sample] = model._samples([long])
    assert 1 < len(sample.query_pos) < 16  # the token budget, not max_len, decides the window


def test_recommend_a_fusion_without_importing_torch(zoo, monkeypatch):
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules)))\n"
    )
    args = ("recommend", "--domain", "toy", "--head", "toy/fusion", "--user-history", "-", "-k", "5")
    r = run_cli(zoo, *args, "--exclude-history", input=TEXT, prelude=probe)
    assert r.returncode == 0, r.stderr
    assert "TORCH=False" in r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows == answers(zoo, monkeypatch, "torch", "toy/fusion", k=5, exclude_history=True)


@pytest.mark.parametrize(
    "head, env, dtype, engine",
    [
        ("toy/adapter", {}, "bf16", "torch"),  # features in bf16: torch computes them
        ("toy/fusion", {}, "auto", "torch"),
        ("toy/fusion", {"ST2SI_NO_NUMPY": "1"}, None, "torch"),
        ("toy/sasrec", {"ST2SI_NO_FAST_LOAD": "1"}, None, "torch"),
        ("toy/sasrec", {}, "bf16", "numpy"),  # reads no feature: the dtype changes nothing
        ("toy/fusion", {}, None, "numpy"),  # the head's own dtype: fp32
    ],
)
def test_which_engine_answers(zoo, monkeypatch, head, env, dtype, engine):
    monkeypatch.delenv("ST2SI_NO_NUMPY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = RecommendModel(zoo, zoo.get(head, kind="head"), RecommendOptions(dtype=dtype))
    assert model.engine == engine
