"""What moves in `pretrain` and how (`--dropout`, `--lora`, `--head-lr`), and the checks that rule out a
defect before blaming the method: at learning rate 0 nothing moves, and a few users can be memorised."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli, toy_zoo_with_llama
from safetensors.torch import load_file

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.errors import St2siError
from st2si_cli.model.layers import TopST2SI, n_layers
from st2si_cli.model.st2si import ST2SI
from st2si_cli.pretrain.config import PretrainConfig, check_config
from st2si_cli.pretrain.full import pretrain
from st2si_cli.pretrain.tuning import add_dropout, add_lora, lora_targets, merge_lora, param_groups
from st2si_cli.pretrain.weights import load_trainable
from st2si_cli.train.head import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = "tiny-llama4"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return toy_zoo_with_llama(tmp_path_factory.mktemp("tuningzoo"))


def weights_of(zoo, art):
    return load_file(str(zoo.file(art, "model.safetensors")))


def valid_points(res):
    return [r["valid_NDCG@10"] for r in res.history]


# ---- ruling out a defect ------------------------------------------------------------------------------


@pytest.mark.parametrize("tune_layers", [0, 2])
def test_at_learning_rate_zero_every_validation_point_equals_the_start(zoo, tune_layers):
    head = adapt(
        zoo,
        "toy",
        backbone=LLAMA,
        head_cfg=HeadConfig(max_epochs=2),
        feature_opts=FeatureOptions(dtype="fp32"),
    )
    cfg = PretrainConfig(
        epochs=3,
        patience=5,
        lr=0.0,
        batch_size=8,
        tune_layers=tune_layers,
        init_heads=(head.name,),
        dropout=0.1,
    )
    res = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out=f"lr0-{tune_layers}", device="cpu")
    points = valid_points(res)
    assert len(points) == 4 and res.history[0]["steps"] == 0  # the start, then three epoch ends
    assert all(p == points[0] for p in points), points  # exactly, not approximately
    src, out = weights_of(zoo, zoo.get(LLAMA)), weights_of(zoo, res.backbone)
    assert all(torch.equal(src[n], out[n]) for n in src)


def test_a_few_users_are_memorised(zoo, monkeypatch):
    """Validated on the training targets themselves, full tuning reaches the top ranks: the gradient
    path (targets, query positions, the loss) has no defect."""
    from st2si_cli.model.samples import Sample
    from st2si_cli.pretrain import full, loop

    def train_as_valid(run, corpus, pad_id):
        data = loop.full_data(run, corpus, pad_id)
        train = data.samples(1)
        data.valid = [
            Sample(
                s.tokens[: s.query_pos[-1] + 1], [s.query_pos[-1]], [s.targets[-1]], [s.roles[-1]], s.owner
            )
            for s in train
        ]
        return data

    monkeypatch.setattr(full, "full_data", train_as_valid)
    cfg = PretrainConfig(epochs=30, patience=30, lr=3e-3, warmup_steps=0, batch_size=8, alignment=False)
    res = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="memorise", device="cpu")
    points = valid_points(res)
    assert max(points) > 0.9, points
    assert res.history[-1]["loss"] < 0.2 * res.history[0]["loss"]


# ---- dropout ------------------------------------------------------------------------------------------


def test_dropout_acts_on_the_tuned_layers_in_training_only(zoo):
    model, _ = load_trainable(zoo, zoo.get(LLAMA), "dot")
    ids = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        model.eval()
        plain = model(input_ids=ids).last_hidden_state
        handles = add_dropout(model, 0.5, first_layer=2)
        assert len(handles) == 2 * (n_layers(model) - 2)  # attention and MLP output of layers 2, 3
        assert torch.equal(model(input_ids=ids).last_hidden_state, plain)  # eval: no dropout
        model.train()
        a, b = model(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state
        assert not torch.equal(a, b)
        for h in handles:
            h.remove()
        assert torch.equal(model(input_ids=ids).last_hidden_state, plain)  # Llama itself has none


def test_new_options_enter_the_run_key_only_when_set():
    base = PretrainConfig().result_dict()
    assert not {"dropout", "lora", "head_lr"} & set(base)  # runs from before keep their keys
    assert PretrainConfig(dropout=0.1).result_dict()["dropout"] == 0.1
    assert PretrainConfig(lora=8).result_dict()["lora"] == 8
    assert PretrainConfig(head_lr=1e-3).result_dict()["head_lr"] == 1e-3
    for bad in (PretrainConfig(dropout=1.0), PretrainConfig(lora=-1), PretrainConfig(head_lr=-1.0)):
        with pytest.raises(St2siError):
            check_config(bad, ["toy"])


# ---- LoRA ---------------------------------------------------------------------------------------------


def test_lora_starts_at_the_frozen_model_trains_only_itself_and_merges_into_plain_weights(zoo):
    model, _ = load_trainable(zoo, zoo.get(LLAMA), "dot")
    model.eval()
    ids = torch.randint(3, 50, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).last_hidden_state
    module = TopST2SI(model, 7, 2, pad_id=0, seed=0)
    add_lora(model, 4, first_layer=2)
    targets = lora_targets(model, 2)
    assert targets and all(".layers.2." in t or ".layers.3." in t or t.startswith("layers.") for t in targets)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert "ilp.weight" in trainable
    assert all(".lora_" in n for n in trainable if n != "ilp.weight")
    assert not any(".layers.0." in n or ".layers.1." in n for n in trainable)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=ids).last_hidden_state, before)  # B = 0 at the start
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
        with_lora = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(with_lora, before)
    merged = merge_lora(model.state_dict())
    assert not any(".lora_" in k or ".base_layer." in k for k in merged)
    plain, _ = load_trainable(zoo, zoo.get(LLAMA), "dot")
    plain.load_state_dict(merged, strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).last_hidden_state, with_lora, rtol=1e-4, atol=1e-5)


def test_pretrain_with_lora_stores_a_plain_backbone_changed_only_in_the_tuned_layers(zoo):
    cfg = PretrainConfig(epochs=2, lr=1e-2, batch_size=8, tune_layers=2, lora=2, dropout=0.1)
    res = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="lora2", device="cpu")
    src, out = weights_of(zoo, zoo.get(LLAMA)), weights_of(zoo, res.backbone)
    assert set(src) == set(out)
    changed = {n for n in src if not torch.equal(src[n], out[n])}
    assert changed and all(".layers.2." in n or ".layers.3." in n for n in changed), changed
    assert all(n.endswith("proj.weight") for n in changed)  # norms stay: only LoRA's linear layers move
    assert res.run.meta["flags"]["lora"] == 2 and res.run.meta["flags"]["dropout"] == 0.1
    assert res.backbone.name == "lora2"
    # the stored head and backbone are what eval reads: its test figure is the run's own
    result = evaluate(zoo, "toy", head_ref=res.heads["toy"].name, feature_opts=FeatureOptions(dtype="fp32"))
    want = res.run.meta["metrics"]["domains"]["toy"]["test"]["NDCG@10"]
    assert result["metrics"]["NDCG@10"] == pytest.approx(want, abs=1e-6)


# ---- the ILP's learning rate --------------------------------------------------------------------------


def test_head_lr_is_a_group_of_its_own(zoo):
    model, _ = load_trainable(zoo, zoo.get(LLAMA), "dot")
    module = ST2SI(model, 7, pad_id=0, seed=0)
    groups = param_groups(module, 1e-5, 1e-3)
    assert [g["lr"] for g in groups] == [1e-5, 1e-3] and groups[1]["params"] == [module.ilp.weight]
    assert len(param_groups(module, 1e-5, None)) == 1


def test_backbone_lr_zero_with_a_head_lr_moves_only_the_ilp(zoo):
    cfg = PretrainConfig(epochs=1, lr=0.0, head_lr=1e-2, batch_size=8, tune_layers=1)
    res = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="headlr", device="cpu")
    src, out = weights_of(zoo, zoo.get(LLAMA)), weights_of(zoo, res.backbone)
    assert all(torch.equal(src[n], out[n]) for n in src)
    assert res.run.meta["flags"]["head-lr"] == 1e-2


def test_cli_takes_the_options_and_refuses_bad_values(zoo):
    r = run_cli(zoo, "pretrain", "--domain", "toy", "--backbone", LLAMA, "--dropout", "2")
    assert r.returncode == 2 and "--dropout" in r.stderr
    r = run_cli(zoo, "pretrain", "--domain", "toy", "--backbone", LLAMA, "--head-lr", "0")
    assert r.returncode == 2 and "--head-lr" in r.stderr
    args = ["pretrain", "--domain", "toy", "--backbone", LLAMA, "--epochs", "1", "--batch-size", "8"]
    r = run_cli(
        zoo, *args, "--tune-layers", "1", "--lora", "2", "--head-lr", "1e-2", "--json", "--out", "cli-lora"
    )
    assert r.returncode == 0, r.stderr
    flags = json.loads(r.stdout)["flags"]
    assert flags["lora"] == 2 and flags["head-lr"] == 1e-2


@pytest.mark.deepspeed
def test_deepspeed_in_process_matches_plain_with_lora_dropout_and_head_lr(zoo, monkeypatch):
    """One-rank DeepSpeed ZeRO-2 (gloo) takes the new options as the plain engine does."""
    pytest.importorskip("deepspeed")
    from st2si_cli.pretrain import distributed as dist

    # dropout draws from the same seeded generator on both engines
    cfg = PretrainConfig(epochs=1, lr=1e-2, head_lr=3e-2, batch_size=8, tune_layers=2, lora=2, dropout=0.1)
    plain = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="ds-plain-lora")
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MASTER_PORT", str(dist.free_port()))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    ds = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="ds-lora", deepspeed="zero2")
    assert [r["loss"] for r in ds.history] == pytest.approx([r["loss"] for r in plain.history], abs=1e-5)
    a, b = weights_of(zoo, plain.backbone), weights_of(zoo, ds.backbone)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=2e-5)


def test_the_recipe_runs_on_a_tuned_backbone(zoo):
    """A backbone that pretrain stored (LoRA folded in) is one like any other: the recipe adapts on it."""
    from st2si_cli.model.adapter import AdapterConfig
    from st2si_cli.recipe.run import run_recipe
    from st2si_cli.recipe.settings import RecipeStages

    cfg = PretrainConfig(epochs=1, lr=1e-2, batch_size=8, tune_layers=1, lora=2)
    tuned = pretrain(zoo, ["toy"], backbone=LLAMA, cfg=cfg, out="lora-for-recipe", device="cpu").backbone
    stages = RecipeStages(
        seeds=1,
        sweep_trials=1,
        adapter_base=AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, max_epochs=2),
        ilp_base=HeadConfig(max_epochs=2),
    )
    result = run_recipe(
        zoo, "toy", backbone=tuned.name, feature_opts=FeatureOptions(dtype="fp32"), stages=stages
    )
    assert result.chosen is not None
    assert all(s.head.meta["backbone"] == tuned.id for s in result.stages if s.head is not None)
