"""Sequence adapter (SASRec over language-model features) on a tiny synthetic FeatureSet."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from st2si_cli.features.cache import FeatureSet
from st2si_cli.model.adapter import AdapterConfig, SequenceAdapter, adapter_tensors, load_adapter
from st2si_cli.model.samples import ALIGN, TEST, TRAIN, VALID
from st2si_cli.train.adapter import evaluate_adapter, train_adapter, training_windows, user_sequences

N_ITEMS, N_USERS, D = 20, 40, 8


def synthetic(n_users: int = N_USERS, long_user: int | None = None) -> tuple[FeatureSet, list[list[int]]]:
    """Next item = (current + 1) mod N; a feature = a fixed random vector of the current item + noise.

    History rows of user u are positions j = 0..n-2 (target seq[j+1]) in order, then one ALIGN row
    per item (that item's vector + noise), as `features.build_samples` lays them out.
    """
    g = torch.Generator().manual_seed(1)
    item_vec = torch.randn(N_ITEMS, D, generator=g)
    sequences = []
    for u in range(n_users):
        n = long_user if u == 0 and long_user else int(torch.randint(5, 12, (1,), generator=g))
        start = int(torch.randint(N_ITEMS, (1,), generator=g))
        sequences.append([(start + k) % N_ITEMS for k in range(n)])
    feats, targets, roles, owner = [], [], [], []
    for u, seq in enumerate(sequences):
        n = len(seq)
        for j in range(n - 1):
            feats.append(item_vec[seq[j]])
            targets.append(seq[j + 1])
            roles.append(TEST if j == n - 2 else VALID if j == n - 3 else TRAIN)
            owner.append(u)
    for i in range(N_ITEMS):
        feats.append(item_vec[i])
        targets.append(i)
        roles.append(ALIGN)
        owner.append(i)
    f = torch.stack(feats)
    fs = FeatureSet(
        feats=f + 0.1 * torch.randn(f.shape, generator=g),
        targets=torch.tensor(targets),
        roles=torch.tensor(roles, dtype=torch.int8),
        owner=torch.tensor(owner),
        sample=torch.tensor(owner),
    )
    return fs, sequences


def tiny(**kw) -> AdapterConfig:
    base = dict(
        hidden=16, layers=1, heads=2, dropout=0.1, max_len=8, lr=1e-2, batch_size=8, max_epochs=25, patience=5
    )
    return AdapterConfig(**{**base, **kw})


def test_user_sequences_layout():
    fs, seqs = synthetic()
    users = user_sequences(fs, seqs)
    assert len(users) == N_USERS
    for (rows, ids), seq in zip(users, seqs):
        assert ids == seq[:-1]
        assert bool((rows[1:] > rows[:-1]).all())
        assert fs.targets[rows].tolist() == seq[1:]
        assert bool((fs.roles[rows] != ALIGN).all())
    broken = list(seqs)
    broken[7] = seqs[7][:2] + [(seqs[7][2] + 3) % N_ITEMS] + seqs[7][3:]
    with pytest.raises(ValueError, match="user 7"):
        user_sequences(fs, broken)
    fs.roles[fs.owner.eq(3) & fs.roles.eq(VALID)] = TRAIN
    with pytest.raises(ValueError, match="user 3"):
        user_sequences(fs, seqs)


def test_training_windows_use_every_train_position_once():
    fs, seqs = synthetic(long_user=15)
    windows = training_windows(user_sequences(fs, seqs), max_len=4)
    used = torch.cat([rows for rows, _ in windows])
    assert used.numel() == fs.rows(TRAIN).numel()
    assert sorted(used.tolist()) == fs.rows(TRAIN).tolist()
    assert all(1 <= len(ids) <= 4 and len(rows) == len(ids) for rows, ids in windows)
    long = [ids for rows, ids in windows if int(fs.owner[rows[0]]) == 0]  # 12 training positions
    assert long == [seqs[0][0:4], seqs[0][4:8], seqs[0][8:12]][::-1]


def test_training_learns_and_is_deterministic(one_thread):
    fs, seqs = synthetic()
    cfg = tiny()
    a = train_adapter(fs, seqs, N_ITEMS, cfg)
    b = train_adapter(fs, seqs, N_ITEMS, cfg)
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.best_epoch == b.best_epoch and [h["valid_NDCG@10"] for h in a.history] == [
        h["valid_NDCG@10"] for h in b.history
    ]
    # A random scorer ranks the target uniformly in 1..20: expected NDCG@10 = sum_{r<=10} 1/log2(r+1) / 20
    # = 0.23 with a per-user std of about 0.33, so about 0.05 over 40 users; 0.7 is ~9 std above it.
    assert a.best_valid["NDCG@10"] > 0.7
    model = load_adapter(a.state_dict, cfg.to_dict(), D, N_ITEMS)
    assert evaluate_adapter(model, fs, seqs, VALID)["NDCG@10"] == pytest.approx(a.best_valid["NDCG@10"])
    assert evaluate_adapter(model, fs, seqs, TEST)["NDCG@10"] > 0.7


def model_for_checks() -> SequenceAdapter:
    torch.manual_seed(0)
    return SequenceAdapter(tiny(layers=2), D, N_ITEMS, torch.randn(N_ITEMS, D)).eval()


def test_causal():
    model = model_for_checks()
    feats, ids, lengths = torch.randn(1, 6, D), torch.randint(N_ITEMS, (1, 6)), torch.tensor([6])
    feats2, ids2 = feats.clone(), ids.clone()
    feats2[0, 3] += 1.0
    ids2[0, 3] = (ids[0, 3] + 1) % N_ITEMS
    with torch.no_grad():
        h, h2 = model(feats, ids, lengths), model(feats2, ids2, lengths)
    torch.testing.assert_close(h[:, :3], h2[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(h[:, 3], h2[:, 3])


def test_padding_does_not_change_scores():
    model = model_for_checks()
    short_f, short_i = torch.randn(1, 3, D), torch.randint(N_ITEMS, (1, 3))
    long_f, long_i = torch.randn(1, 7, D), torch.randint(N_ITEMS, (1, 7))
    feats = torch.zeros(2, 7, D)
    ids = torch.full((2, 7), N_ITEMS)
    feats[0, :3], ids[0, :3] = short_f[0], short_i[0]
    feats[1], ids[1] = long_f[0], long_i[0]
    with torch.no_grad():
        alone = model.score_last(short_f, short_i, torch.tensor([3]))
        batched = model.score_last(feats, ids, torch.tensor([3, 7]))
        hidden = model(feats, ids, torch.tensor([3, 7]))
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        batched[1:], model.score_last(long_f, long_i, torch.tensor([7])), atol=1e-5, rtol=0
    )


def test_save_load_round_trip():
    model = model_for_checks()
    blob = save(adapter_tensors(model))
    loaded = load_adapter(load(blob), model.cfg.to_dict(), D, N_ITEMS)
    feats, ids, lengths = torch.randn(3, 5, D), torch.randint(N_ITEMS, (3, 5)), torch.tensor([5, 2, 4])
    with torch.no_grad():
        assert torch.equal(model.score_last(feats, ids, lengths), loaded.score_last(feats, ids, lengths))


@pytest.mark.parametrize("switch", [{"use_ids": False}, {"use_text": False}])
def test_switches_train_and_score(switch, one_thread):
    fs, seqs = synthetic()
    cfg = tiny(max_epochs=3, **switch)
    result = train_adapter(fs, seqs, N_ITEMS, cfg)
    assert len(result.history) == 3
    model = load_adapter(load(save(result.state_dict)), cfg.to_dict(), D, N_ITEMS)
    assert ("item_emb.weight" in result.state_dict) == cfg.use_ids
    assert ("item_proj.weight" in result.state_dict) == cfg.use_text
    metrics = evaluate_adapter(model, fs, seqs, TEST, ks=(5, 10))
    assert metrics["n_users"] == N_USERS and 0.0 <= metrics["NDCG@10"] <= 1.0
