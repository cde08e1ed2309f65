"""Every training position trained once (history windows), and the tuned ILP heads: schedule, dropout,
text initialisation, and the validation-only sweep."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from helpers import WORDS, build_zoo

from st2si_cli.adapt import adapt, evaluate
from st2si_cli.backbones.load import load_backbone
from st2si_cli.data.dataset import RawInteraction, build_dataset
from st2si_cli.data.prepare import load_dataset
from st2si_cli.features.cache import compute_features
from st2si_cli.features.forward import forward_batch
from st2si_cli.heads.registry import user_ranks
from st2si_cli.model.samples import ALIGN, TEST, TRAIN, VALID, build_samples
from st2si_cli.model.text import ItemTokenizer, TextConfig
from st2si_cli.recommend import parse_requests, recommend
from st2si_cli.train.head import HeadConfig, lr_schedule, train_head
from st2si_cli.train.sweep import grid_points, sweep
from st2si_cli.zoo.store import Zoo


def drifting_dataset(lengths: list[int], n_items: int = 30, seed: int = 0):
    """Users whose next item is usually one or two steps on: learnable, with the given history lengths."""
    rng = random.Random(seed)
    items = {str(i): {"title": " ".join(rng.sample(WORDS, 2)) + f" {i}"} for i in range(n_items)}
    rows, order = [], 0
    for u, n in enumerate(lengths):
        pos = rng.randrange(n_items)
        for t in range(n):
            pos = (pos + rng.choice([1, 1, 2])) % n_items
            rows.append(RawInteraction(user=f"u{u:03d}", item=str(pos), timestamp=float(t), order=order))
            order += 1
    return build_dataset(items, rows, source="synthetic")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """One zoo for the module: its tests share the feature caches (`short_features`, the heads' adapt calls)."""
    return build_zoo(
        tmp_path_factory.mktemp("zoo"),
        {
            "long": drifting_dataset([120, 51, 3, 7, 60, 10]),
            "short": drifting_dataset([random.Random(k).randint(4, 14) for k in range(60)], seed=1),
        },
    )


@pytest.fixture(scope="module")
def backbone(zoo):
    return load_backbone(zoo, "tiny-opt", dtype="fp32")


def history_rows(samples, user):
    """(position, target, role) of each history row of a user, in sample order, with its sample."""
    out = []
    for s in samples:
        if s.owner == user and s.roles[0] != ALIGN:
            out += [(s, k) for k in range(len(s.targets))]
    return out


def test_a_120_item_history_yields_117_training_rows_each_position_once(zoo, backbone):
    ds = load_dataset(zoo, "long")
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=50, stride=25, max_tokens=100_000))
    samples = build_samples(ds, itok, itok.encode_items(ds.items))
    for u, seq in enumerate(ds.sequences):
        rows = history_rows(samples, u)
        roles = [s.roles[k] for s, k in rows]
        targets = [s.targets[k] for s, k in rows]
        # one row per position 0..n-2, in order: position j predicts seq[j + 1]
        assert targets == seq[1:]
        assert roles.count(TRAIN) == len(seq) - 3 and roles[-2:] == [VALID, TEST]
    assert sum(1 for s, k in history_rows(samples, 0) if s.roles[k] == TRAIN) == 117
    assert len(ds.sequences[0]) == 120


def test_each_row_sees_its_window_and_enough_context(zoo, backbone):
    ds = load_dataset(zoo, "long")
    cfg = TextConfig(max_items=50, stride=25, max_tokens=100_000)
    itok = ItemTokenizer.create(backbone.tokenizer, cfg)
    toks = itok.encode_items(ds.items)
    samples = build_samples(ds, itok, toks)
    for u, seq in enumerate(ds.sequences):
        history = seq[:-1]
        for s in (s for s in samples if s.owner == u and s.roles[0] != ALIGN):
            # the sample is the text of a contiguous run of the history, at most max_items long ...
            n_items = s.tokens.count(itok.query_id)
            assert n_items <= cfg.max_items
            starts = [
                a
                for a in range(len(history) - n_items + 1)
                if itok.sequence([toks[i] for i in history[a : a + n_items]])[0] == s.tokens
            ]
            assert starts, "a window is not a contiguous run of the user's history"
            start = starts[0]
            # ... and each used query sees max_items - stride earlier items, or all there are
            first_used = n_items - len(s.query_pos)
            assert start == 0 or first_used >= cfg.max_items - cfg.stride
            for k, target in enumerate(s.targets):
                assert target == seq[start + first_used + k + 1]


def test_cached_row_equals_a_forward_pass_over_its_own_window(zoo, backbone):
    ds = load_dataset(zoo, "long")
    text = TextConfig(max_items=20, stride=10)
    _, fs = compute_features(zoo, backbone, ds, zoo.get("long").id, text)
    itok = ItemTokenizer.create(backbone.tokenizer, text)
    toks = itok.encode_items(ds.items)
    seq = ds.sequences[0]
    rows = torch.nonzero((fs.owner == 0) & (fs.roles != ALIGN)).flatten()
    assert fs.targets[rows].tolist() == seq[1:]
    for j in (0, 5, 19, 20, 30, 57, 100, len(seq) - 3, len(seq) - 2):
        # position j's window, rebuilt from the definition: it ends at the item after which the
        # window's used part ends; the cached row must equal a pass over exactly those items.
        row = int(rows[j])
        sample = fs.sample[row]
        first = int(torch.nonzero(fs.sample == sample).flatten()[0])
        n_used = int((fs.sample == sample).sum())
        end = j - (row - first) + n_used  # one past the window's last item
        start = end - itok.history_window([toks[i] for i in seq[:end]])
        tokens, qpos = itok.sequence([toks[i] for i in seq[start:end]])
        from st2si_cli.model.samples import Sample

        with torch.inference_mode():
            [alone] = forward_batch(backbone, [Sample(tokens, qpos, [], [], 0)])
        torch.testing.assert_close(fs.feats[row], alone[j - start], atol=1e-5, rtol=1e-5)


def test_stride_outside_the_window_is_refused(backbone):
    itok = ItemTokenizer.create(backbone.tokenizer, TextConfig(max_items=10, stride=11))
    with pytest.raises(ValueError, match="stride"):
        itok.windows([[1]] * 20)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=1.0)
    sched = lr_schedule(opt, HeadConfig(schedule="cosine", warmup=0.1, max_epochs=10), steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] > lrs[50] > lrs[99] >= 0 and lrs[99] < 0.01


@pytest.fixture(scope="module")
def short_features(zoo, backbone):
    ds = load_dataset(zoo, "short")
    _, fs = compute_features(zoo, backbone, ds, zoo.get("short").id, TextConfig())
    return ds, fs


def test_text_init_rows_follow_item_text_and_dropout_is_seeded(short_features, one_thread):
    ds, fs = short_features
    cfg = HeadConfig(lr=1e-2, batch_size=32, max_epochs=0, init="text")
    w = train_head(fs, ds.n_items, replace(cfg, max_epochs=1)).weight
    assert w.shape == (ds.n_items, fs.feats.shape[1])
    start = train_head(fs, ds.n_items, replace(cfg, max_epochs=1, lr=0.0)).weight  # lr 0: the init itself
    align = fs.rows(ALIGN)
    a = fs.feats[align] - fs.feats[align].mean(0)
    cos = torch.nn.functional.cosine_similarity(start[fs.targets[align]], a, dim=1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    d1 = train_head(fs, ds.n_items, replace(cfg, max_epochs=2, dropout=0.3, seed=4)).weight
    d2 = train_head(fs, ds.n_items, replace(cfg, max_epochs=2, dropout=0.3, seed=4)).weight
    assert torch.equal(d1, d2)


def test_sweep_chooses_on_validation_and_never_reads_test(short_features, one_thread):
    ds, fs = short_features
    base = HeadConfig(batch_size=64, max_epochs=3, patience=3, schedule="cosine")
    points = grid_points({"lr": (1e-4, 3e-2), "dropout": (0.0, 0.3)}, trials=None)
    assert len(points) == 4

    def run(features):
        return sweep(base, points, lambda cfg: train_head(features, ds.n_items, cfg))

    best_cfg, best, trials = run(fs)
    assert best.best_valid["NDCG@10"] == max(t.valid_ndcg10 for t in trials)
    assert {k: getattr(best_cfg, k) for k in ("lr", "dropout")} in points
    # Scrambling every test row (features and targets) changes nothing in the sweep.
    scrambled = type(fs)(fs.feats.clone(), fs.targets.clone(), fs.roles, fs.owner, fs.sample)
    test_rows = fs.rows(TEST)
    scrambled.feats[test_rows] = torch.randn(len(test_rows), fs.feats.shape[1]) * 100
    scrambled.targets[test_rows] = (scrambled.targets[test_rows] + 7) % ds.n_items
    cfg2, best2, trials2 = run(scrambled)
    assert cfg2 == best_cfg and [t.valid_ndcg10 for t in trials2] == [t.valid_ndcg10 for t in trials]
    assert torch.equal(best2.weight, best.weight)
    assert grid_points({"a": (1, 2, 3), "b": (1, 2)}, trials=3, seed=1) == grid_points(
        {"a": (1, 2, 3), "b": (1, 2)}, trials=3, seed=1
    )


def test_swept_text_initialised_head_round_trips_through_eval_and_recommend(zoo, one_thread):
    head = adapt(
        zoo,
        "short",
        backbone="tiny-opt",
        sweep_trials=2,
        head_cfg=HeadConfig(batch_size=64, max_epochs=2, init="text"),
        name="short/swept",
    )
    assert head.meta["head"] == "ilp-text" and head.meta["train"]["init"] == "text"
    sweep_meta = head.meta["sweep"]
    assert len(sweep_meta["trials"]) == 2 and sweep_meta["selection"].startswith("best validation")
    assert max(t["valid_ndcg10"] for t in sweep_meta["trials"]) == pytest.approx(
        head.meta["metrics"]["valid"]["NDCG@10"]
    )
    reloaded = Zoo(zoo.root).get("short/swept", kind="head")
    result = evaluate(zoo, "short", head_ref="short/swept", split="test")
    assert result["metrics"]["NDCG@10"] == pytest.approx(head.meta["metrics"]["test"]["NDCG@10"])
    ds = load_dataset(zoo, "short")
    _, fs = compute_features(
        zoo, load_backbone(zoo, "tiny-opt", dtype="fp32"), ds, zoo.get("short").id, TextConfig()
    )
    ranks = user_ranks(zoo, reloaded, fs, ds.sequences, TEST)
    assert len(ranks) == ds.n_users and int(ranks.min()) >= 1
    reqs = parse_requests(['{"user": "a", "history": ["1", "2", {"title": "red lamp"}]}'], "<test>", ds.items)
    [out] = recommend(zoo, "short", reqs, k=3, head_ref="short/swept")
    assert len(out["items"]) == 3


def json_line(history):
    import json

    return json.dumps({"user": "x", "history": history})


def test_trim_periods_drops_the_full_stop_before_the_query(backbone):
    plain = ItemTokenizer.create(backbone.tokenizer, TextConfig())
    trimmed = ItemTokenizer.create(backbone.tokenizer, TextConfig(trim_periods=True))
    item = {"title": "Steel ruler, 30 cm."}
    [a] = plain.encode_items([item])
    [b] = trimmed.encode_items([item])
    assert backbone.tokenizer.decode(a).endswith("cm.")
    assert backbone.tokenizer.decode(b) == "Steel ruler, 30 cm"
    assert TextConfig(trim_periods=True).to_dict() != TextConfig().to_dict()  # part of the cache key


def test_positions_newest_keeps_one_window_per_user(zoo, backbone):
    ds = load_dataset(zoo, "long")
    text = TextConfig(max_items=20, positions="newest")
    _, fs = compute_features(zoo, backbone, ds, zoo.get("long").id, text)
    for u, seq in enumerate(ds.sequences):
        rows = torch.nonzero((fs.owner == u) & (fs.roles != ALIGN)).flatten()
        assert len(rows) == min(20, len(seq) - 1)
        assert fs.targets[rows].tolist() == seq[len(seq) - len(rows) :]
    assert TextConfig(positions="newest").to_dict()["positions"] == "newest"
    assert "positions" not in TextConfig().to_dict()


def test_adapter_sweep_records_its_trials_and_keeps_the_best_on_validation(zoo, one_thread):
    from st2si_cli.model.adapter import AdapterConfig

    head = adapt(
        zoo,
        "short",
        backbone="tiny-opt",
        sweep_trials=2,
        name="short/adapter-swept",
        head_cfg=AdapterConfig(max_epochs=2, patience=2, max_len=8),
    )
    trials = head.meta["sweep"]["trials"]
    assert len(trials) == 2
    assert head.meta["metrics"]["valid"]["NDCG@10"] == pytest.approx(max(t["valid_ndcg10"] for t in trials))
    assert head.meta["train"]["hidden"] == head.meta["sweep"]["chosen"]["hidden"]
    result = evaluate(zoo, "short", head_ref="short/adapter-swept", split="valid")
    assert result["metrics"]["NDCG@10"] == pytest.approx(head.meta["metrics"]["valid"]["NDCG@10"])


def test_fusion_of_ilp_and_adapter_chooses_its_weight_on_validation(zoo, one_thread):
    from st2si_cli.heads.fusion import fuse_heads
    from st2si_cli.model.adapter import AdapterConfig

    ilp = adapt(
        zoo,
        "short",
        backbone="tiny-opt",
        name="short/ilp-for-fusion",
        head_cfg=HeadConfig(batch_size=64, max_epochs=3, lr=1e-2),
    )
    ad = adapt(
        zoo,
        "short",
        backbone="tiny-opt",
        name="short/adapter-for-fusion",
        head_cfg=AdapterConfig(hidden=16, max_epochs=3, patience=3, max_len=8),
    )
    fused = fuse_heads(zoo, ilp, [ad], name="short/fusion")
    trials = fused.meta["sweep"]["trials"]
    assert fused.meta["metrics"]["valid"]["NDCG@10"] == pytest.approx(max(t["valid_ndcg10"] for t in trials))
    # the end points of the grid are the two heads themselves
    by_w = {t["w"]: t["valid_ndcg10"] for t in trials}
    assert by_w[1.0] == pytest.approx(ilp.meta["metrics"]["valid"]["NDCG@10"])
    assert by_w[0.0] == pytest.approx(ad.meta["metrics"]["valid"]["NDCG@10"])
    result = evaluate(zoo, "short", head_ref="short/fusion", split="test")
    assert result["metrics"]["NDCG@10"] == pytest.approx(fused.meta["metrics"]["test"]["NDCG@10"])
    ds = load_dataset(zoo, "short")
    reqs = parse_requests(['{"user": "a", "history": ["1", "2", {"title": "red lamp"}]}'], "<test>", ds.items)
    [out] = recommend(zoo, "short", reqs, k=3, head_ref="short/fusion", exclude_history=True)
    assert len(out["items"]) == 3 and not {"1", "2"} & {i["id"] for i in out["items"]}
    with pytest.raises(Exception, match="ILP head first"):
        fuse_heads(zoo, ad, [ilp])
    with pytest.raises(Exception, match="adapter heads with the ILP"):
        fuse_heads(zoo, ilp, [ilp])

    # An ensemble: a second adapter from another seed is averaged with the first before the mix.
    ad2 = adapt(
        zoo,
        "short",
        backbone="tiny-opt",
        name="short/adapter-seed1",
        head_cfg=AdapterConfig(hidden=16, max_epochs=3, patience=3, max_len=8, seed=1),
    )
    ens = fuse_heads(zoo, ilp, [ad, ad2], name="short/fusion-ensemble")
    assert ens.meta["inputs"]["adapter_heads"] == [ad.id, ad2.id]
    assert ens.meta["metrics"]["valid"]["NDCG@10"] == pytest.approx(
        max(t["valid_ndcg10"] for t in ens.meta["sweep"]["trials"])
    )
    result = evaluate(zoo, "short", head_ref="short/fusion-ensemble", split="test")
    assert result["metrics"]["NDCG@10"] == pytest.approx(ens.meta["metrics"]["test"]["NDCG@10"])
    [out] = recommend(zoo, "short", reqs, k=3, head_ref="short/fusion-ensemble", exclude_history=True)
    assert len(out["items"]) == 3


def test_adapter_on_newest_window_features_is_a_clear_error(zoo):
    from st2si_cli.errors import St2siError
    from st2si_cli.model.adapter import AdapterConfig

    with pytest.raises(St2siError, match="every position"):
        adapt(
            zoo, "short", backbone="tiny-opt", text=TextConfig(positions="newest"), head_cfg=AdapterConfig()
        )
