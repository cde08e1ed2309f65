"""Top-K tuning (`pretrain --tune-layers K`): the backbone cut at layer k, the activation cache (memory-mapped,
resumable), exactness against full tuning with the bottom frozen, and the stored result in eval."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_zoo, run_cli, toy_zoo_with_llama
from safetensors.torch import load_file

from st2si_cli.adapt import FeatureOptions, evaluate
from st2si_cli.errors import St2siError
from st2si_cli.model.layers import (
    FrozenBelowST2SI,
    n_layers,
    run_from,
    states_entering,
)
from st2si_cli.model.text import TextConfig
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.activations import CachePlan, cache_name, open_or_build, prefix_roots
from st2si_cli.pretrain.config import PretrainConfig
from st2si_cli.pretrain.corpus import build_corpus, epoch_samples
from st2si_cli.pretrain.full import pretrain
from st2si_cli.pretrain.weights import load_trainable

FAST = dict(epochs=2, lr=1e-3, batch_size=8)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """tiny-opt (2 layers, learned positions) and a 4-layer tiny Llama (rotary positions)."""
    return toy_zoo_with_llama(tmp_path_factory.mktemp("topzoo"))


def weights_of(zoo, art):
    return load_file(str(zoo.file(art, "model.safetensors")))


def one_process():
    return dist.DistInfo()  # rank 0 of 1, on the CPU


# ---- the backbone cut at layer k -------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["tiny-opt", "tiny-llama4"])
def test_layers_from_k_on_the_states_entering_k_give_the_full_forward(zoo, backbone):
    model, _ = load_trainable(zoo, zoo.get(backbone), "dot")
    model.eval()
    ids = torch.randint(3, 250, (3, 19))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).last_hidden_state
        for k in range(1, n_layers(model)):
            h = states_entering(model, ids, k)
            assert h.shape == full.shape
            torch.testing.assert_close(run_from(model, ids, h, k), full, rtol=0, atol=1e-6)
            # the states depend on the cut: layer k's input is not the embeddings
            assert not torch.allclose(h, states_entering(model, ids, 0))
    assert n_layers(model) == len([m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")])


def test_frozen_below_has_no_gradients_and_stays_in_eval_mode(zoo):
    model, _ = load_trainable(zoo, zoo.get("tiny-llama4"), "dot")
    module = FrozenBelowST2SI(model, 10, 3)
    module.train()
    tuned = {n for n, p in module.named_parameters() if p.requires_grad}
    assert tuned == {
        n for n, _ in module.named_parameters() if n.startswith(("backbone.layers.3.", "backbone.norm"))
    } | {"ilp.weight"}
    assert not model.embed_tokens.training and not model.layers[2].training and model.layers[3].training


# ---- exactness -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "k"), [("tiny-opt", 1), ("tiny-llama4", 2), ("tiny-llama4", 1)])
def test_top_k_on_cached_activations_equals_full_tuning_with_the_bottom_frozen(zoo, backbone, k):
    """Same seed, same batches: after every step the weights agree within fp32 tolerance (fp32 cache)."""

    def run(cache: bool, out: str):
        steps: list[dict] = []

        def keep(info):
            steps.append({n: v.detach().clone() for n, v in info["module"].state_dict().items()})

        cfg = PretrainConfig(**FAST, tune_layers=k, activation_cache=cache, cache_dtype="fp32")
        res = pretrain(zoo, ["toy"], backbone=backbone, cfg=cfg, out=out, device="cpu", on_step=keep)
        return res, steps

    top, top_steps = run(True, f"{backbone}-top")
    frozen, frozen_steps = run(False, f"{backbone}-frozen")
    assert len(top_steps) == len(frozen_steps) > 10
    for a, b in zip(top_steps, frozen_steps):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=2e-5)
    assert [r["loss"] for r in top.history] == pytest.approx([r["loss"] for r in frozen.history], abs=1e-5)
    # The stored backbone: the bottom as it came, the top tuned.
    src, tuned = weights_of(zoo, zoo.get(backbone)), weights_of(zoo, top.backbone)
    assert src.keys() == tuned.keys()
    layer = lambda i: "decoder.layers" if backbone == "tiny-opt" else "layers"  # noqa: E731
    last = n_layers(load_trainable(zoo, zoo.get(backbone), "dot")[0]) - 1
    for name in src:
        below = f"{layer(0)}.0." in name or "embed" in name
        top_layer = f"{layer(0)}.{last}." in name
        if below:
            assert torch.equal(src[name], tuned[name]), name
        if top_layer and name.endswith("weight"):
            assert not torch.equal(src[name], tuned[name]), name
    cache = top.run.meta["timings"]["activation_cache"]
    # each training input is a prefix of the same user's validation input: stored once
    assert cache["tokens_stored"] < cache["tokens"]
    assert cache["layer"] == last + 1 - k and cache["dtype"] == "fp32" and cache["bytes"] > 0
    assert top.run.meta["flags"]["tune-layers"] == k and frozen.run.meta["flags"]["no-activation-cache"]


def test_the_result_is_a_backbone_and_head_that_eval_uses_unchanged(zoo):
    res = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-llama4",
        cfg=PretrainConfig(**FAST, tune_layers=2),
        out="top2",
        device="cpu",
    )
    assert res.backbone.name == "top2" and res.heads["toy"].meta["backbone"] == res.backbone.id
    assert res.heads["toy"].meta["method"] == "top-layers"
    assert res.run.meta["timings"]["final_eval"] == "whole forward"  # a bf16 cache is not eval's arithmetic
    result = evaluate(zoo, "toy", backbone="top2", feature_opts=FeatureOptions(dtype="fp32"))
    assert result["head_id"] == res.heads["toy"].id
    for m in ("NDCG@10", "Recall@10", "MRR"):
        assert result["metrics"][m] == pytest.approx(res.run.meta["metrics"]["test"][m], abs=1e-6)
    assert not list((zoo.root / "tmp").glob("activations-*"))  # the staging folder went


def test_on_an_fp32_cache_the_final_evaluation_reads_the_cache_and_gives_evals_metrics(zoo):
    """The cache holds the final evaluation's inputs too (each history whole, costing only its last item
    in tokens stored); on an fp32 cache the final metrics come from it, and equal what `st2si eval`
    computes through the whole stored backbone."""
    res = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-llama4",
        cfg=PretrainConfig(**FAST, tune_layers=1, cache_dtype="fp32"),
        out="top1-fp32",
        device="cpu",
    )
    timings = res.run.meta["timings"]
    assert timings["final_eval"] == "activation cache"
    for split in ("valid", "test"):
        result = evaluate(
            zoo, "toy", backbone="top1-fp32", split=split, feature_opts=FeatureOptions(dtype="fp32")
        )
        assert result["head_id"] == res.heads["toy"].id
        for m in ("NDCG@10", "Recall@10", "MRR"):
            assert result["metrics"][m] == pytest.approx(res.run.meta["metrics"][split][m], abs=1e-6)
    # the run keeps each user's valid and test rank, in the order of the users: its metrics again
    from st2si_cli.metrics import metrics_from_ranks

    ranks = json.loads(zoo.file(res.run, "ranks.json").read_text())["toy"]
    for split in ("valid", "test"):
        user_ranks = [int(r) for r in ranks[split].split()]
        assert len(user_ranks) == 40
        assert metrics_from_ranks(user_ranks, (10,))["NDCG@10"] == pytest.approx(
            res.run.meta["metrics"]["domains"]["toy"][split]["NDCG@10"], abs=1e-9
        )
    # stored: each history's whole input and each alignment sample, once (the rest are their prefixes)
    _model, tokenizer = load_trainable(zoo, zoo.get("tiny-llama4"), "dot")
    corpus = build_corpus(zoo, [zoo.get("toy", kind="dataset")], tokenizer, TextConfig(query="dot"))
    assert timings["activation_cache"]["tokens_stored"] == sum(len(s.tokens) for s in corpus.eval_samples)


def test_histories_longer_than_a_window_store_their_earlier_windows_too(zoo):
    """With windows of 4 items, a longer history's training input is a window the newest one does not
    start with: it is stored beside the whole-history inputs, and the run reads everything it needs
    (the final evaluation from the fp32 cache still equals eval's metrics)."""
    text = TextConfig(query="dot", max_items=4)
    res = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-llama4",
        text=text,
        cfg=PretrainConfig(**FAST, tune_layers=1, cache_dtype="fp32"),
        out="top1-windows",
        device="cpu",
    )
    _model, tokenizer = load_trainable(zoo, zoo.get("tiny-llama4"), "dot")
    corpus = build_corpus(zoo, [zoo.get("toy", kind="dataset")], tokenizer, text)
    cache = res.run.meta["timings"]["activation_cache"]
    assert cache["tokens_stored"] > sum(len(s.tokens) for s in corpus.eval_samples)
    assert res.run.meta["timings"]["final_eval"] == "activation cache"
    result = evaluate(zoo, "toy", backbone="top1-windows", feature_opts=FeatureOptions(dtype="fp32"))
    for m in ("NDCG@10", "Recall@10", "MRR"):
        assert result["metrics"][m] == pytest.approx(res.run.meta["metrics"]["test"][m], abs=1e-6)


def test_every_training_setting_reads_the_same_cache(zoo):
    """Without alignment samples, or with the last query only, a run reads the cache the default run
    built: the same inputs, or prefixes of them, are stored. (fp32: the bf16 top-1 cache is left for the
    CLI test below to build.)"""
    runs = [
        pretrain(
            zoo,
            ["toy"],
            backbone="tiny-llama4",
            cfg=PretrainConfig(**FAST, tune_layers=1, cache_dtype="fp32", **flags),
            out=f"shared-cache-{i}",
            device="cpu",
        )  # fmt: skip
        for i, flags in enumerate([{}, {"alignment": False}, {"multi_query": False}])
    ]
    caches = [r.run.meta["timings"]["activation_cache"] for r in runs]
    assert len({c["artifact"] for c in caches}) == 1
    assert [c["reused"] for c in caches[1:]] == [True, True]


def test_k_equal_to_the_layer_count_is_full_tuning(zoo):
    full = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=PretrainConfig(**FAST), out="full-a", device="cpu")
    same = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-opt",
        cfg=PretrainConfig(**FAST, tune_layers=2),
        out="full-b",
        device="cpu",
    )
    assert same.run.meta["config"]["key"] == full.run.meta["config"]["key"]
    assert same.run.meta["flags"]["tune-layers"] is None
    a, b = weights_of(zoo, full.backbone), weights_of(zoo, same.backbone)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_init_head_starts_the_ilp_from_an_adapt_ilp_head(tmp_path):
    zoo = toy_zoo_with_llama(tmp_path / "zoo")  # its own: no cache shared with others
    from st2si_cli.adapt import adapt
    from st2si_cli.heads.store import load_head_tensors
    from st2si_cli.train.head import HeadConfig

    opts = FeatureOptions(dtype="fp32")
    head = adapt(zoo, "toy", backbone="tiny-llama4", head_cfg=HeadConfig(max_epochs=2), feature_opts=opts)
    start = load_head_tensors(zoo, head)["weight"]
    seen: list[torch.Tensor] = []

    def first_step(info):
        if not seen:
            seen.append(info["module"].ilp.weight.detach().clone())

    # lr 0: the rows stay what the head had; the stored head and the run record name it
    cfg = PretrainConfig(epochs=1, lr=0.0, batch_size=8, tune_layers=1, init_heads=(head.name,))
    res = pretrain(
        zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out="top1-init", device="cpu", on_step=first_step
    )
    assert torch.equal(seen[0], start)
    assert torch.equal(load_head_tensors(zoo, res.heads["toy"])["weight"], start)
    assert res.run.meta["config"]["train"]["init_heads"] == [head.id]
    assert res.run.meta["inputs"]["init_heads"] == [head.id] and res.run.meta["flags"]["init-head"] == 1
    # the same run from random rows has another key
    rnd = pretrain(
        zoo,
        ["toy"],
        backbone="tiny-llama4",
        cfg=PretrainConfig(epochs=1, lr=0.0, batch_size=8, tune_layers=1),
        out="top1-rnd",
        device="cpu",
    )
    assert rnd.run.meta["config"]["key"] != res.run.meta["config"]["key"]
    assert not torch.equal(load_head_tensors(zoo, rnd.heads["toy"])["weight"], start)
    # a head of another backbone, or not an ILP head, is a one-line error before anything runs
    other = adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=1), feature_opts=opts)
    for bad in (other.name, "no-such-head"):
        with pytest.raises(St2siError):
            pretrain(
                zoo,
                ["toy"],
                backbone="tiny-llama4",
                cfg=PretrainConfig(epochs=1, tune_layers=1, init_heads=(bad,)),
                out="x",
                device="cpu",
            )


# ---- the activation cache ----------------------------------------------------------------------------------


def _cache_inputs(zoo, backbone="tiny-llama4", k=2):
    model, tokenizer = load_trainable(zoo, zoo.get(backbone), "dot")
    model.eval()
    corpus = build_corpus(zoo, [zoo.get("toy", kind="dataset")], tokenizer, TextConfig())
    samples = epoch_samples(corpus, PretrainConfig(), 1)
    plan = CachePlan(identity={"test": backbone}, first_layer=k, shard_tokens=1500)
    return model, samples, plan


def test_a_killed_activation_pass_resumes_to_identical_activations(zoo, tmp_path):
    model, samples, plan = _cache_inputs(zoo)
    other = build_zoo(tmp_path / "other", {})
    _, whole = open_or_build(other, model, samples, plan, one_process())

    done: list[int] = []

    def die(n: int) -> None:
        done.append(n)
        if len(done) == 2:
            raise KeyboardInterrupt

    plan.on_shard = die
    before = len(zoo.ls())
    with pytest.raises(KeyboardInterrupt):
        open_or_build(zoo, model, samples, plan, one_process())
    assert len(zoo.ls()) == before and zoo.find(cache_name(plan.key()), kind="features") is None
    staged = sorted((zoo.root / "tmp" / cache_name(plan.key())).glob("shard-*.safetensors"))
    assert len(staged) == 2
    done.clear()
    plan.on_shard = done.append
    art, resumed = open_or_build(zoo, model, samples, plan, one_process())
    assert 0 not in done and 1 not in done and len(done) == art.meta["shards"] - 2  # only the missing shards
    assert art.meta["timings"]["tokens_computed"] < art.meta["tokens"]
    assert len(resumed) == len(whole) == len(samples)
    for i in range(len(samples)):
        assert torch.equal(resumed.get(i), whole.get(i)), i
    # bf16, and what a full forward stopped at layer k gives (up to bf16 rounding)
    i = max(range(len(samples)), key=lambda j: len(samples[j].tokens))
    with torch.no_grad():
        ref = states_entering(model, torch.tensor([samples[i].tokens]), plan.first_layer)[0]
    assert resumed.get(i).dtype == torch.bfloat16 and resumed.get(i).shape == ref.shape
    torch.testing.assert_close(resumed.get(i).float(), ref, rtol=1e-2, atol=1e-2)


def test_prefix_roots_share_rows_only_between_a_sample_and_a_longer_or_equal_one_of_its_owner():
    from st2si_cli.model.samples import Sample

    samples = [
        Sample([1, 2, 3], [2], [7], [0], owner=0),
        Sample([1, 2, 3, 4, 5], [4], [8], [1], owner=0),
        Sample([1, 2], [1], [9], [3], owner=1),  # a prefix of owner 0's, but another owner
        Sample([1, 2, 3, 4], [3], [8], [1], owner=0),
        Sample([1, 9, 3], [2], [7], [0], owner=0),
        Sample([1, 2], [1], [9], [3], owner=1),  # the same as sample 2: reads it
        Sample([1, 9, 3], [1, 2], [5, 7], [1, 2], owner=0),  # the same tokens as sample 4
        Sample([1, 2, 3, 4, 5], [4], [8], [1], owner=0),  # a repeat of the longest: reads the first
    ]
    assert prefix_roots(samples) == [1, 1, 2, 1, 4, 2, 4, 1]


def test_cache_reads_are_memory_mapped_slices(zoo):
    model, samples, plan = _cache_inputs(zoo, "tiny-opt", 1)
    art, cache = open_or_build(zoo, model, samples, plan, one_process())
    assert art.meta["shards"] > 1 and art.meta["type"] == "activations"
    row = cache.get(3)
    # a view into the shard's memory map (pages read when touched), not a copy of the shard
    maps = Path("/proc/self/maps").read_text()
    shards = [
        os.path.realpath(zoo.file(art, f"shard-{n:05d}.safetensors")) for n in range(art.meta["shards"])
    ]
    assert all(path in maps for path in shards)
    assert row.untyped_storage().nbytes() > row.numel() * 2 == row.nbytes
    batch = cache.batch([3, 0], "cpu")
    n = len(samples[3].tokens)
    assert batch.dtype == torch.float32 and batch.shape[1] == max(n, len(samples[0].tokens))
    assert torch.equal(batch[0, :n], row.float()) and not batch[0, n:].any()


# ---- settings and errors ----------------------------------------------------------------------------------


def test_bad_top_k_settings_are_one_line_errors(zoo):
    for cfg, pattern in [
        (PretrainConfig(tune_layers=5), "has 2 layers"),
        (PretrainConfig(tune_layers=1, sampling="crop"), "--no-activation-cache"),
        (PretrainConfig(tune_layers=-1), "tune_layers"),
        (PretrainConfig(tune_layers=1, cache_dtype="int8"), "cache_dtype"),
    ]:
        with pytest.raises(St2siError, match=pattern):
            pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, device="cpu")


def test_cli_tune_layers_prints_the_cache_and_reuses_it(zoo):
    args = ("pretrain", "--domain", "toy", "--backbone", "tiny-llama4", "--tune-layers", "1", "--epochs", "1")
    r = run_cli(zoo, *args, "--out", "cli-top1", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "Activation cache (states entering layer 3)" in r.stderr and "built in" in r.stderr
    r = run_cli(zoo, *args, "--out", "cli-top1b", "--json", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["flags"]["tune-layers"] == 1 and out["timings"]["activation_cache"]["reused"]
    assert out["backbone"] == "cli-top1b"


@pytest.mark.deepspeed
@pytest.mark.parametrize("preset", ["zero2", "zero3"])
def test_deepspeed_in_process_matches_plain_top_k(zoo, preset, monkeypatch):
    """One-rank DeepSpeed (gloo) with --tune-layers: the plain run's steps and stored weights."""
    pytest.importorskip("deepspeed")

    def run(ds, out):
        last: dict = {}
        cfg = PretrainConfig(**FAST, tune_layers=2)

        def keep(info):
            last.update({n: v.detach().clone() for n, v in info["module"].state_dict().items()})

        res = pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out=out, deepspeed=ds, on_step=keep)
        return res, last

    plain, plain_last = run(None, f"plain-{preset}")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(dist.free_port()))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds, ds_last = run(preset, f"ds-{preset}")
    assert [r["loss"] for r in ds.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-5)
    for name, v in plain_last.items():
        torch.testing.assert_close(ds_last[name], v, rtol=0, atol=2e-5)
    a, b = weights_of(zoo, plain.backbone), weights_of(zoo, ds.backbone)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5)
    assert ds.run.meta["flags"]["deepspeed"] == preset and ds.run.meta["flags"]["tune-layers"] == 2


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process_on_the_combined_batch(zoo, tmp_path):
    """--tune-layers under torchrun (2 ranks x batch 4, gloo DDP; the ranks share the cache pass)
    == 1 process x batch 8, which finds the cache the 2 ranks built."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    common = ["--domain", "toy", "--backbone", "tiny-llama4", "--tune-layers", "3", "--epochs", "2"]
    common += ["--lr", "1e-3", "--device", "cpu"]
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(dist.free_port()), "-m", "st2si_cli"]
    cmd += ["--zoo", str(zoo.root), "pretrain", *common, "--batch-size", "4", "--out", "two-b4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ST2SI_NO_PROGRESS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    one = run_cli(
        zoo, "pretrain", *common, "--batch-size", "8", "--out", "one-b8", env={"OMP_NUM_THREADS": "1"}
    )
    assert one.returncode == 0, one.stderr
    a, b = weights_of(zoo, zoo.get("one-b8")), weights_of(zoo, zoo.get("two-b4"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5)
    two = zoo.get("run/two-b4").meta
    assert two["world_size"] == 2 and not two["timings"]["activation_cache"]["reused"]
    assert zoo.get("run/one-b8").meta["timings"]["activation_cache"]["reused"]
