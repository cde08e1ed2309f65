"""`adapt`'s features from a top-K run's fp32 activation cache (`features/from_activations.py`): the same
features as the whole pass, used only where they would be, and marked as such in the cache's record."""

from __future__ import annotations

import pytest
import torch
from helpers import toy_zoo_with_llama

from st2si_cli.adapt import FeatureOptions, get_features
from st2si_cli.backbones.load import load_backbone
from st2si_cli.data.prepare import load_dataset
from st2si_cli.features.forward import features_per_sample
from st2si_cli.features.from_activations import activation_source, matching_caches, pick
from st2si_cli.model.samples import build_samples
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.pretrain.config import PretrainConfig
from st2si_cli.pretrain.full import pretrain

FAST = dict(epochs=1, lr=1e-3, batch_size=8)
TEXT = TextConfig(query="dot")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    zoo = toy_zoo_with_llama(tmp_path_factory.mktemp("fromact"))
    runs = (
        ("tiny-llama4", "fp32", 1),
        ("tiny-opt", "fp32", 1),
        ("tiny-llama4", "bf16", 1),
        ("tiny-llama4", "fp32", 2),
    )
    for backbone, dtype, k in runs:
        cfg = PretrainConfig(**FAST, tune_layers=k, cache_dtype=dtype)
        pretrain(
            zoo, ["toy"], backbone=backbone, cfg=cfg, text=TEXT, out=f"t{k}-{backbone}-{dtype}", device="cpu"
        )
    cfg = PretrainConfig(**FAST, tune_layers=1, cache_dtype="fp32")
    pretrain(zoo, ["toy"], backbone="tiny-llama4", cfg=cfg, text=WINDOWS, out="t1-windows", device="cpu")
    return zoo


WINDOWS = TextConfig(query="dot", max_items=4)  # histories longer than a window: earlier windows too


def whole_pass(zoo, backbone: str, text: TextConfig = TEXT) -> torch.Tensor:
    """The features the whole fp32 forward gives, in the feature cache's row order."""
    bb = load_backbone(zoo, backbone, dtype="fp32", device="cpu", query=text.query)
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(bb.tokenizer, text)
    samples = build_samples(ds, itok, itok.encode_items(ds.items), alignment=True, every_position=True)
    return torch.cat(features_per_sample(bb.st2si(), samples))


@pytest.mark.parametrize("backbone", ["tiny-llama4", "tiny-opt"])
def test_features_from_the_activation_cache_are_the_whole_passes(zoo, backbone):
    dataset = zoo.get("toy", kind="dataset")
    art, fs, _bb = get_features(zoo, backbone, dataset, TEXT, FeatureOptions(dtype="fp32"))
    origin = art.meta["origin"]
    assert origin["layer"] == (1 if backbone == "tiny-opt" else 3)  # the top-1 run's: one layer to run
    act = pick(matching_caches(zoo, zoo.get(backbone), dataset, TEXT), zoo.get(backbone), 4)
    assert act is not None and origin["activations"] == act.short_id and act.meta["dtype"] == "fp32"
    ref = whole_pass(zoo, backbone)
    assert fs.feats.shape == ref.shape
    torch.testing.assert_close(fs.feats, ref, rtol=1e-4, atol=1e-5)
    # a second call finds the stored cache, as after a pass
    again, fs2, _ = get_features(zoo, backbone, dataset, TEXT, FeatureOptions(dtype="fp32"))
    assert again.id == art.id and torch.equal(fs2.feats, fs.feats)


def test_no_source_where_the_features_would_differ(zoo):
    """A bf16 activation cache is never read, nor one for other text settings; a bf16 feature cache
    (what a CPU with native bf16 computes) runs the pass."""
    dataset = zoo.get("toy", kind="dataset")
    llama = zoo.get("tiny-llama4")
    assert {a.meta["dtype"] for a in matching_caches(zoo, llama, dataset, TEXT)} == {"fp32"}  # not the bf16
    assert matching_caches(zoo, llama, dataset, TextConfig(query="dot", max_items=5)) == []
    assert activation_source(zoo, llama, dataset, TextConfig(query="dot", max_tokens=512)) is None
    art, _fs, _ = get_features(zoo, "tiny-llama4", dataset, TEXT, FeatureOptions(dtype="bf16"))
    assert "origin" not in art.meta


def test_a_cache_for_other_samples_is_not_read(zoo, monkeypatch):
    """The cache's index is checked against this dataset's samples: a mismatch runs the pass."""
    import st2si_cli.pretrain.activations as activations

    real = activations.load_index

    def shifted(zoo_, art):
        index = real(zoo_, art).clone()
        index[0, 2] += 1
        return index

    monkeypatch.setattr(activations, "load_index", shifted)
    dataset = zoo.get("toy", kind="dataset")
    assert activation_source(zoo, zoo.get("tiny-llama4"), dataset, TEXT) is None


def test_a_top_k_result_reads_its_sources_cache_up_to_its_first_tuned_layer(zoo):
    """A backbone stored by top-K tuning shares the states entering layers up to L-K with the backbone it
    was tuned from: `adapt --backbone <it>` reads the highest such cache and gets its own whole pass's
    features; a cache above its first tuned layer is never read."""
    dataset = zoo.get("toy", kind="dataset")
    base, top1, top2 = zoo.get("tiny-llama4"), zoo.get("t1-tiny-llama4-fp32"), zoo.get("t2-tiny-llama4-fp32")
    caches = matching_caches(zoo, top2, dataset, TEXT)
    assert sorted(a.meta["layer"] for a in caches) == [2, 3]  # the base's, made by the two top-K runs
    assert pick(caches, top2, 4).meta["layer"] == 2  # entering layer 3 went through a tuned layer
    assert pick(caches, top1, 4).meta["layer"] == 3
    assert pick(caches, base, 4).meta["layer"] == 3
    for tuned, layer in ((top1, 3), (top2, 2)):
        art, fs, _ = get_features(zoo, tuned.id, dataset, TEXT, FeatureOptions(dtype="fp32"))
        assert art.meta["origin"]["layer"] == layer
        ref = whole_pass(zoo, tuned.id)
        torch.testing.assert_close(fs.feats, ref, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(ref, whole_pass(zoo, "tiny-llama4"), atol=1e-3)  # it was tuned


def test_windows_the_cache_does_not_hold_run_the_whole_backbone(zoo):
    """With windows of 4 items a long history's feature samples include earlier windows that no stored
    sample starts with (the run stored its own training windows, not these): those run the whole
    backbone, the rest read the cache, and together they are the whole pass's features."""
    from st2si_cli.pretrain.activations import covers

    dataset = zoo.get("toy", kind="dataset")
    source, _art, tokenizer = activation_source(zoo, zoo.get("tiny-llama4"), dataset, WINDOWS)
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(tokenizer, WINDOWS)
    samples = build_samples(ds, itok, itok.encode_items(ds.items), alignment=True, every_position=True)
    missing = [j for j in covers(samples, source.stored) if j is None]
    assert 0 < len(missing) < len(samples)
    art, fs, _ = get_features(zoo, "tiny-llama4", dataset, WINDOWS, FeatureOptions(dtype="fp32"))
    assert art.meta["origin"]["layer"] == 3
    torch.testing.assert_close(fs.feats, whole_pass(zoo, "tiny-llama4", WINDOWS), rtol=1e-4, atol=1e-5)
