"""The head contract, once for every registered kind (`st2si_cli.heads.registry.REGISTRY`): train on a
feature set -> `eval` reproduces the stored metrics -> `recommend` ranks a catalog history as `eval`
does -> `items add` extends the head (old tensors kept bit for bit) -> the stored head reloads and
scores the same. A new kind adds its small settings to `SMALL`; the test refuses a kind without."""

from __future__ import annotations

import json

import pytest
import torch

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.data.prepare import load_dataset
from st2si_cli.heads.fusion import FusionConfig
from st2si_cli.heads.registry import KINDS, REGISTRY, kind_of
from st2si_cli.heads.store import load_head_tensors
from st2si_cli.items import add_items
from st2si_cli.model.adapter import AdapterConfig
from st2si_cli.recommend import parse_requests, recommend
from st2si_cli.train.head import HeadConfig
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Zoo

FP32 = FeatureOptions(dtype="fp32")
ADAPTER = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=2)
SMALL = {
    "ilp": HeadConfig(max_epochs=2),
    "ilp-text": HeadConfig(max_epochs=2, init="text"),
    "adapter": ADAPTER,
    "sasrec": AdapterConfig(
        hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=2, use_text=False
    ),
    "fusion": FusionConfig(ilp=HeadConfig(max_epochs=2), adapters=[ADAPTER]),
}
NEW = [{"item": f"n{k}", "title": title} for k, title in enumerate(("red lamp", "glass mug", "steel clock"))]


def test_every_registered_kind_has_settings_here():
    assert set(SMALL) == set(KINDS)


def history_line(ds, user: int) -> str:
    """The user's catalog history without its test item (what `eval`'s test row reads)."""
    return json.dumps({"user": str(user), "history": [ds.items[i]["id"] for i in ds.sequences[user][:-1]]})


@pytest.mark.parametrize("kind", REGISTRY, ids=KINDS)
def test_head_kind_keeps_the_contract(kind, zoo, tmp_path, one_thread):
    # train on a feature set; the kind is recorded and found again
    head = adapt(
        zoo, "toy", backbone="tiny-opt", head_cfg=SMALL[kind.name], feature_opts=FP32, name=f"toy/{kind.name}"
    )
    meta = HeadMeta.of(head)
    assert meta.kind == kind.name and kind_of(head) is kind and meta.config_kind == kind.config_kind
    assert meta.protocol == {"ranking": "full", "ties": "pessimistic", "mask_history": False}

    # eval reproduces the metrics stored with the head, on both splits
    for split in ("valid", "test"):
        result = evaluate(zoo, "toy", head_ref=head.id, split=split)
        assert result["metrics"]["NDCG@10"] == pytest.approx(
            getattr(meta.metrics, split)["NDCG@10"], abs=1e-6
        )
    masked = evaluate(zoo, "toy", head_ref=head.id, mask_history=True)
    ds = load_dataset(zoo, "toy")
    assert masked["metrics"]["n_users"] == ds.n_users

    # recommend: a catalog history ranks its test item where eval does; exclusions hold
    from st2si_cli.features.cache import load_feature_set
    from st2si_cli.heads.registry import user_ranks
    from st2si_cli.model.samples import TEST
    from st2si_cli.zoo.meta import Inputs

    fs = load_feature_set(zoo, zoo.get(Inputs.of(head).first("features"), kind="features"))
    ranks = user_ranks(zoo, head, fs, ds.sequences, TEST)
    [out] = recommend(
        zoo, "toy", parse_requests([history_line(ds, 0)], "-", ds.items), k=ds.n_items, head_ref=head.id
    )
    ids = [item["id"] for item in out["items"]]
    assert ids.index(ds.items[ds.sequences[0][-1]]["id"]) + 1 == int(ranks[0])
    [excl] = recommend(
        zoo,
        "toy",
        parse_requests([history_line(ds, 1)], "-", ds.items),
        k=5,
        head_ref=head.id,
        exclude_history=True,
    )
    assert not {ds.items[i]["id"] for i in ds.sequences[1][:-1]} & {item["id"] for item in excl["items"]}

    # items add: the head is extended, every old tensor kept bit for bit, the new items reachable
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in NEW))
    change = add_items(zoo, "toy", path)
    [(was, new)] = [(w, n) for w, n in change.heads if w.id == head.id]
    new_meta = HeadMeta.of(new)
    assert new_meta.kind == kind.name and new_meta.n_items == ds.n_items + len(NEW)
    assert new_meta.catalog.trained_items == ds.n_items and new_meta.catalog.text_items == len(NEW)
    old_t, new_t = load_head_tensors(zoo, was), load_head_tensors(zoo, new)
    assert old_t.keys() == new_t.keys()
    for name, old in old_t.items():
        assert torch.equal(new_t[name][tuple(slice(0, s) for s in old.shape)], old), name
    grown = load_dataset(zoo, "toy")
    [all_items] = recommend(
        zoo,
        "toy",
        parse_requests([history_line(grown, 0)], "-", grown.items),
        k=grown.n_items,
        head_ref=new.id,
    )
    assert {r["item"] for r in NEW} <= {item["id"] for item in all_items["items"]}

    # reload: a fresh zoo handle loads the stored head and scores it the same
    before = evaluate(zoo, "toy", head_ref=new.id)["metrics"]
    after = evaluate(Zoo(zoo.root), "toy", head_ref=new.id)["metrics"]
    assert after == before
