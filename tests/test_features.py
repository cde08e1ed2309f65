"""Features on a tiny randomly initialised OPT: batching, the cached forward pass, resuming it, reusing it."""

from __future__ import annotations

import pytest
import torch
from helpers import build_zoo, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, get_features
from st2si_cli.backbones.pull import pull
from st2si_cli.data.prepare import load_dataset, store_dataset
from st2si_cli.features.cache import compute_features
from st2si_cli.features.forward import forward_batch
from st2si_cli.model.samples import build_samples, plan_batches
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.zoo.store import Zoo


def test_batched_right_padded_features_equal_one_by_one(zoo, backbone):
    ds = load_dataset(zoo, "toy")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    samples = build_samples(ds, itok, itok.encode_items(ds.items))[:12]
    with torch.inference_mode():
        together = forward_batch(backbone, samples)
        alone = [forward_batch(backbone, [s])[0] for s in samples]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_batches_are_length_sorted_and_bounded():
    lengths = [5, 50, 7, 49, 6, 8, 51]
    batches = plan_batches(lengths, batch_tokens=110, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and len(b) * max(lengths[i] for i in b) <= 110 or len(b) == 1
    assert batches[0][0] == 6  # longest first


def test_killed_feature_pass_resumes_from_its_shards(tmp_path, backbone):
    z = Zoo(tmp_path / "zoo")
    dsa = store_dataset(z, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic")
    pull(z, "tiny-opt")
    ds = load_dataset(z, "toy")
    text = TextConfig()
    calls = {"n": 0}

    def die_in_the_third_batch(tokens, samples):
        calls["n"] += 1
        if calls["n"] == 3:  # with shard_seconds=0 every batch is a shard: batches 1-2 are on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compute_features(
            z, backbone, ds, dsa.id, text, shard_seconds=0, max_batch=4, on_progress=die_in_the_third_batch
        )
    assert z.ls(kind="features") == []  # nothing half-written is listed
    assert len(list((z.root / "tmp").glob("features-*/shard-*.safetensors"))) == 2
    art, fs = compute_features(z, backbone, ds, dsa.id, text, shard_seconds=0, max_batch=4)
    timings = art.meta["timings"]
    assert 0 < timings["tokens_computed"] < timings["tokens"]
    fresh_zoo = Zoo(tmp_path / "fresh")
    dsb = store_dataset(fresh_zoo, ds, domain="toy", fmt="synthetic", source="synthetic")
    pull(fresh_zoo, "tiny-opt")  # a cache lists its backbone as an input: it must be in the same zoo
    _, fresh = compute_features(fresh_zoo, backbone, ds, dsb.id, text)
    torch.testing.assert_close(fs.feats, fresh.feats)
    assert torch.equal(fs.targets, fresh.targets)


def test_shards_close_by_compute_time_and_bad_shards_are_recomputed(tmp_path, backbone):
    """One shard per `shard_seconds` of work (a long budget: one shard for the whole pass); a shard
    that does not continue the plan, or cannot be read, is removed and its batches run again."""
    from st2si_cli.features.cache import resume_shards

    z = Zoo(tmp_path / "zoo")
    dsa = store_dataset(z, synthetic_dataset(), domain="toy", fmt="synthetic", source="synthetic")
    pull(z, "tiny-opt")
    ds = load_dataset(z, "toy")
    calls = {"n": 0}

    def die_after_four(tokens, samples):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a long shard: nothing written before the kill
        compute_features(z, backbone, ds, dsa.id, TextConfig(), max_batch=4, on_progress=die_after_four)
    assert list((z.root / "tmp").glob("features-*/shard-*")) == []
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):  # one batch per shard: three on disk
        compute_features(
            z, backbone, ds, dsa.id, TextConfig(), shard_seconds=0, max_batch=4, on_progress=die_after_four
        )
    shards = sorted((z.root / "tmp").glob("features-*/shard-*.safetensors"))
    assert len(shards) == 3
    shards[1].write_bytes(b"not a shard")
    samples = build_samples(ds, *_itok_and_tokens(backbone, ds))
    first_row = torch.tensor([0] + [len(s.query_pos) for s in samples]).cumsum(0)
    feats = torch.zeros(int(first_row[-1]), backbone.hidden_size)
    batches = plan_batches([len(s.tokens) for s in samples], 16384, 4)
    done = resume_shards(shards[0].parent, batches, first_row, lambda d: feats)
    assert (
        done == 1
        and feats.abs().sum(1).gt(0).sum() == sum(len(samples[i].query_pos) for i in batches[0])
        and not shards[1].exists()
        and not shards[2].exists()
    )  # only the prefix is kept
    art, fs = compute_features(z, backbone, ds, dsa.id, TextConfig(), shard_seconds=0, max_batch=4)
    fresh_zoo = Zoo(tmp_path / "fresh")
    dsb = store_dataset(fresh_zoo, ds, domain="toy", fmt="synthetic", source="synthetic")
    pull(fresh_zoo, "tiny-opt")  # a cache lists its backbone as an input: it must be in the same zoo
    _, fresh = compute_features(fresh_zoo, backbone, ds, dsb.id, TextConfig(), max_batch=4)  # same batches
    torch.testing.assert_close(fs.feats, fresh.feats, rtol=0, atol=0)


def _itok_and_tokens(backbone, ds):
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    return itok, itok.encode_items(ds.items)


def test_features_are_reused_for_the_same_key(tmp_path, monkeypatch):
    """The second call with the same key reads the cache: the backbone is neither loaded nor run. (The
    artifact IDs are content-addressed, so equal IDs alone would also hold after a second forward pass.)"""
    import st2si_cli.backbones.load

    zoo = build_zoo(tmp_path / "fresh", {"toy": synthetic_dataset()})  # no features cached yet
    dsa = zoo.get("toy", kind="dataset")
    loads = []
    real_load = st2si_cli.backbones.load.load_backbone

    def counting_load(*args, **kwargs):
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(st2si_cli.backbones.load, "load_backbone", counting_load)

    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *a, **k: self.calls.append(name)

    first, second = Recorder(), Recorder()
    a1, fs1, _ = get_features(
        zoo, "tiny-opt", dsa, TextConfig(), FeatureOptions(dtype="fp32"), reporter=first
    )
    assert len(loads) == 1 and "features_start" in first.calls  # the first call ran the backbone ...
    assert a1.meta["timings"]["tokens_computed"] > 0
    a2, fs2, _ = get_features(
        zoo, "tiny-opt", dsa, TextConfig(), FeatureOptions(dtype="fp32"), reporter=second
    )
    assert a1.id == a2.id
    assert len(loads) == 1, "the second call loaded the backbone"  # ... the second did not
    assert not {"features_start", "features_advance"} & set(second.calls)
    assert len(zoo.ls(kind="features")) == 1
    torch.testing.assert_close(fs2.feats, fs1.feats, rtol=0, atol=0)
    assert torch.equal(fs2.targets, fs1.targets) and torch.equal(fs2.roles, fs1.roles)


def test_backbone_in_the_loop_runs_each_sample_once_per_epoch(zoo, backbone):
    """The frozen backbone in the loop runs every training sample once an epoch (the authors' loop),
    not once for every batch that holds one of its rows; its features are the cached ones."""
    from st2si_cli.features.cache import index_rows, live_features
    from st2si_cli.train.head import HeadConfig, train_head, training_rows

    ds = load_dataset(zoo, "toy")
    text = TextConfig()
    _, fs = compute_features(zoo, backbone, ds, zoo.get("toy").id, text)
    samples = build_samples(ds, *_itok_and_tokens(backbone, ds))
    cfg = HeadConfig(lr=1e-2, batch_size=16, max_epochs=3, patience=10, seed=3)
    live_fs = index_rows(samples)
    live = live_features(backbone, samples, live_fs)
    runs = []

    def on_epoch(record):
        runs.append(live.samples_run)
        live.new_epoch()

    result = train_head(live_fs, ds.n_items, cfg, features_of=live, on_epoch=on_epoch)
    per_epoch = len(set(live_fs.sample[training_rows(live_fs, cfg.multi_query, cfg.alignment)].tolist()))
    assert per_epoch > 10
    assert [b - a for a, b in zip(runs, runs[1:])] == [per_epoch, per_epoch]
    torch.testing.assert_close(result.weight, train_head(fs, ds.n_items, cfg).weight, atol=1e-4, rtol=1e-4)
