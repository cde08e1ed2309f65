"""The recipe `st2si adapt --domain D` runs without --head: stages stored as heads, the final choice on
validation, reruns that reuse, a budget that stops cleanly and continues, a killed run that resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO, cli_env, run_cli

from st2si_cli.adapt import FeatureOptions
from st2si_cli.heads.choice import default_head, id_only
from st2si_cli.model.adapter import AdapterConfig
from st2si_cli.recipe.run import run_recipe
from st2si_cli.recipe.settings import RecipeStages, adapter_plan, parse_budget
from st2si_cli.train.head import HeadConfig
from st2si_cli.zoo.meta import HeadMeta, Inputs

SMALL_ADAPTER = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, max_epochs=3)
SMALL_ILP = HeadConfig(max_epochs=2)


def small_recipe(zoo, budget_s=None, **stages):
    small = {"seeds": 2, "sweep_trials": 2, "adapter_base": SMALL_ADAPTER, "ilp_base": SMALL_ILP}
    return run_recipe(
        zoo,
        "toy",
        backbone="tiny-opt",
        feature_opts=FeatureOptions(dtype="fp32"),
        stages=RecipeStages(**{**small, **stages}),
        budget_s=budget_s,
    )


def test_adapter_plan_follows_the_number_of_windows():
    movielens = adapter_plan(2412)  # MovieLens-100k: 943 histories, 2,412 windows of 50
    assert (movielens.batch_size, movielens.steps_per_epoch, movielens.patience) == (32, 76, 14)
    large = adapter_plan(20_000)
    assert (large.batch_size, large.steps_per_epoch, large.patience) == (128, 157, 10)
    assert adapter_plan(6000).batch_size == 64
    tiny = adapter_plan(40)
    assert (tiny.batch_size, tiny.patience) == (32, 30)
    # few validation users: noisier validation, longer patience (x sqrt(4000 / users), within the bounds)
    assert adapter_plan(2412, 943).patience == 28
    assert adapter_plan(2412, 4000).patience == adapter_plan(2412, 9000).patience == 14
    assert adapter_plan(8320, 8317).patience == adapter_plan(8320).patience == 16  # amazon-scientific
    assert adapter_plan(20_000, 100).patience == 30
    with pytest.raises(ValueError):
        adapter_plan(0)


def test_parse_budget():
    assert parse_budget("90s") == 90
    assert parse_budget("30m") == 1800
    assert parse_budget("1.5h") == 5400
    assert parse_budget("45") == 2700  # a bare number is minutes
    assert parse_budget("none") is None
    for bad in ("abc", "-5m", "0s", "3d", "inf"):
        with pytest.raises(ValueError):
            parse_budget(bad)


def test_recipe_stores_stages_chooses_on_validation_and_reuses(zoo):
    result = small_recipe(zoo)
    keys = [s.key for s in result.stages]
    assert keys == ["sasrec-s0", "ilp-sweep", "sasrec-s1", "adapter-s0", "id-only", "recipe", "lm-adapter"]
    assert all(s.head is not None for s in result.stages)
    assert [s.head.name for s in result.stages] == [
        "toy/recipe-sasrec-s0",
        "toy/recipe-ilp-sweep",
        "toy/recipe-sasrec-s1",
        "toy/recipe-adapter-s0",
        "toy/recipe-id-only",
        "toy/recipe",
        "toy/recipe-lm-adapter",
    ]
    heads = {s.key: s.head for s in result.stages}
    # the adapters' batch size and patience follow from the windows, not the base config
    plan = result.plan["adapter"]
    train = HeadMeta.of(result.stages[0].head).train
    assert (train["batch_size"], train["patience"], train["use_text"]) == (
        plan["batch_size"],
        plan["patience"],
        False,
    )
    assert HeadMeta.of(result.stages[1].head).sweep["trials"]  # the ILP was swept
    lm_train = HeadMeta.of(heads["adapter-s0"]).train
    assert (lm_train["use_text"], lm_train["seed"], lm_train["batch_size"]) == (True, 0, plan["batch_size"])
    # lm-adapter: the ILP with the reference's seeds, adapter-s0 in the place of sasrec-s0
    parts = Inputs.of(heads["lm-adapter"])
    assert parts.get("ilp_head") == (heads["ilp-sweep"].id,)
    assert parts.get("adapter_heads") == (heads["adapter-s0"].id, heads["sasrec-s1"].id)
    assert Inputs.of(heads["id-only"]).get("adapter_heads") == (heads["sasrec-s0"].id, heads["sasrec-s1"].id)
    # the reference is ID-only, the fusions are not; each is at least as good as its parts on validation
    assert id_only(result.reference) and not id_only(result.fusion)
    valid = {s.key: s.valid_ndcg10 for s in result.stages}
    assert valid["recipe"] >= max(valid["id-only"], valid["ilp-sweep"]) - 1e-12
    assert valid["lm-adapter"] >= valid["ilp-sweep"] - 1e-12
    better = "lm-adapter" if valid["lm-adapter"] > valid["recipe"] else "recipe"
    assert result.fusion.id == heads[better].id
    # the result is the best on validation of every stage, and the domain's default head
    assert result.chosen is not None and result.chosen.id in {s.head.id for s in result.stages}
    assert HeadMeta.of(result.chosen).metrics.valid["NDCG@10"] == max(valid.values())
    assert default_head(zoo, "toy").head.id == result.chosen.id
    lm = max(valid["recipe"], valid["lm-adapter"])
    assert result.lm_share() == pytest.approx(lm / valid["id-only"] - 1)

    n_heads = len(zoo.ls(kind="head"))
    again = small_recipe(zoo)
    assert [s.status for s in again.stages] == ["reused"] * 4 + ["fused"] * 3
    assert [s.head.id for s in again.stages] == [s.head.id for s in result.stages]
    assert len(zoo.ls(kind="head")) == n_heads  # nothing trained twice, no new artifact
    assert again.train_seconds < result.train_seconds


def test_without_the_lm_adapter_stage(zoo):
    result = small_recipe(zoo, lm_adapter=False)
    assert [s.key for s in result.stages] == ["sasrec-s0", "ilp-sweep", "sasrec-s1", "id-only", "recipe"]
    assert result.fusion.id == result.stages[-1].head.id
    assert result.plan["lm_adapter"] is False


def test_budget_stops_cleanly_and_a_larger_one_continues(zoo):
    cut = small_recipe(
        zoo, budget_s=1e-6, adapter_base=AdapterConfig(**{**SMALL_ADAPTER.to_dict(), "max_epochs": 50})
    )
    status = {s.key: s.status for s in cut.stages}
    assert status["sasrec-s0"] == "cut"  # one epoch, then the budget
    assert status["ilp-sweep"] == status["sasrec-s1"] == status["adapter-s0"] == "skipped"
    first = cut.stages[0].head
    assert first.meta["cut_by_budget"] is True and len(HeadMeta.of(first).history) == 1
    assert cut.fusion is None and cut.reference is not None  # an ensemble of the one adapter
    # a rerun without a budget continues the cut stage from its best epoch and trains the rest
    more = small_recipe(zoo, adapter_base=AdapterConfig(**{**SMALL_ADAPTER.to_dict(), "max_epochs": 50}))
    status = {s.key: s.status for s in more.stages}
    assert status == {
        "sasrec-s0": "continued",
        "ilp-sweep": "trained",
        "sasrec-s1": "trained",
        "adapter-s0": "trained",
        "id-only": "fused",
        "recipe": "fused",
        "lm-adapter": "fused",
    }
    continued = more.stages[0].head
    assert "cut_by_budget" not in continued.meta
    assert continued.meta["metrics"]["valid"]["NDCG@10"] >= first.meta["metrics"]["valid"]["NDCG@10"]


def test_a_killed_recipe_resumes(zoo, tmp_path):
    """Kill -9 the recipe once its first stage is stored; the rerun reuses that stage."""
    script = tmp_path / "recipe_worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO / "tests")!r})
            from st2si_cli.zoo.store import Zoo
            from st2si_cli.model.adapter import AdapterConfig
            import test_recipe
            test_recipe.small_recipe(
                Zoo({str(zoo.root)!r}), seeds=3,
                adapter_base=AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, max_epochs=400),
            )
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], env=cli_env(), cwd=REPO)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if zoo.find("toy/recipe-sasrec-s0", kind="head") is not None:
                break
            time.sleep(0.2)
        assert zoo.find("toy/recipe-sasrec-s0", kind="head") is not None
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    stored = zoo.find("toy/recipe-sasrec-s0", kind="head")
    result = small_recipe(  # a short budget: the stages after the reused one stop soon
        zoo,
        seeds=3,
        budget_s=5,
        adapter_base=AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, max_epochs=400),
    )
    assert result.stages[0].status == "reused" and result.stages[0].head.id == stored.id
    assert result.fusion is not None and result.chosen is not None


def test_cli_recipe_refuses_one_heads_options_and_bad_budgets(zoo):
    for args, option in (
        (["--lr", "0.001"], "--lr"),
        (["--name", "toy/x"], "--name"),
        (["--sweep"], "--sweep"),
        (["--budget", "soon"], "--budget"),
    ):
        r = run_cli(zoo, "adapt", "--domain", "toy", "--backbone", "tiny-opt", *args)
        assert r.returncode == 2, r.stderr
        assert option in r.stderr
    assert zoo.ls(kind="head") == []  # nothing stored


def test_cli_recipe_within_a_budget(zoo):
    r = run_cli(
        zoo,
        "adapt",
        "--domain",
        "toy",
        "--backbone",
        "tiny-opt",
        "--dtype",
        "fp32",
        "--budget",
        "1s",
        "--seeds",
        "2",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert [s["stage"] for s in record["stages"]][:3] == ["sasrec-s0", "ilp-sweep", "sasrec-s1"]
    assert record["stages"][0]["status"] in ("cut", "trained")
    assert "The budget stopped" in r.stderr
    assert record["chosen"]["head"].startswith("toy/recipe")
    assert record["plan"]["adapter"]["batch_size"] == 32


def test_an_ensemble_without_ilp_is_id_only_and_evaluates_and_recommends(zoo):
    from st2si_cli.adapt import adapt, evaluate
    from st2si_cli.heads.fusion import fuse_heads
    from st2si_cli.recommend import Request, recommend

    parts = [
        adapt(
            zoo,
            "toy",
            backbone="tiny-opt",
            head_cfg=AdapterConfig(**{**SMALL_ADAPTER.to_dict(), "use_text": False, "seed": seed}),
            feature_opts=FeatureOptions(dtype="fp32"),
            name=f"toy/s{seed}",
        )
        for seed in (0, 1)
    ]
    ens = fuse_heads(zoo, None, parts, name="toy/ens")
    meta = HeadMeta.of(ens)
    assert id_only(ens) and meta.fusion_w == 0.0 and "ilp" not in meta.train
    assert "ilp.weight" not in zoo.file(ens, "head.safetensors").read_bytes()[:2000].decode("latin-1")
    result = evaluate(zoo, "toy", head_ref="toy/ens")
    assert result["metrics"]["NDCG@10"] == pytest.approx(meta.metrics.test["NDCG@10"])
    [rec] = recommend(
        zoo,
        "toy",
        [Request(line=1, user="u", items=[{"title": "red lamp 1"}], catalog_ids=[1])],
        k=3,
        head_ref=ens.id,
    )
    assert len(rec["items"]) == 3
    r = run_cli(
        zoo, "fuse", "--domain", "toy", "--adapter", "toy/s0", "--adapter", "toy/s1", "--name", "toy/ens2"
    )
    assert r.returncode == 0, r.stderr
    assert zoo.get("toy/ens2", kind="head").id == ens.id  # the same ensemble, one artifact
    from st2si_cli.report.reproduce import reproduce

    [command] = reproduce(zoo, ens)
    assert command.startswith("st2si fuse --domain toy --adapter") and "--ilp" not in command
