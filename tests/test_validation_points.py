"""Validation points of `pretrain`: every `valid_every` steps within an epoch, the starting weights when
the ILP starts from trained heads, early stopping counted in points, and the best point's weights stored."""

from __future__ import annotations

import pytest
import torch
from helpers import toy_zoo_with_llama
from safetensors.torch import load_file

from st2si_cli.adapt import FeatureOptions, adapt
from st2si_cli.errors import St2siError
from st2si_cli.heads.store import load_head_tensors
from st2si_cli.pretrain import loop
from st2si_cli.pretrain.config import PretrainConfig, check_config
from st2si_cli.pretrain.full import pretrain
from st2si_cli.train.head import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return toy_zoo_with_llama(tmp_path_factory.mktemp("pointszoo"))


def scripted(monkeypatch, scores: list[float]) -> list[int]:
    """Validation returns `scores` in turn (the real validation still runs, on 2 users); the list
    returned grows by one per call."""
    calls: list[int] = []
    real = loop.validate

    def fake(engine, run, valid, features_of=None):
        real(engine, run, valid[:2], features_of)  # the real path runs (and puts the module back in train)
        calls.append(len(calls))
        s = scores[min(len(calls) - 1, len(scores) - 1)]
        return {"NDCG@10": s, "Recall@10": s, "MRR": s, "n_users": 2}

    monkeypatch.setattr(loop, "validate", fake)
    return calls


def snapshots_by_step():
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep(info):
        seen[info["global_step"]] = {n: v.detach().clone() for n, v in info["module"].state_dict().items()}

    return seen, keep


def stored_backbone(zoo, art):
    return load_file(str(zoo.file(art, "model.safetensors")))


def test_points_within_epochs_stop_early_and_keep_the_best_point(zoo, monkeypatch):
    calls = scripted(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.9])
    seen, keep = snapshots_by_step()
    cfg = PretrainConfig(epochs=5, lr=1e-3, batch_size=8, valid_every=2, patience=2)
    res = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="points", device="cpu", on_step=keep)
    meta = res.run.meta
    assert len(calls) == 4  # the 5th score is never asked for: patience ran out at the 4th point
    assert meta["stopped_by"] == "patience" and meta["early_stopped"]
    assert [r["steps"] for r in meta["history"]] == [2, 4, 6, 8]
    assert meta["best_step"] == 4 and meta["history"][1]["valid_NDCG@10"] == 0.3
    steps = meta["config"]["steps_per_epoch"]
    for r in meta["history"]:
        assert r["end"] == (r["step"] == steps)
        assert r["step"] == r["steps"] - (r["epoch"] - 1) * steps
    assert max(seen) == 8  # training ended at the stopping point, mid-run
    tuned = stored_backbone(zoo, res.backbone)
    best = {k.removeprefix("backbone."): v for k, v in seen[4].items() if k.startswith("backbone.")}
    assert best and all(torch.equal(tuned[f"model.{k}"], best[k]) for k in best)
    name = "decoder.layers.0.fc1.weight"
    assert not torch.equal(tuned[f"model.{name}"], seen[8][f"backbone.{name}"])
    assert meta["timings"]["epochs"] == sum(r["end"] for r in meta["history"])
    assert meta["flags"]["valid-every"] == 2


def test_the_time_budget_stops_a_run_at_a_point_within_an_epoch(zoo, monkeypatch):
    calls = scripted(monkeypatch, [0.1, 0.3, 0.2])
    cfg = PretrainConfig(epochs=5, lr=1e-3, batch_size=8, valid_every=2, patience=5, max_minutes=1e-9)
    res = pretrain(zoo, ["toy"], backbone="tiny-opt", cfg=cfg, out="points-time", device="cpu")
    meta = res.run.meta
    assert meta["config"]["steps_per_epoch"] > 2  # the first point lies within epoch 1
    assert len(calls) == 1 and [r["steps"] for r in meta["history"]] == [2]
    assert meta["history"][0]["end"] is False
    assert meta["stopped_by"] == "time" and not meta["early_stopped"] and meta["best_step"] == 2


def test_a_run_from_trained_heads_keeps_the_start_when_nothing_beats_it(zoo, monkeypatch):
    opts = FeatureOptions(dtype="fp32")
    head = adapt(zoo, "toy", backbone="tiny-llama4", head_cfg=HeadConfig(max_epochs=2), feature_opts=opts)
    start = load_head_tensors(zoo, head)["weight"]
    calls = scripted(monkeypatch, [0.5, 0.1, 0.2])
    cfg = PretrainConfig(epochs=4, lr=1e-3, batch_size=8, tune_layers=1, init_heads=(head.name,), patience=2)
    res = pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out="from-start", device="cpu")
    meta = res.run.meta
    first = meta["history"][0]
    assert first["epoch"] == 0 and first["steps"] == 0 and first["end"] is False and first["loss"] is None
    assert len(calls) == 3 and meta["best_epoch"] == 0 and meta["best_step"] == 0
    assert meta["stopped_by"] == "patience" and meta["timings"]["epochs"] == 2
    # the result is where it started: the source backbone and the starting ILP rows
    assert torch.equal(load_head_tensors(zoo, res.heads["toy"])["weight"], start)
    src, tuned = stored_backbone(zoo, zoo.get("tiny-llama4")), stored_backbone(zoo, res.backbone)
    assert all(torch.equal(src[k], tuned[k]) for k in src)


def test_valid_every_is_part_of_the_run_key_only_when_set():
    assert "valid_every" not in PretrainConfig().result_dict()
    assert PretrainConfig(valid_every=50).result_dict()["valid_every"] == 50
    with pytest.raises(St2siError, match="valid_every"):
        check_config(PretrainConfig(valid_every=-1), ["toy"])


def test_a_run_killed_after_a_validation_point_resumes_to_the_uninterrupted_result(zoo):
    opts = FeatureOptions(dtype="fp32")
    head = adapt(zoo, "toy", backbone="tiny-llama4", head_cfg=HeadConfig(max_epochs=1), feature_opts=opts)
    cfg = PretrainConfig(
        epochs=2, lr=1e-3, batch_size=8, tune_layers=1, init_heads=(head.name,), valid_every=3, patience=9
    )
    a = pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out="points-a", device="cpu")

    def die(info):
        if info["global_step"] == 4:  # one step after the point at step 3
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out="points-b", device="cpu", on_step=die)
    b = pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, out="points-b", device="cpu", resume=True)
    ha, hb = a.run.meta["history"], b.run.meta["history"]
    assert [(r["epoch"], r["step"], r["end"]) for r in ha] == [(r["epoch"], r["step"], r["end"]) for r in hb]
    assert ha[0]["epoch"] == 0 and sum(not r["end"] for r in ha) > 2  # the start and points within epochs
    for ra, rb in zip(ha, hb):
        assert ra["valid_NDCG@10"] == pytest.approx(rb["valid_NDCG@10"], abs=1e-9)
    assert a.run.meta["best_step"] == b.run.meta["best_step"]
    wa, wb = stored_backbone(zoo, a.backbone), stored_backbone(zoo, b.backbone)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
