"""The packed Llama forward (model/fast.py) against the plain transformers forward it replaces."""

from __future__ import annotations

import pytest
import torch

from st2si_cli.backbones.load import load_backbone
from st2si_cli.backbones.pull import pull
from st2si_cli.data.prepare import load_dataset
from st2si_cli.model.fast import supports
from st2si_cli.model.samples import build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig


def both_paths(backbone, samples, max_batch=5, autocast=None):
    """Query features of `samples` in length-sorted batches: (plain transformers path, packed path).
    `autocast`: a dtype to run both under CPU autocast (as validation during full tuning does)."""
    model = backbone.st2si()
    batches = plan_batches([len(s.tokens) for s in samples], 4096, max_batch)
    out = {}
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=bool(autocast)),
    ):
        for packed in (False, True):
            model.packed = packed
            feats = {}
            for b in batches:
                h = model.hidden_at([samples[i] for i in b])
                sizes = [len(samples[i].query_pos) for i in b]
                feats.update(zip(b, h.split(sizes)))
            out[packed] = torch.cat([feats[i] for i in range(len(samples))]).float()
    model.packed = True
    return out[False], out[True]


def toy_samples(zoo, backbone, n=30):
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    return samples[: n // 2] + samples[-n // 2 :]  # histories of several lengths and alignment samples


def test_packed_forward_equals_the_plain_forward_in_fp32(zoo):
    bb = load_backbone(zoo, "tiny-llama", dtype="fp32")
    assert supports(bb.model)
    plain, packed = both_paths(bb, toy_samples(zoo, bb))
    assert plain.shape == packed.shape and plain.shape[0] > 30
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)


def test_packed_forward_is_within_bf16_rounding_in_bf16(zoo):
    bb = load_backbone(zoo, "tiny-llama", dtype="bf16")
    plain, packed = both_paths(bb, toy_samples(zoo, bb))
    torch.testing.assert_close(packed, plain, rtol=1.6e-2, atol=1e-2)


def test_packed_forward_runs_under_autocast_with_fp32_weights(zoo):
    # Validation inside full tuning on a GPU: fp32 master weights under bf16 autocast. Rotary tables
    # stay fp32 there while SDPA returns bf16, so every copy between them must cast.
    bb = load_backbone(zoo, "tiny-llama", dtype="fp32")
    plain, packed = both_paths(bb, toy_samples(zoo, bb), autocast=torch.bfloat16)
    torch.testing.assert_close(packed, plain, rtol=3e-2, atol=3e-2)


def test_other_families_and_training_keep_the_plain_forward(zoo):
    assert not supports(load_backbone(zoo, "tiny-opt", dtype="fp32").model)
    bb = load_backbone(zoo, "tiny-llama", dtype="fp32")
    samples = toy_samples(zoo, bb, 4)
    model = bb.st2si()
    with torch.enable_grad():
        h = model.hidden_at(samples)
    assert h.requires_grad  # autograd needs the transformers modules, not the fused copies


def test_packed_weights_follow_in_place_updates(zoo):
    """Fused copies are rebuilt after a weight changes in place (a pretraining step, then features)."""
    bb = load_backbone(zoo, "tiny-llama", dtype="fp32")
    samples = toy_samples(zoo, bb, 6)
    model = bb.st2si()
    with torch.inference_mode():
        before = model.hidden_at(samples)
    with torch.no_grad():
        bb.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    plain, packed = both_paths(bb, samples)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, before.float())


@pytest.mark.slow
def test_packed_forward_on_smollm2_is_within_bf16_rounding(zoo, one_thread):
    pull(zoo, "smollm2-135m")
    bb = load_backbone(zoo, "smollm2-135m", dtype="bf16")
    plain, packed = both_paths(bb, toy_samples(zoo, bb, 12), max_batch=4)
    # Per feature vector: bf16 rounding over 30 layers (attention shapes differ from the plain path's
    # padded batch, so the SDPA blocks round differently), not a different computation.
    cos = torch.nn.functional.cosine_similarity(plain, packed, dim=-1)
    rel = (packed - plain).norm(dim=-1) / plain.norm(dim=-1)
    assert cos.min() > 0.999 and rel.max() < 2e-2, (float(cos.min()), float(rel.max()))


def test_attention_groups_cover_every_token_once_with_bounded_padding():
    from st2si_cli.model.fast import attention_groups

    lengths = [30, 7, 29, 100, 8, 95, 1, 26]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    groups = attention_groups(lengths, starts, "cpu", fill=0.8)
    tokens = torch.cat([g.tokens for g in groups]).sort().values
    assert torch.equal(tokens, torch.arange(sum(lengths)))
    for g in groups:
        assert g.slot.numel() == g.tokens.numel() and int(g.slot.max()) < g.rows * g.width
        assert g.tokens.numel() >= 0.8 * g.rows * g.width - g.rows  # padding under 20% (+ rounding)
    assert [g.rows for g in groups if g.width == 100] == [2]


@pytest.mark.parametrize("tune_layers", [0, 1])
def test_pretrain_under_bf16_autocast_validates_through_the_packed_forward(zoo, tune_layers):
    # What a GPU run does (fp32 weights, bf16 autocast, packed validation), on the CPU.
    from st2si_cli.pretrain.config import PretrainConfig
    from st2si_cli.pretrain.full import pretrain

    cfg = PretrainConfig(epochs=1, lr=1e-3, batch_size=8, precision="bf16", tune_layers=tune_layers)
    res = pretrain(zoo, ["toy"], backbone="tiny-llama", cfg=cfg, out=f"bf16-top{tune_layers}", device="cpu")
    assert res.run.meta["config"]["precision"] == "bf16"
    test = res.run.meta["metrics"]["test"]
    assert 0.0 <= test["NDCG@10"] <= 1.0 and test["n_users"] > 0


@pytest.mark.parametrize("k", [0, 1])
def test_packed_states_entering_a_layer_equal_the_plain_forward_stopped_there(zoo, k):
    # The activation cache of top-K tuning: every token's state entering layer k, samples concatenated.
    from st2si_cli.model.fast import PackedLlama
    from st2si_cli.model.layers import states_entering

    bb = load_backbone(zoo, "tiny-llama", dtype="fp32")
    samples = toy_samples(zoo, bb, 10)
    with torch.inference_mode():
        packed = PackedLlama(bb.model).states_entering(samples, k)
        plain = [states_entering(bb.model, torch.tensor([s.tokens]), k)[0] for s in samples]
    assert packed.shape == (sum(len(s.tokens) for s in samples), plain[0].shape[1])
    torch.testing.assert_close(packed, torch.cat(plain), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        PackedLlama(bb.model).states_entering(samples, 99)


def test_top_k_on_a_llama_caches_through_the_packed_pass_in_bf16_and_fp32(zoo):
    from st2si_cli.pretrain.config import PretrainConfig
    from st2si_cli.pretrain.full import pretrain

    cfg = PretrainConfig(epochs=1, lr=1e-3, batch_size=8, precision="bf16", tune_layers=1)
    res = pretrain(zoo, ["toy"], backbone="tiny-llama", cfg=cfg, out="bf16-packed-cache", device="cpu")
    cache = zoo.get(res.run.meta["timings"]["activation_cache"]["artifact"])
    assert cache.meta["pass"] == "packed" and cache.meta["precision"] == "bf16"
    cfg32 = PretrainConfig(epochs=1, lr=1e-3, batch_size=8, tune_layers=1, precision="fp32")
    res32 = pretrain(zoo, ["toy"], backbone="tiny-llama", cfg=cfg32, out="fp32-plain-cache", device="cpu")
    assert zoo.get(res32.run.meta["timings"]["activation_cache"]["artifact"]).meta["pass"] == "packed"
    opt = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg32, out="fp32-opt-cache", device="cpu")
    assert zoo.get(opt.run.meta["timings"]["activation_cache"]["artifact"]).meta["pass"] == "plain"
