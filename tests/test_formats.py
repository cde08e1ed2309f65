"""The input formats of `st2si prepare`: detection, parsing, and one dataset hash whatever the format.

Real data is read where it lies (the shared data folder beside the repository, the recbole wheel) and never copied; the small
datasets are written into tmp_path.
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA

from st2si_cli.data import formats
from st2si_cli.data.prepare import (
    load_dataset,
    parse_dataset,
    prepare_dataset,
    resolve_source_name,
)
from st2si_cli.errors import InputError
from st2si_cli.zoo.store import Zoo


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


# ---- one small dataset, written in every format --------------------------------------------------

ITEMS = {
    "7": {"title": "Red Mug", "brand": "Acme", "category": ["Kitchen", "Mugs"]},
    "12": {"title": "Blue Mug", "brand": "Acme", "category": ["Kitchen", "Mugs"]},
    "B00X": {"title": "Tea Pot", "brand": "Brewco", "category": ["Kitchen"]},
    "3": {"title": "Kettle  ", "brand": "Brewco", "category": ["Kitchen", "Appliances"]},
    "20": {"title": "Spoon", "brand": "", "category": ["Cutlery"]},
}
# (user, item, timestamp) in file order; u2's last two items tie on time: file order decides.
ROWS = [
    ("u1", "7", 100), ("u2", "B00X", 50), ("u1", "12", 101), ("u10", "3", 10), ("u2", "20", 60),
    ("u1", "B00X", 105), ("u10", "7", 11), ("u2", "3", 70), ("u2", "12", 70), ("u10", "20", 12),
    ("u1", "3", 107),
]  # fmt: skip


def timeline() -> dict[str, list[str]]:
    """Each user's items in time order, ties in file order."""
    order = sorted(range(len(ROWS)), key=lambda i: (ROWS[i][2], i))
    out: dict[str, list[str]] = {}
    for i in order:
        out.setdefault(ROWS[i][0], []).append(ROWS[i][1])
    return out


def flat(attrs: dict) -> dict:
    return {k: ", ".join(v) if isinstance(v, list) else v for k, v in attrs.items()}


def write_generic_csv(folder: Path) -> Path:
    with open(folder / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(ROWS)
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "brand", "category"])
        for key, a in ITEMS.items():
            w.writerow([key, a["title"], a["brand"], ", ".join(a["category"])])
    return folder


def write_generic_jsonl(folder: Path) -> Path:
    (folder / "interactions.jsonl").write_text(
        "".join(json.dumps({"user": u, "item": i, "timestamp": t}) + "\n" for u, i, t in ROWS)
    )
    (folder / "items.jsonl").write_text(
        "".join(json.dumps({"item": k, **a}) + "\n" for k, a in ITEMS.items())
    )
    return folder


def write_json_lists(folder: Path) -> Path:
    (folder / "Shop.inter.json").write_text(json.dumps(timeline()))
    items = {
        k: {"title": a["title"], "brand": a["brand"], "categories": ", ".join(a["category"])}
        for k, a in ITEMS.items()
    }
    (folder / "Shop.item.json").write_text(json.dumps(items, indent=2))
    return folder


def write_recbole(folder: Path) -> Path:
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{u}\t{i}\t4\t{t}" for u, i, t in ROWS]
    (folder / "shop.inter").write_text("\n".join(lines) + "\n")
    lines = ["item_id:token\ttitle:token_seq\tbrand:token\tclass:token_seq"]
    lines += [f"{k}\t{a['title']}\t{a['brand']}\t{', '.join(a['category'])}" for k, a in ITEMS.items()]
    (folder / "shop.item").write_text("\n".join(lines) + "\n")
    return folder


def write_amazon_raw(folder: Path) -> Path:
    with gzip.open(folder / "Shop_5.json.gz", "wt") as f:
        for u, i, t in ROWS:
            f.write(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0}) + "\n")
    with gzip.open(folder / "meta_Shop.json.gz", "wt") as f:
        for k, a in ITEMS.items():
            f.write(json.dumps({"asin": k, **a, "price": "$3"}) + "\n")
        f.write(json.dumps({"asin": "UNREVIEWED", "title": "Never bought"}) + "\n")
        f.write(json.dumps({"asin": "7", **ITEMS["7"]}) + "\n")  # an exact repeat is fine
    return folder


def write_recformer(folder: Path) -> Path:
    seqs = timeline()
    umap = {u: n for n, u in enumerate(seqs)}
    smap: dict[str, int] = {}
    for s in seqs.values():
        for i in s:
            smap.setdefault(i, len(smap))
    train = {str(umap[u]): [smap[i] for i in s[:-2]] for u, s in seqs.items()}
    val = {str(umap[u]): [smap[s[-2]]] for u, s in seqs.items()}
    test = {str(umap[u]): [smap[s[-1]]] for u, s in seqs.items()}
    meta = {
        k: {"title": a["title"], "brand": a["brand"], "category": ", ".join(a["category"])}
        for k, a in ITEMS.items()
    }
    meta["NOT_IN_SMAP"] = {"brand": "x"}  # the meta file covers the whole category: ignored
    for name, obj in [
        ("train", train),
        ("val", val),
        ("test", test),
        ("smap", smap),
        ("umap", umap),
        ("meta_data", meta),
    ]:
        (folder / f"{name}.json").write_text(json.dumps(obj))
    return folder


WRITERS = {
    "generic": write_generic_csv,
    "json-lists": write_json_lists,
    "recbole": write_recbole,
    "amazon-raw": write_amazon_raw,
    "recformer": write_recformer,
}


def make(tmp_path: Path, fmt: str, writer=None) -> Path:
    folder = tmp_path / fmt
    folder.mkdir()
    return (writer or WRITERS[fmt])(folder)


# ---- detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_detect_format_of_folder(tmp_path: Path, fmt: str) -> None:
    assert formats.detect_format(make(tmp_path, fmt)) == fmt


def test_detect_format_of_a_file_picks_its_dataset(tmp_path: Path) -> None:
    folder = make(tmp_path, "recbole")
    write_json_lists(folder)  # two datasets in one folder: ambiguous as a folder
    with pytest.raises(InputError, match="several datasets"):
        formats.detect_format(folder)
    assert formats.detect_format(folder / "shop.inter") == "recbole"
    assert formats.detect_format(folder / "Shop.item.json") == "json-lists"
    ds, fmt = parse_dataset(folder, format="json-lists")
    assert fmt == "json-lists" and ds.n_users == 3


def test_detect_format_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError, match="no recognisable dataset files; accepted formats: amazon-raw"):
        formats.detect_format(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        formats.detect_format(tmp_path / "nope")
    with pytest.raises(InputError, match="unknown format 'csv'; accepted formats"):
        parse_dataset(tmp_path, format="csv")
    with pytest.raises(InputError, match="no recbole dataset here: expected"):
        parse_dataset(tmp_path, format="recbole")


def test_real_data_detection() -> None:
    assert formats.detect_format(shared("amazon-scientific")) == "json-lists"
    assert formats.detect_format(shared("amazon-scientific-unisrec")) == "recbole-unisrec"
    path, fmt, _ = resolve_source_name("movielens-100k")
    assert formats.detect_format(path) == fmt == "recbole"


# ---- the same data in every format gives the same dataset ----------------------------------------


def test_every_format_gives_the_same_dataset_hash(tmp_path: Path) -> None:
    zoo = Zoo(tmp_path / "zoo")
    ids, hashes = {}, {}
    for fmt in WRITERS:
        art, ds = prepare_dataset(make(tmp_path, fmt), format=None, domain="shop", zoo=zoo)
        ids[fmt], hashes[fmt] = art.id, ds.content_hash()
        assert art.meta["format"] == fmt or art.meta["format"] == "generic"  # first put keeps its meta
    jl = tmp_path / "jsonl"
    jl.mkdir()
    write_generic_jsonl(jl)
    art, ds = prepare_dataset(jl, format=None, domain="shop", zoo=zoo)
    ids["generic-jsonl"] = art.id
    assert len(set(ids.values())) == 1, ids
    assert len(set(hashes.values())) == 1, hashes
    assert len(zoo.ls(kind="dataset")) == 1

    ds = load_dataset(zoo, "shop")
    assert ds.users == ["u1", "u10", "u2"]  # natural order: digit-only keys by value, others as text
    assert [it["id"] for it in ds.items] == ["3", "7", "12", "20", "B00X"]
    assert ds.items[0] == {"id": "3", "title": "Kettle", "brand": "Brewco", "category": "Kitchen, Appliances"}
    assert ds.items[3] == {"id": "20", "title": "Spoon", "category": "Cutlery"}  # empty brand dropped
    names = {u: [ds.items[i]["id"] for i in s] for u, s in zip(ds.users, ds.sequences, strict=True)}
    assert names == timeline()
    assert names["u2"][-2:] == ["3", "12"]  # the tie keeps file order
    assert ds.stats() == {"users": 3, "items": 5, "interactions": 11, "avg_length": 3.67, "density": 0.733333}
    assert load_dataset(zoo, ids["generic"][:10]).sequences == ds.sequences


def test_unisrec_text_is_the_title(tmp_path: Path) -> None:
    """UniSRec split files: history + target of the test row; items mapped back through item2index."""
    seqs = timeline()
    keys = list(ITEMS)
    folder = tmp_path / "uni"
    folder.mkdir()
    head = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    users = list(seqs)
    test = "".join(
        f"{users.index(u)}\t{' '.join(str(keys.index(i)) for i in s[:-1])}\t{keys.index(s[-1])}\n"
        for u, s in seqs.items()
    )
    (folder / "Shop.test.inter").write_text(head + test)
    (folder / "Shop.train.inter").write_text(head)
    (folder / "Shop.item2index").write_text("".join(f"{k}\t{n}\n" for n, k in enumerate(keys)))
    (folder / "Shop.user2index").write_text("".join(f"{u}\t{n}\n" for n, u in enumerate(users)))
    (folder / "Shop.text").write_text(
        "item_id:token\ttext:token_seq\n" + "".join(f"{k}\t{a['title']}\n" for k, a in ITEMS.items())
    )
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "items.jsonl").write_text(
        "".join(json.dumps({"item": k, "title": a["title"]}) + "\n" for k, a in ITEMS.items())
    )
    (gen / "interactions.jsonl").write_text(
        "".join(json.dumps({"user": u, "item": i}) + "\n" for u, s in seqs.items() for i in s)
    )
    a, fa = parse_dataset(folder)
    b, fb = parse_dataset(gen)
    assert (fa, fb) == ("recbole-unisrec", "generic")
    assert a.content_hash() == b.content_hash()


def test_recformer_cumulative_val_test_files_give_the_same_dataset(tmp_path: Path) -> None:
    """Recformer's val/test hold only the target; files holding the whole prefix read the same."""
    folder = make(tmp_path, "recformer")
    reference = parse_dataset(folder)[0].content_hash()
    train = json.loads((folder / "train.json").read_text())
    val = json.loads((folder / "val.json").read_text())
    test = json.loads((folder / "test.json").read_text())
    val = {u: train[u] + v for u, v in val.items()}
    test = {u: val[u] + t for u, t in test.items()}
    (folder / "val.json").write_text(json.dumps(val))
    (folder / "test.json").write_text(json.dumps(test))
    assert parse_dataset(folder)[0].content_hash() == reference


# ---- filtering and reporting ---------------------------------------------------------------------


def test_unknown_items_dropped_or_strict_error(tmp_path: Path) -> None:
    folder = make(tmp_path, "generic")
    with open(folder / "interactions.csv", "a") as f:
        f.write("u1,GHOST,200\nu2,GHOST,201\n")
    ds, _ = parse_dataset(folder)
    assert ds.report["interactions_with_unknown_item_dropped"] == 2
    assert ds.stats()["interactions"] == 11
    with pytest.raises(InputError) as e:
        parse_dataset(folder, strict=True)
    assert e.value.path == str(folder / "interactions.csv") and e.value.line == 13
    assert "GHOST" in str(e.value) and "items.csv" in str(e.value)


def test_strict_json_lists_names_the_users_line(tmp_path: Path) -> None:
    folder = make(tmp_path, "json-lists")
    seqs = timeline()
    seqs["u2"].append("GHOST")
    (folder / "Shop.inter.json").write_text(json.dumps(seqs, indent=1))
    with pytest.raises(InputError) as e:
        parse_dataset(folder, strict=True)
    assert e.value.line == (folder / "Shop.inter.json").read_text().splitlines().index(' "u2": [') + 1


def test_strict_recformer_names_the_index_file(tmp_path: Path) -> None:
    folder = make(tmp_path, "recformer")
    test = json.loads((folder / "test.json").read_text())
    test["1"] = [99]
    (folder / "test.json").write_text(json.dumps(test))
    ds, _ = parse_dataset(folder)
    assert ds.report["interactions_with_unknown_item_dropped"] == 1
    with pytest.raises(InputError, match=r"test\.json:1: user 'u2': item index 99 is not in smap\.json"):
        parse_dataset(folder, strict=True)


def test_amazon_raw_drops_untitled_items_and_counts_them(tmp_path: Path) -> None:
    folder = make(tmp_path, "amazon-raw")
    with gzip.open(folder / "Shop_5.json.gz", "at") as f:
        f.write(json.dumps({"reviewerID": "u1", "asin": "NOTITLE", "unixReviewTime": 300}) + "\n")
    with gzip.open(folder / "meta_Shop.json.gz", "at") as f:
        f.write(json.dumps({"asin": "NOTITLE", "brand": "x", "category": []}) + "\n")
    ds, fmt = parse_dataset(folder)
    assert fmt == "amazon-raw"
    assert ds.report["items_without_title_dropped"] == 1
    assert ds.report["interactions_with_unknown_item_dropped"] == 1
    assert ds.stats()["interactions"] == 11


def test_k_core_and_short_users(tmp_path: Path) -> None:
    folder = make(tmp_path, "generic")
    with open(folder / "interactions.csv", "a") as f:
        f.write("solo,7,1\nsolo,12,2\n")  # too short for leave-one-out
    ds, _ = parse_dataset(folder)
    assert ds.report["users_too_short_dropped"] == 1 and ds.n_users == 3
    ds, _ = parse_dataset(folder, k_core=2)
    assert ds.report["k_core"] == 2 and ds.n_users == 3 and ds.report["users_too_short_dropped"] == 1
    # with k = 3, B00X and 20 go, then u2 and u10, then everything: nothing is left
    with pytest.raises(InputError, match="no user has 3 or more"):
        parse_dataset(folder, k_core=3)


def test_unused_items_leave_the_catalog(tmp_path: Path) -> None:
    folder = make(tmp_path, "generic")
    with open(folder / "items.csv", "a") as f:
        f.write("999,Nobody buys this,,\n")
    ds, _ = parse_dataset(folder)
    assert ds.n_items == 5 and ds.report["items_without_interactions_dropped"] == 1


def test_identical_duplicate_items_are_fine_different_ones_are_not(tmp_path: Path) -> None:
    folder = make(tmp_path, "recbole")
    text = (folder / "shop.item").read_text()
    (folder / "shop.item").write_text(text + text.splitlines()[1] + "\n")
    assert parse_dataset(folder)[0].n_items == 5
    (folder / "shop.item").write_text(text + "7\tGreen Mug\tAcme\tKitchen\n")
    with pytest.raises(InputError, match=r"shop\.item:7: item '7' appears twice with different attributes"):
        parse_dataset(folder)


# ---- real data -----------------------------------------------------------------------------------


def test_amazon_scientific_json_lists() -> None:
    ds, fmt = parse_dataset(shared("amazon-scientific"))
    assert fmt == "json-lists"
    stats = ds.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (8317, 4344, 58492)
    assert ds.items[0]["id"] == "0" and ds.items[0]["title"].startswith("SUPCO SPP6")
    assert set(ds.items[0]) == {"id", "title", "description", "brand", "category"}


def test_amazon_scientific_unisrec() -> None:
    ds, fmt = parse_dataset(shared("amazon-scientific-unisrec"))
    assert fmt == "recbole-unisrec"
    stats = ds.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (8442, 4385, 59384)
    assert ds.items[0]["id"].startswith("B") and "PORTER-CABLE" in ds.items[0]["title"]
    assert "ABW8NXS7SV55K" in ds.users  # user keys mapped back through user2index


def test_movielens_100k_from_the_wheel_and_the_tie_rule() -> None:
    path, fmt, _ = resolve_source_name("movielens-100k")
    ds, got = parse_dataset(path, format=fmt)
    assert got == "recbole"
    stats = ds.stats()
    assert (stats["users"], stats["items"], stats["interactions"]) == (943, 1682, 100000)
    # Independent check: each user's rows sorted by timestamp, stably in file order; the last is the test target.
    rows: dict[str, list[tuple[float, str]]] = {}
    with open(path / "ml-100k.inter", encoding="utf-8") as f:
        next(f)
        for line in f:
            user, item, _, ts = line.rstrip("\n").split("\t")
            rows.setdefault(user, []).append((float(ts), item))
    ties = 0
    for u, user_rows in rows.items():
        ordered = sorted(user_rows, key=lambda r: r[0])  # sorted() is stable
        ties += ordered[-1][0] == ordered[-2][0]
        split = ds.split(ds.users.index(u))
        assert ds.items[split["test_target"]]["id"] == ordered[-1][1]
        assert ds.items[split["valid_target"]]["id"] == ordered[-2][1]
    assert ties == 415
    assert ds.items[0]["id"] == "1" and ds.items[0]["title"] == "Toy Story"
    assert ds.items[0]["year"] == "1995" and ds.items[0]["category"].startswith("Animation")
