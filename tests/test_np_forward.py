"""`recommend` without torch (model/np_forward.py): the numpy Llama forward equals the packed torch forward
up to float32 rounding, the numpy top-k orders items as torch's `top_k` does (equal scores included),
`recommend` gives the same answers either way, imports no torch, and leaves other cases to torch (the
numpy engine's adapter, sasrec and fusion heads are tested in tests/test_np_heads.py)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import run_cli, toy_zoo_with_llama
from safetensors.torch import save_file

from st2si_cli.backbones.fast_load import mmap_safetensors
from st2si_cli.model import np_forward
from st2si_cli.model.fast import PackedLlama
from st2si_cli.model.np_forward import NumpyLlama, ilp_top_k, read_safetensors
from st2si_cli.model.samples import Sample
from st2si_cli.model.scoring import ITEM_CHUNK, best_k, top_k
from st2si_cli.recommend import Recommender, RecommendOptions

# ---- the forward ----------------------------------------------------------------------------------------

CFG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA: two query heads per key/value head
    "rms_norm_eps": 1e-5,
    "vocab_size": 50,
}
THETA = 10000.0
TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def random_llama(tmp_path, stored: str):
    """A random Llama's safetensors file (names with the `model.` prefix, `stored` dtype)."""
    g = torch.Generator().manual_seed(0)
    d, i, hd = CFG["hidden_size"], CFG["intermediate_size"], 16
    h, kv = CFG["num_attention_heads"], CFG["num_key_value_heads"]
    shapes = {"embed_tokens.weight": (CFG["vocab_size"], d), "norm.weight": (d,)}
    for n in range(CFG["num_hidden_layers"]):
        p = f"layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (h * hd, d),
            p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d),
            p + "self_attn.o_proj.weight": (d, h * hd),
            p + "mlp.gate_proj.weight": (i, d),
            p + "mlp.up_proj.weight": (i, d),
            p + "mlp.down_proj.weight": (d, i),
        }
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g) * (0.3 if len(shape) == 2 else 0.1)
        tensors["model." + name] = (1 + t if len(shape) == 1 else t).to(TORCH_DTYPES[stored])
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def samples_of(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        tokens = [rng.randrange(CFG["vocab_size"]) for _ in range(n)]
        query = sorted(rng.sample(range(n), min(3, n)))  # several query positions, the last among them
        out.append(Sample(tokens, sorted(set(query) | {n - 1}), [], [], 0))
    return out


@pytest.mark.parametrize("stored", ["F32", "BF16", "F16"])
def test_numpy_forward_equals_the_packed_torch_forward(tmp_path, stored):
    path = random_llama(tmp_path, stored)
    weights = {k.removeprefix("model."): v for k, v in mmap_safetensors(path).items()}
    packed = PackedLlama.from_weights(CFG, weights, torch.float32, THETA)
    numpy_model = NumpyLlama.from_files(CFG, [path], THETA)
    raw = read_safetensors(path)["model.layers.0.self_attn.q_proj.weight"]
    assert raw.dtype == stored and not raw.data.flags.writeable  # a view of the file, as stored
    assert np.array_equal(raw.float32(), weights["layers.0.self_attn.q_proj.weight"].float().numpy())
    assert np.array_equal(numpy_model.inv_freq, packed.rope.inv_freq.numpy())
    for lengths in ([7], [1, 5, 17, 40, 3], [120, 9]):
        samples = samples_of(lengths, seed=len(lengths))
        with torch.inference_mode():
            want = packed.query_states(samples)
        got = numpy_model.query_states(samples)
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)


def test_features_come_in_the_batches_of_the_torch_path(tmp_path):
    numpy_model = NumpyLlama.from_files(CFG, [random_llama(tmp_path, "F32")], THETA)
    samples = samples_of([4, 30, 11, 2, 25])
    feats = np_forward.features_per_sample(numpy_model, samples, batch_tokens=40, max_batch=2)
    whole = numpy_model.query_states(samples)
    assert [f.shape[0] for f in feats] == [len(s.query_pos) for s in samples]
    np.testing.assert_allclose(np.concatenate(feats), whole, rtol=1e-5, atol=1e-5)


def test_one_blas_thread_is_restored():
    api = np_forward._openblas_threads()
    if api is None:
        pytest.skip("no OpenBLAS found behind numpy here")
    get, _ = api
    before = get()
    with np_forward.one_blas_thread():
        assert get() == 1
    assert get() == before


# ---- top-k ---------------------------------------------------------------------------------------------


def test_item_chunk_is_the_torch_paths():
    assert np_forward.ITEM_CHUNK == ITEM_CHUNK


def reference_top_k(values: list[float], k: int) -> list[int]:
    """Best first, NaN first, equal values by index: the order both engines promise."""
    return sorted(
        range(len(values)),
        key=lambda j: (not math.isnan(values[j]), -values[j] if not math.isnan(values[j]) else 0, j),
    )[:k]


def test_both_engines_give_equal_scores_in_catalog_order():
    rng = random.Random(3)
    cases = 0
    for n in (1, 2, 3, 5, 17, 40, 65, 130, 700):
        for k in sorted({1, 2, 3, 5, 10, 33, n}):
            if k > n:
                continue
            for _ in range(4):
                levels = rng.choice([2, 3, 8, 1000])
                values = [float(rng.randrange(levels)) for _ in range(n)]
                for j in rng.sample(range(n), min(n, rng.choice([0, 0, 2]))):
                    values[j] = rng.choice([math.nan, -math.inf, math.inf])
                want = reference_top_k(values, k)
                _, pos = best_k(torch.tensor([values], dtype=torch.float32), k)
                assert pos[0].tolist() == want, (n, k, values)
                assert np_forward._best_first(np.array([values], np.float32))[0][:k].tolist() == want
                if all(math.isfinite(v) for v in values):  # through the whole top-k (inf * 0 is NaN)
                    w = np.eye(n, dtype=np.float32)  # scores = the values themselves
                    for chunk in (ITEM_CHUNK, 7):
                        _, idx = ilp_top_k(w, np.array([values], np.float32), k, item_chunk=chunk)
                        assert idx[0].tolist() == want, (n, k, chunk, values)
                cases += 1
    assert cases > 150


@pytest.mark.parametrize("item_chunk", [ITEM_CHUNK, 7, 10])
def test_ilp_top_k_equals_the_torch_top_k_with_ties_exclusions_and_a_large_k(item_chunk):
    g = torch.Generator().manual_seed(5)
    w = torch.randint(-2, 3, (40, 6), generator=g).float()  # small integers: exact scores, many ties
    h = torch.randint(-2, 3, (9, 6), generator=g).float()
    exclude = [
        [1, 2, 3],
        [],
        list(range(0, 40, 2)),
        list(range(38)),
        list(range(40)),
        [5, 5, 39],
        [],
        [0],
        [7],
    ]
    for k in (1, 3, 5, 12, 39, 40, 100):
        for ex in (None, exclude):
            want_s, want_i = top_k(w, h, k, exclude=ex, item_chunk=item_chunk)
            got_s, got_i = ilp_top_k(w.numpy(), h.numpy(), k, exclude=ex, item_chunk=item_chunk)
            assert got_s.dtype == np.float32 and got_i.dtype == np.int64
            assert np.array_equal(got_s, want_s.numpy())
            assert np.array_equal(got_i, want_i.numpy()), (k, ex is not None)


def test_ilp_top_k_on_distinct_scores():
    g = torch.Generator().manual_seed(6)
    w, h = torch.randn(300, 16, generator=g), torch.randn(5, 16, generator=g)
    want_s, want_i = top_k(w, h, 10)
    got_s, got_i = ilp_top_k(w.numpy(), h.numpy(), 10)
    assert np.array_equal(got_i, want_i.numpy())
    np.testing.assert_allclose(got_s, want_s.numpy(), rtol=1e-6, atol=1e-6)


# ---- recommend -----------------------------------------------------------------------------------------


def tiny_gqa_folder(out):
    """tiny-llama's files with grouped-query attention (2 key/value heads for 4 query heads) and bf16
    weights: the layout of SmolLM2-class backbones."""
    from safetensors.torch import load_file

    from st2si_cli.backbones.pull import write_tiny_model

    write_tiny_model(out, family="llama", hidden=64, layers=2, seed=1)
    cfg = json.loads((out / "config.json").read_text())
    hd = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg["num_key_value_heads"] = 2
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    for name in list(tensors):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            tensors[name] = tensors[name][: 2 * hd]
        tensors[name] = tensors[name].to(torch.bfloat16).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The toy dataset (two items retired), a GQA Llama with bf16 weights, an ILP head and an adapter
    head on it (fp32 features)."""
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.backbones.pull import _store_folder
    from st2si_cli.items import update_items
    from st2si_cli.model.adapter import AdapterConfig
    from st2si_cli.train.head import HeadConfig

    z = toy_zoo_with_llama(tmp_path_factory.mktemp("npzoo"))
    folder = tmp_path_factory.mktemp("gqa")
    tiny_gqa_folder(folder)
    _store_folder(z, folder, "tiny-gqa", {"family": "llama", "hidden": 64, "layers": 2})
    fp32 = FeatureOptions(dtype="fp32")
    adapt(z, "toy", backbone="tiny-gqa", head_cfg=HeadConfig(max_epochs=2), feature_opts=fp32, name="toy/ilp")
    adapter = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=1)
    adapt(z, "toy", backbone="tiny-gqa", head_cfg=adapter, feature_opts=fp32, name="toy/adapter")
    update_items(z, "toy", ["4", "9"], retire=True)
    return z


LINES = [
    {"user": "a", "history": ["1", "2", "3"]},
    {"user": "b", "history": [{"title": "red lamp wooden"}, "7", {"title": "Toy Story (1995)"}]},
    {"user": "c", "history": ["12"]},
    {"user": "d", "history": [str(i % 25) for i in range(30)]},
    {"user": "e", "history": ["5", {"id": "6"}, "4", "9"]},
]
TEXT = "".join(json.dumps(x) + "\n" for x in LINES)


def engine_answers(zoo, monkeypatch, engine, head, text=TEXT, **opts):
    """`recommend`'s rows for `text` from the given engine ("numpy" or "torch", which must be the one
    that answers), and whether it loaded a backbone."""
    monkeypatch.delenv("ST2SI_NO_NUMPY", raising=False)
    if engine == "torch":
        monkeypatch.setenv("ST2SI_NO_NUMPY", "1")
    rec = Recommender(zoo, "toy", RecommendOptions(head_ref=head, **opts))
    try:
        rows = rec.answer(rec.parse(enumerate(text.splitlines(), 1), "<test>"))
        model = rec._load()
        assert model.engine == engine
        return rows, model.model is not None
    finally:
        rec.close()


def answers(zoo, monkeypatch, engine, head="toy/ilp", **opts):
    return engine_answers(zoo, monkeypatch, engine, head, **opts)[0]


@pytest.mark.parametrize(
    "opts", [{"k": 5}, {"k": 5, "exclude_history": True}, {"k": 100, "exclude_history": True}, {"k": 1}]
)
def test_recommend_answers_equal_the_torch_paths(zoo, monkeypatch, opts):
    fast = answers(zoo, monkeypatch, "numpy", **opts)
    slow = answers(zoo, monkeypatch, "torch", **opts)
    assert fast == slow  # ids, titles, scores to 4 decimals, provenance, unresolved
    retired = {"4", "9"}
    assert all(not retired & {it["id"] for it in row["items"]} for row in fast)
    if opts["k"] == 100:  # every item left, then nothing: 25 - 2 retired - the history's own
        assert [len(r["items"]) for r in fast] == [20, 22, 22, 0, 21]


def test_recommend_runs_without_importing_torch(zoo, monkeypatch):
    probe = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('TORCH=%s\\n' % ('torch' in sys.modules)))\n"
    )
    args = ("recommend", "--domain", "toy", "--head", "toy/ilp", "--user-history", "-", "-k", "5")
    r = run_cli(zoo, *args, "--exclude-history", input=TEXT, prelude=probe)
    assert r.returncode == 0, r.stderr
    assert "TORCH=False" in r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert rows == answers(zoo, monkeypatch, "torch", k=5, exclude_history=True)


@pytest.mark.parametrize(
    "head, env, dtype",
    [
        ("toy/adapter", {}, "bf16"),  # an adapter reading features in bf16 (tests/test_np_heads.py: others)
        ("toy/ilp", {"ST2SI_NO_NUMPY": "1"}, None),
        ("toy/ilp", {"ST2SI_NO_FAST_LOAD": "1"}, None),
        ("toy/ilp", {}, "bf16"),  # torch computes bf16
        ("toy/ilp", {}, "auto"),  # torch decides (bf16 on CPUs that compute it natively)
    ],
)
def test_other_cases_keep_the_torch_path(zoo, monkeypatch, head, env, dtype):
    from st2si_cli.recommend import RecommendModel

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    model = RecommendModel(zoo, zoo.get(head, kind="head"), RecommendOptions(dtype=dtype))
    assert model.engine == "torch"
    monkeypatch.delenv("ST2SI_NO_NUMPY", raising=False)
    monkeypatch.delenv("ST2SI_NO_FAST_LOAD", raising=False)
    fp32 = RecommendModel(zoo, zoo.get("toy/ilp", kind="head"), RecommendOptions(dtype="fp32"))
    assert fp32.engine == "numpy"
