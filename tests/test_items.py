"""Catalogs that change: `items add` places new items in every head from their text (old rows bit for bit),
`recommend` and `eval` use the grown catalog, retired items are never recommended, bad item files change
nothing. A tiny randomly initialised OPT on the synthetic "toy" domain."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli_here

from st2si_cli.adapt import FeatureOptions, adapt, evaluate
from st2si_cli.data.catalog import catalog_versions, retired_items
from st2si_cli.data.prepare import load_dataset
from st2si_cli.errors import InputError, MismatchError
from st2si_cli.heads.adapter import ADAPTER
from st2si_cli.heads.fusion import FUSION, fuse_heads
from st2si_cli.heads.placement import fit_ridge
from st2si_cli.heads.store import load_head_tensors, load_head_weight
from st2si_cli.items import ItemsOptions, add_items, update_items
from st2si_cli.model.adapter import AdapterConfig
from st2si_cli.model.scoring import top_k
from st2si_cli.recommend import parse_requests, recommend
from st2si_cli.train.head import HeadConfig

FP32 = FeatureOptions(dtype="fp32")
NEW = [
    {"item": "n1", "title": "red lamp wooden chair"},
    {"item": "n2", "title": "glass mug blue pen"},
    {"item": "n3", "title": "cotton book steel clock"},
]


def item_file(tmp_path, rows=NEW, name="new.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def zoo_state(zoo):
    rows = sorted((a.id, tuple(zoo.names_of(a))) for a in zoo.ls())
    return rows, sorted(p.name for p in zoo.iter_blob_files())


def ilp_head(zoo, **kw):
    return adapt(zoo, "toy", backbone="tiny-opt", head_cfg=HeadConfig(max_epochs=2, **kw), feature_opts=FP32)


def adapter_head(zoo):
    cfg = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=2)
    return adapt(zoo, "toy", backbone="tiny-opt", head_cfg=cfg, feature_opts=FP32)


def histories(zoo, ds, n=8):
    lines = [
        json.dumps({"user": u, "history": [ds.items[i]["id"] for i in ds.sequences[u][:-1]]})
        for u in range(n)
    ]
    return parse_requests(lines, "-", ds.items)


def test_items_add_places_new_items_and_keeps_old_rows_bit_for_bit(zoo, tmp_path, one_thread):
    old = ilp_head(zoo)
    ds_old = load_dataset(zoo, "toy")
    change = add_items(zoo, "toy", item_file(tmp_path))
    [(was, new)] = change.heads
    assert was.id == old.id and new.name == old.name and zoo.get(old.name).id == new.id
    w_old, w_new = load_head_weight(zoo, old), load_head_weight(zoo, new)
    n = ds_old.n_items
    assert w_new.shape[0] == n + 3 and torch.equal(w_new[:n], w_old)
    assert new.meta["catalog"]["trained_items"] == n and new.meta["catalog"]["text_items"] == 3
    assert new.meta["catalog"]["placement"]["method"] == "ridge"
    # the old version and the old head stay (by ID); the name moves
    ds = load_dataset(zoo, "toy")
    assert ds.items[:n] == ds_old.items and [it["id"] for it in ds.items[n:]] == ["n1", "n2", "n3"]
    assert [v["items"] for v in catalog_versions(zoo, change.dataset)] == [n, n + 3]
    assert zoo.get(old.id).id == old.id

    # the old items' scores come from the same rows (a BLAS kernel may round a wider matmul's last bit
    # differently, so compare them to float precision); new items are ranked with them
    hidden = torch.randn(5, w_old.shape[1])
    s_old, i_old = top_k(w_old, hidden, n)
    s_new, i_new = top_k(w_new, hidden, n + 3)
    for r in range(5):
        new_scores = dict(zip(i_new[r].tolist(), s_new[r].tolist()))
        got = torch.tensor([new_scores[i] for i in i_old[r].tolist()])
        assert torch.allclose(got, s_old[r], rtol=0, atol=1e-6)
    out = recommend(zoo, "toy", histories(zoo, ds), k=n + 3, dtype="fp32")
    returned = {it["id"] for row in out for it in row["items"]}
    assert {"n1", "n2", "n3"} <= returned
    assert all(len(row["items"]) == n + 3 for row in out)


def test_eval_on_the_grown_catalog_uses_the_carried_cache(zoo, tmp_path, one_thread):
    old = ilp_head(zoo)
    before = evaluate(zoo, "toy", feature_opts=FP32)
    change = add_items(zoo, "toy", item_file(tmp_path))
    carried = [a for a in zoo.ls("features") if a.meta.get("carried_from")]
    assert [a.meta["inputs"]["dataset"] for a in carried] == [change.dataset.id]
    after = evaluate(zoo, "toy", feature_opts=FP32)
    assert after["head_id"] == change.heads[0][1].id and after["metrics"]["n_users"] == 40
    assert len(zoo.ls("features")) == 2  # the grown catalog needed no new forward pass over the histories
    # the targets are old items: more candidates can only push them down
    assert after["metrics"]["MRR"] <= before["metrics"]["MRR"] + 1e-12
    with pytest.raises(MismatchError):  # the old head does not know the grown catalog
        evaluate(zoo, "toy", head_ref=old.id, feature_opts=FP32)


def test_adapter_and_fusion_heads_are_extended(zoo, tmp_path, one_thread):
    ilp = ilp_head(zoo, init="text")
    ad = adapter_head(zoo)
    fused = fuse_heads(zoo, ilp, [ad])
    change = add_items(zoo, "toy", item_file(tmp_path))
    new = {was.id: now for was, now in change.heads}
    assert set(new) == {ilp.id, ad.id, fused.id} and not change.skipped
    assert new[ilp.id].meta["catalog"]["placement"]["method"] == "text"
    n = load_dataset(zoo, ad.meta["dataset"]).n_items
    feats = [torch.randn(3, int(ad.meta["d_feat"])), torch.randn(2, int(ad.meta["d_feat"]))]
    ids = [[1, 2, 3], [4, n + 1]]  # a new item in a history reads as an unknown ID in the old head
    old_ids = [[1, 2, 3], [4, None]]
    a_old = ADAPTER.load(zoo, ad).score_histories(feats, old_ids)
    a_new = ADAPTER.load(zoo, new[ad.id]).score_histories(feats, ids)
    v_old, v_new = (
        ADAPTER.load(zoo, ad).item_vectors(),
        ADAPTER.load(zoo, new[ad.id]).item_vectors(),
    )
    assert torch.equal(v_new[:n], v_old)  # the old items' output vectors, bit for bit
    assert a_new.shape[1] == n + 3 and torch.allclose(a_new[:, :n], a_old, rtol=0, atol=1e-6)
    f_old, f_new = FUSION.load(zoo, fused), FUSION.load(zoo, new[fused.id])
    assert torch.equal(f_new.ilp_weight[:n], f_old.ilp_weight) and f_new.ilp_weight.shape[0] == n + 3
    ds = load_dataset(zoo, "toy")
    out = recommend(zoo, "toy", histories(zoo, ds), k=n + 3, head_ref=new[fused.id].id, dtype="fp32")
    assert {"n1", "n2", "n3"} <= {it["id"] for row in out for it in row["items"]}


def test_neighbour_placement_gives_each_new_item_what_its_nearest_known_item_learned(
    zoo, tmp_path, one_thread
):
    ilp, ad = ilp_head(zoo), adapter_head(zoo)
    n = load_dataset(zoo, "toy").n_items
    change = add_items(zoo, "toy", item_file(tmp_path), ItemsOptions(placement="neighbour"))
    new = {was.id: now for was, now in change.heads}
    assert new[ilp.id].meta["catalog"]["placement"]["method"] == "neighbour"
    assert "neighbour" in new[ad.id].meta["catalog"]["placement"]["method"]
    w_old, w_new = load_head_weight(zoo, ilp), load_head_weight(zoo, new[ilp.id])
    assert torch.equal(w_new[:n], w_old)  # old rows bit for bit
    e_old = load_head_tensors(zoo, ad)["item_emb.weight"]
    e_new = load_head_tensors(zoo, new[ad.id])["item_emb.weight"]
    assert torch.equal(e_new[:n], e_old[:n]) and torch.equal(e_new[-1], e_old[-1])  # old IDs, unknown ID
    for i in range(n, n + 3):
        source = [j for j in range(n) if torch.equal(w_new[i], w_old[j])]
        assert len(source) >= 1  # a copy of a trained row
        # the adapter takes the ID embedding of the same nearest item (rows may tie; the embedding decides)
        assert any(torch.equal(e_new[i], e_old[j]) for j in source)


def test_a_retired_item_is_never_recommended(zoo, one_thread):
    head = ilp_head(zoo)
    ds = load_dataset(zoo, "toy")
    first = recommend(zoo, "toy", histories(zoo, ds), k=3, dtype="fp32")
    gone = sorted({it["id"] for row in first for it in row["items"]})
    change = update_items(zoo, "toy", gone, retire=True)
    assert not change.heads and zoo.get("toy").id == change.dataset.id
    assert len(retired_items(zoo, change.dataset)) == len(gone)
    assert torch.equal(
        load_head_weight(zoo, zoo.get(head.name)), load_head_weight(zoo, head)
    )  # the row stays
    out = recommend(zoo, "toy", histories(zoo, ds), k=ds.n_items - len(gone), dtype="fp32")
    assert not set(gone) & {it["id"] for row in out for it in row["items"]}
    evaluate(zoo, "toy", feature_opts=FP32)  # the same catalog: old head, carried cache
    assert len(zoo.ls("features")) == 1 + len([a for a in zoo.ls("features") if a.meta.get("carried_from")])
    back = update_items(zoo, "toy", gone[:1], retire=False)
    assert len(retired_items(zoo, back.dataset)) == len(gone) - 1


def test_retitle_repoints_heads_and_recommend_shows_the_new_title(zoo, tmp_path, one_thread):
    ilp_head(zoo)
    add_items(zoo, "toy", item_file(tmp_path))
    change = update_items(zoo, "toy", ["n1", "3"], attributes={"title": "a brand new name"})
    [(was, now)] = change.heads
    w_was, w_now = load_head_weight(zoo, was), load_head_weight(zoo, now)
    ds = load_dataset(zoo, "toy")
    n1 = next(i for i, it in enumerate(ds.items) if it["id"] == "n1")
    keep = [i for i in range(len(ds.items)) if i != n1]
    assert torch.equal(w_now[keep], w_was[keep])  # trained rows (item 3's too) stay; n1 is placed anew
    assert not torch.equal(w_now[n1], w_was[n1]) and now.meta["catalog"]["placement"]["method"] == "ridge"
    out = recommend(zoo, "toy", histories(zoo, ds), k=len(ds.items), dtype="fp32")
    titles = {it["id"]: it["title"] for it in out[0]["items"]}
    assert titles["n1"] == titles["3"] == "a brand new name"


def test_items_cli_adds_and_zoo_info_shows_versions(zoo, tmp_path):
    ilp_head(zoo)
    csv = tmp_path / "new.csv"
    csv.write_text("item_id,title,brand\nc1,steel fan,acme\nc2,paper lamp,\n")
    r = run_cli_here(zoo, "items", "add", csv, "--domain", "toy", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (
        report["version"] == 2 and report["changed"] == ["c1", "c2"] and report["heads"][0]["text_items"] == 2
    )
    r = run_cli_here(zoo, "zoo", "info", "toy")
    assert r.returncode == 0, r.stderr
    assert "v1" in r.stdout and "v2" in r.stdout and "(add)" in r.stdout
    r = run_cli_here(zoo, "zoo", "info", report["heads"][0]["id"], "--json")
    assert json.loads(r.stdout)["catalog"]["text_items"] == 2
    r = run_cli_here(zoo, "items", "rm", "c1", "--domain", "toy")
    assert r.returncode == 0, r.stderr
    r = run_cli_here(zoo, "items", "update", "c1", "--domain", "toy", "--unretire", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["retired"] == 0, r.stderr
    r = run_cli_here(zoo, "items", "rm", "nope", "--domain", "toy")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "nope" in r.stderr


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("bad.jsonl", '{"item": "x1", "title": "ok"}\n{"item": "x2", "title": \n', 2, "malformed JSON"),
        ("bad.csv", "item,name_of_thing\nx1,lamp\n", 1, "no title"),
        (
            "bad.jsonl",
            '{"item": "x1", "title": "ok"}\n{"item": "3", "title": "again"}\n',
            2,
            "already in the catalog",
        ),
        ("bad.jsonl", '{"item": "x1", "title": "a"}\n{"item": "x1", "title": "b"}\n', 2, "twice"),
        ("bad.jsonl", "\n", None, "empty file"),
        ("bad.txt", "x1 lamp\n", None, "unsupported file type"),
    ],
)
def test_bad_item_files_are_one_line_errors_and_change_nothing(zoo, tmp_path, name, text, line, reason):
    ilp_head(zoo)
    path = tmp_path / name
    path.write_text(text)
    before = zoo_state(zoo)
    with pytest.raises(InputError) as e:
        add_items(zoo, "toy", path)
    assert e.value.line == line and reason in e.value.reason
    r = run_cli_here(zoo, "items", "add", path, "--domain", "toy")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"Error: {path}") and reason in r.stderr
    assert zoo_state(zoo) == before


def test_ridge_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    true = torch.randn(8, 4, generator=gen)
    y = x @ true + 0.5
    ridge = fit_ridge(x, y)
    x_new = torch.randn(10, 8, generator=gen)
    assert torch.allclose(ridge(x_new), x_new @ true + 0.5, atol=1e-2)
    assert ridge.info["strength"] == min(t["strength"] for t in ridge.info["trials"])


def test_a_head_without_alignment_rows_is_left_on_the_old_version(zoo, tmp_path, one_thread):
    head = adapt(
        zoo,
        "toy",
        backbone="tiny-opt",
        head_cfg=HeadConfig(max_epochs=1, alignment=False),
        feature_opts=FeatureOptions(dtype="fp32", alignment=False),
    )
    change = add_items(zoo, "toy", item_file(tmp_path))
    assert not change.heads and [(h.id, "alignment" in why) for h, why in change.skipped] == [(head.id, True)]
    assert load_dataset(zoo, "toy").n_items == load_dataset(zoo, head.meta["dataset"]).n_items + 3


def test_text_placement_sets_the_common_query_component_as_trained_rows_have_it():
    # Query features share one large direction (as SmolLM2's do); trained rows sit at a small negative
    # component along it. Text rows start with arbitrary components there: uncalibrated, some new item
    # scores above every trained one for every user; calibrated, none does, and the rest of each row is kept.
    from st2si_cli.heads.placement import BiasCalibration, text_rows

    g = torch.Generator().manual_seed(0)
    d, n_known, n_new = 32, 200, 20
    u = torch.zeros(d)
    u[0] = 1.0
    queries = torch.randn(500, d, generator=g) + 50.0 * u
    trained = 0.3 * torch.randn(n_known, d, generator=g)
    trained[:, 0] = -0.08 + 0.01 * torch.randn(n_known, generator=g)
    x_known = torch.randn(n_known, d, generator=g)
    x_new = torch.randn(n_new, d, generator=g)
    raw = text_rows(x_new, x_known)
    cal = BiasCalibration.fit(queries, trained)
    rows = text_rows(x_new, x_known, cal)
    assert torch.allclose(cal.direction, u, atol=0.05)
    assert torch.allclose(rows @ cal.direction, torch.full((n_new,), cal.component), atol=1e-5)
    off_axis = raw - (raw @ cal.direction)[:, None] * cal.direction
    assert torch.allclose(rows - cal.component * cal.direction, off_axis, atol=1e-5)

    def new_items_on_top(new_rows):  # share of users whose best item is a new one
        scores = queries @ torch.cat([trained, new_rows]).T
        return (scores.argmax(1) >= n_known).float().mean().item()

    assert new_items_on_top(raw) > 0.9 and new_items_on_top(rows) < 0.5
