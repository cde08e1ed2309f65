"""Typed artifact meta (`st2si_cli.zoo.meta`): every `inputs` shape written so far reads as one, the
records of heads, runs, datasets, backbones and caches made by the real code paths read back as stored,
records written by older versions still parse, unknown keys are kept, and a head stored in an older
shape still loads, fuses and evaluates to its recorded metrics."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from typing import Any

import pytest
from helpers import build_zoo, quick_head, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.cli.app import run as run_cli_here
from st2si_cli.cli.zoo_cmd import summarize
from st2si_cli.heads.fusion import fuse_heads
from st2si_cli.zoo.artifact import canonical_json, input_ids
from st2si_cli.zoo.meta import (
    BackboneMeta,
    DatasetMeta,
    FeaturesMeta,
    HeadMeta,
    Inputs,
    Metrics,
    RunMeta,
)
from st2si_cli.zoo.schema import write_txn
from st2si_cli.zoo.store import Zoo

pytestmark = pytest.mark.usefixtures("one_thread")
FP32 = FeatureOptions(dtype="fp32")


def input_ids_before(meta: Mapping[str, Any]) -> set[str]:
    """`input_ids` as it was before `Inputs` (a copy, to check the new one gives the same IDs)."""
    inputs = meta.get("inputs") or {}
    values = list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)
    ids: set[str] = set()
    while values:
        v = values.pop()
        if isinstance(v, str):
            ids.add(v)
        elif isinstance(v, Mapping) and isinstance(v.get("id"), str):
            ids.add(v["id"])
        elif isinstance(v, (list, tuple)):
            values.extend(v)
    return ids


# ---- inputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        {"features": "f1", "backbone": "b1"},  # {role: id}: what heads and caches write
        {"features": ["f1"], "backbone": ["b1"]},  # {role: [id, ...]}
        {"features": {"id": "f1", "name": "cache"}, "backbone": {"id": "b1"}},  # {role: {"id": id, ...}}
        {"features": ("f1", "f1"), "backbone": [["b1"]]},  # repeated and nested
    ],
)
def test_every_inputs_shape_reads_as_one(raw):
    inputs = Inputs.of(raw)
    assert inputs == Inputs({"features": ("f1",), "backbone": ("b1",)})
    assert inputs.first("features") == "f1" and inputs.get("backbone") == ("b1",)
    assert inputs.first("dataset") is None and inputs.get("dataset") == ()
    assert inputs.ids() == ("f1", "b1")
    assert inputs.to_dict() == {"features": ["f1"], "backbone": ["b1"]}
    assert Inputs.of(inputs.to_dict()) == inputs, "the one shape reads back as itself"


def test_a_plain_list_is_role_empty_and_nothing_reads_as_no_inputs():
    assert Inputs.of(["a", {"id": "b"}, ["c"]]) == Inputs({"": ("a", "b", "c")})
    assert Inputs.of(["a", "b"]) == Inputs.of({"": ["a", "b"]})
    assert Inputs.of(None) == Inputs.of({}) == Inputs.of([]) == Inputs()
    assert Inputs.of({"datasets": []}).get("datasets") == () and Inputs.of({"datasets": []}).ids() == ()


def test_values_naming_no_artifact_are_kept_apart():
    """An activation cache's inputs are its key's inputs: text settings and flags beside the IDs."""
    raw = {
        "backbone": "b1",
        "datasets": ["d1", "d2"],
        "text": {"query": "dot", "max_items": 50},
        "alignment": True,
        "samples": "train+valid",
    }
    inputs = Inputs.of(raw)
    assert inputs.get("datasets") == ("d1", "d2")
    assert inputs.other == {"text": {"query": "dot", "max_items": 50}, "alignment": True}
    assert FeaturesMeta.of({"type": "activations", "inputs": raw, "layer": 1}).backbone == "b1"


@pytest.mark.parametrize(
    "inputs",
    [
        {"backbone": "b", "dataset": "d"},
        {"features": "f", "ilp_head": "i", "adapter_head": "a", "adapter_heads": ["a", "a2"]},
        {"backbone": "b", "datasets": ["d1", "d2"]},
        {"backbone": "b", "datasets": ["d"], "text": {"query": "dot"}, "alignment": True, "samples": "x"},
        {"dataset": {"id": "d", "name": "toy"}, "heads": [{"id": "h"}, ["h2", {"no": "id"}]]},
        ["a", ["b", {"id": "c"}], {"id": 3}],
        {},
        None,
    ],
)
def test_input_ids_are_what_they_were(inputs):
    meta = {"inputs": inputs}
    assert input_ids(meta) == input_ids_before(meta)
    assert set(Inputs.of(inputs).ids()) == input_ids_before(meta)


# ---- records written by older versions ---------------------------------------------------------------
# A head as the first `adapt` stored it (st2si_cli/heads.py and adapt.py of the first release): no
# "head" kind, no sweep, no catalog record.
OLD_HEAD = {
    "kind": "st2si-ilp-head",
    "domain": "ml-100k",
    "n_items": 1682,
    "hidden": 576,
    "text": {"query": "dot", "max_items": 50, "positions": "all"},
    "backbone": "b" * 64,
    "dataset": "d" * 64,
    "catalog_hash": "c" * 64,
    "method": "ilp",
    "dtype": "bfloat16",
    "train": {"lr": 1e-3, "batch_size": 256, "max_epochs": 30, "ties": "pessimistic"},
    "inputs": {"backbone": "b" * 64, "dataset": "d" * 64, "features": "f" * 64},
    "metrics": {
        "valid": {"NDCG@10": 0.05, "Recall@10": 0.1},
        "test": {"NDCG@10": 0.04, "Recall@10": 0.09},
        "alignment": {"align@1": 0.5},
    },
    "protocol": {"ties": "pessimistic", "mask_history": False, "ranking": "full"},
    "best_epoch": 7,
    "history": [{"epoch": 1, "loss": 7.1}],
    "timings": {"features_seconds": 12.5, "features_cached": {}, "training_seconds": 3.2},
    "backbone_name": "smollm2-135m",
    "versions": {"st2si": "0.1.0", "torch": "2.5.0"},
}


@pytest.mark.parametrize(
    "inputs",
    [
        OLD_HEAD["inputs"],
        {"backbone": {"id": "b" * 64}, "dataset": ["d" * 64], "features": {"id": "f" * 64, "name": "x"}},
    ],
)
def test_a_head_record_of_an_older_version_still_parses(inputs):
    head = HeadMeta.of({**OLD_HEAD, "inputs": inputs})
    assert head.kind == "ilp", "no 'head' key: the paper's ILP"
    assert head.metrics == Metrics(
        valid=OLD_HEAD["metrics"]["valid"],
        test=OLD_HEAD["metrics"]["test"],
        alignment=OLD_HEAD["metrics"]["alignment"],
    )
    assert head.metrics.with_alignment("test") == {"NDCG@10": 0.04, "Recall@10": 0.09, "align@1": 0.5}
    assert head.best_epoch == 7 and head.sweep is None and head.pretrain is None and head.fusion_w is None
    assert head.backbone == "b" * 64 and head.backbone_name == "smollm2-135m" and head.n_items == 1682
    assert head.inputs.to_dict() == {"backbone": ["b" * 64], "dataset": ["d" * 64], "features": ["f" * 64]}
    assert head.catalog.trained_items is None and head.trained_items == 1682 and head.catalog.text_items == 0
    assert head.extra == {}


def test_run_dataset_backbone_and_cache_records_of_older_versions_still_parse():
    # a run stored before stop reasons were recorded (no stopped_by, no early_stopped)
    run = RunMeta.of(
        {
            "flags": {"no-multi-query": True, "sampling": None},
            "metrics": {
                "valid": {"NDCG@10": 0.1},
                "test": {},
                "alignment": {},
                "domains": {"a": {"test": {}}},
            },
            "best_epoch": 2,
            "inputs": {"backbone": "b", "datasets": ["d1"]},
            "outputs": {"backbone": "b2", "heads": {"a": "h"}},
        }
    )
    assert run.stopped_by is None and run.early_stopped is False and run.world_size == 1
    assert run.metrics.domains == {"a": Metrics()} and run.inputs.get("datasets") == ("d1",)
    assert run.flags == {"no-multi-query": True, "sampling": None} and run.config == {} and run.timings == {}
    assert RunMeta.of({"flags": ["a", "b"]}).flags == {"a": True, "b": True}
    # a dataset as `prepare` stores it: no catalog record, so version 1 of all its items
    ds = DatasetMeta.of({"stats": {"users": 3, "items": 9, "interactions": 20}, "format": "generic"})
    assert ds.catalog.version == 1 and ds.catalog.items == 9 and ds.catalog.change == "prepare"
    assert ds.stats.counts() == {"users": 3, "items": 9, "interactions": 20} and ds.catalog_hash is None
    # a tiny backbone records no parameter count or vocabulary
    bb = BackboneMeta.of({"source": {"type": "random-init"}, "family": "opt", "hidden": 32, "layers": 2})
    assert (bb.family, bb.hidden, bb.parameters, bb.vocab, bb.flags) == ("opt", 32, None, None, {})
    # a feature cache without the alignment flag computed alignment samples
    feats = FeaturesMeta.of({"key": "k", "inputs": {"backbone": {"id": "b"}, "dataset": "d"}})
    assert (
        feats.alignment is True and feats.type == "features" and (feats.backbone, feats.dataset) == ("b", "d")
    )


@pytest.mark.parametrize("record", [HeadMeta, RunMeta, DatasetMeta, BackboneMeta, FeaturesMeta])
def test_unknown_keys_survive_in_extra(record):
    future = {"a_later_key": {"nested": [1, 2]}, "another": 3}
    parsed = record.of({**OLD_HEAD, **future} if record is HeadMeta else future)
    assert parsed.extra == future
    assert Metrics.of({"test": {"x": 1}, "per_user": [1]}).extra == {"per_user": [1]}
    assert HeadMeta.of({"catalog": {"trained_items": 5, "later": 1}}).catalog.extra == {"later": 1}
    assert DatasetMeta.of({"catalog": {"version": 2, "added": 4}}).catalog.extra == {"added": 4}


# ---- records made by the real code paths -------------------------------------------------------------
@pytest.fixture(scope="module")
def heads_zoo(tmp_path_factory):
    """tiny-opt, the synthetic domain "toy", an ILP and an adapter head on the same fp32 features."""
    from st2si_cli.model.adapter import AdapterConfig

    zoo = build_zoo(tmp_path_factory.mktemp("meta") / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy", name="toy/ilp")
    cfg = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=2)
    adapt(zoo, "toy", backbone="tiny-opt", head_cfg=cfg, feature_opts=FP32, name="toy/adapter")
    return zoo


@pytest.fixture
def zoo_copy(heads_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("ST2SI_NO_PROGRESS", "1")
    shutil.copytree(heads_zoo.root, tmp_path / "zoo")
    return Zoo(tmp_path / "zoo")


def cli(zoo: Zoo, capsys, *args: Any) -> tuple[int, str]:
    """The command line in this process: (status, stdout)."""
    capsys.readouterr()
    status = run_cli_here(["--zoo", str(zoo.root), *map(str, args)])
    return status, capsys.readouterr().out


def assert_reads_as_stored(head) -> HeadMeta:
    meta = HeadMeta.of(head)
    stored = head.meta["metrics"]
    assert (meta.metrics.valid, meta.metrics.test) == (stored["valid"], stored["test"])
    assert meta.metrics.alignment == stored["alignment"]
    assert meta.kind == head.meta["head"] and meta.best_epoch == head.meta["best_epoch"]
    assert meta.backbone == head.meta["backbone"] and meta.dataset == head.meta["dataset"]
    assert meta.train == head.meta["train"] and meta.timings == head.meta["timings"]
    assert meta.inputs.first("features") == head.meta["inputs"]["features"]
    assert meta.extra == {}, "every key the writers store is a field"
    return meta


def test_heads_adapt_and_fuse_store_read_back_as_stored(zoo_copy, capsys):
    zoo = zoo_copy
    ilp, adapter = zoo.get("toy/ilp", kind="head"), zoo.get("toy/adapter", kind="head")
    assert assert_reads_as_stored(ilp).kind == "ilp" and assert_reads_as_stored(adapter).kind == "adapter"
    assert (
        HeadMeta.of(adapter).metrics.alignment == {} and HeadMeta.of(adapter).d_feat == adapter.meta["d_feat"]
    )

    status, out = cli(
        zoo, capsys, "fuse", "--domain", "toy", "--ilp", "toy/ilp", "--adapter", "toy/adapter", "--json"
    )
    assert status == 0
    record = json.loads(out)
    fusion = zoo.get(record["head_id"], kind="head")
    meta = assert_reads_as_stored(fusion)
    assert meta.kind == "fusion" and meta.fusion_w == fusion.meta["train"]["w"]
    assert record["valid"] == fusion.meta["metrics"]["valid"] and record["sweep"] == fusion.meta["sweep"]
    assert record["metrics"] == fusion.meta["metrics"]["test"]
    assert meta.inputs.get("ilp_head") == (ilp.id,) and meta.inputs.get("adapter_head") == (adapter.id,)

    features = zoo.get(meta.inputs.first("features"), kind="features")
    feats = FeaturesMeta.of(features)
    assert (feats.backbone, feats.dataset) == (meta.backbone, meta.dataset) and feats.extra == {}
    assert feats.dtype == "float32" and feats.alignment and feats.hidden == meta.d_feat
    dataset = DatasetMeta.of(zoo.get("toy", kind="dataset"))
    assert dataset.catalog_hash == meta.catalog_hash and dataset.stats.items == meta.n_items
    assert dataset.extra == {} and BackboneMeta.of(zoo.get(meta.backbone)).extra == {}


def test_pretrain_records_read_back_as_stored(zoo_copy, capsys):
    from st2si_cli.data.prepare import store_dataset

    zoo = zoo_copy
    store_dataset(zoo, synthetic_dataset(seed=1), domain="toy2", fmt="synthetic", source="synthetic")
    args = ("pretrain", "--domain", "toy", "--domain", "toy2", "--backbone", "tiny-opt", "--epochs", "1")
    status, out = cli(zoo, capsys, *args, "--batch-size", "8", "--out", "two")
    assert status == 0 and "test toy2" in out, "a table row per domain"
    run = zoo.get("run/two", kind="run")
    meta = RunMeta.of(run)
    assert (
        meta.metrics.valid == run.meta["metrics"]["valid"]
        and meta.metrics.test == run.meta["metrics"]["test"]
    )
    assert {d: m.test for d, m in meta.metrics.domains.items()} == {
        d: m["test"] for d, m in run.meta["metrics"]["domains"].items()
    }
    assert (meta.stopped_by, meta.early_stopped, meta.world_size) == ("epochs", False, 1)
    assert meta.flags == run.meta["flags"] and meta.inputs.get("datasets") == tuple(
        run.meta["inputs"]["datasets"]
    )
    assert meta.extra == {}
    head = zoo.get(meta.outputs["heads"]["toy2"], kind="head")
    head_meta = HeadMeta.of(head)
    assert head_meta.kind == "ilp" and head_meta.method == "full" and head_meta.pretrain is not None
    assert head_meta.metrics.test == meta.metrics.domains["toy2"].test and head_meta.extra == {}
    backbone = BackboneMeta.of(zoo.get(meta.outputs["backbone"], kind="backbone"))
    assert backbone.source["type"] == "st2si-pretrain" and backbone.flags == meta.flags
    assert backbone.extra == {}


def store_old_meta(zoo: Zoo, art, meta: dict[str, Any]):
    """Overwrite an artifact's stored meta, as a zoo written by an older version holds it."""
    with write_txn(zoo.db):
        zoo.db["artifacts"].update(art.id, {"meta": canonical_json(meta)})
    return zoo.get(art.id)


BEYOND_KEYS = {
    f"{m}@10" for m in ("ItemCoverage", "AveragePopularity", "GiniIndex", "ShannonEntropy", "TailPercentage")
}


def test_a_head_stored_in_an_older_shape_loads_fuses_and_evaluates_to_its_metrics(zoo_copy, capsys):
    zoo = zoo_copy
    ilp, adapter = zoo.get("toy/ilp", kind="head"), zoo.get("toy/adapter", kind="head")
    ids = ilp.meta["inputs"]
    old_meta = {k: v for k, v in ilp.meta.items() if k != "head"}  # the first heads had no "head" kind
    old_meta["inputs"] = {
        "backbone": {"id": ids["backbone"]},
        "dataset": [ids["dataset"]],
        "features": {"id": ids["features"], "name": "the cache"},
    }
    old = store_old_meta(zoo, ilp, old_meta)
    assert old.id == ilp.id and "head" not in old.meta
    assert HeadMeta.of(old).metrics == HeadMeta.of(ilp).metrics and HeadMeta.of(old).kind == "ilp"
    assert HeadMeta.of(old).inputs == HeadMeta.of(ilp).inputs and input_ids(old.meta) == input_ids(ilp.meta)
    assert old.id in {a.id for a in zoo.dependents(zoo.get(ids["features"], kind="features"))}

    stored = HeadMeta.of(old).metrics
    for split, expected in (("test", stored.test), ("valid", stored.valid)):
        result = evaluate(zoo, "toy", head_ref=old.id, split=split, feature_opts=FP32)
        recorded = {**expected, **stored.alignment}
        accuracy = {k: v for k, v in result["metrics"].items() if k in recorded}
        assert set(result["metrics"]) - set(accuracy) <= BEYOND_KEYS  # what heads do not record
        for k, v in accuracy.items():
            assert v == pytest.approx(recorded[k], abs=1e-6), (split, k)

    fused = fuse_heads(zoo, old, [adapter], name="toy/fused-old")  # finds the cache from {"id": ...}
    assert HeadMeta.of(fused).inputs.first("features") == ids["features"]

    status, out = cli(zoo, capsys, "zoo", "info", old.id, "--json")
    assert status == 0
    rows = {(i["role"], i["id"], i["kind"]) for i in json.loads(out)["inputs"]}
    assert rows == {
        ("backbone", ids["backbone"], "backbone"),
        ("dataset", ids["dataset"], "dataset"),
        ("features", ids["features"], "features"),
    }
    assert summarize(old).startswith(f"NDCG@10 {stored.test['NDCG@10']:.4f}, ")
