"""`st2si prepare`, run in this process through the CLI's own entry (`run_cli_here`): Table 1 on stdout,
one `Error:` line on stderr for bad input, and a zoo that bad input leaves byte-for-byte as it was."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import SHARED_DATA, run_cli_here

ITEMS = [
    ("7", "Red Mug", "Acme", "Kitchen, Mugs"),
    ("12", "Blue Mug", "Acme", "Kitchen, Mugs"),
    ("B00X", "Tea Pot", "Brewco", "Kitchen"),
    ("3", "Kettle", "Brewco", "Kitchen, Appliances"),
]
ROWS = [
    ("u1", "7", 100), ("u1", "12", 101), ("u1", "B00X", 105), ("u1", "3", 107),
    ("u2", "B00X", 50), ("u2", "3", 70), ("u2", "12", 70),
    ("u3", "3", 10), ("u3", "7", 11), ("u3", "12", 12),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the zoo root, index.db included, byte for byte."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_generic(folder: Path, items=ITEMS, rows=ROWS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "interactions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "timestamp"])
        w.writerows(rows)
    with open(folder / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["item", "title", "brand", "category"])
        w.writerows(items)
    return folder


def write_json_lists(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    order = sorted(range(len(ROWS)), key=lambda i: (ROWS[i][2], i))
    lists: dict[str, list[str]] = {}
    for i in order:
        lists.setdefault(ROWS[i][0], []).append(ROWS[i][1])
    (folder / "Shop.inter.json").write_text(json.dumps(lists, indent=2))
    items = {k: {"title": t, "brand": b, "categories": c} for k, t, b, c in ITEMS}
    (folder / "Shop.item.json").write_text(json.dumps(items, indent=2))
    return folder


def write_amazon(folder: Path, meta_lines: list[str] | None = None, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".json.gz" if gz else ".json"
    opener = gzip.open if gz else open
    with opener(folder / f"Shop_5{ext}", "wt") as f:
        for u, i, t in ROWS * 30:
            f.write(
                json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "reviewText": "x" * 200}) + "\n"
            )
    if meta_lines is None:
        meta_lines = [
            json.dumps({"asin": k, "title": t, "brand": b, "category": c.split(", ")}) for k, t, b, c in ITEMS
        ]
    with opener(folder / f"meta_Shop{ext}", "wt") as f:
        f.write("\n".join(meta_lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo holding one good dataset, prepared by the CLI."""
    base = tmp_path_factory.mktemp("prepare")
    root = base / "zoo"
    r = run_cli_here(root, "prepare", write_generic(base / "good"), "--domain", "shop")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "#Users" in r.stdout and "#Interactions" in r.stdout
    assert re.search(r"dataset hash: [0-9a-f]{64}", r.stdout)
    assert "interactions with unknown item dropped: 0" in r.stdout
    return root


# ---- good input ----------------------------------------------------------------------------------


def test_json_output_and_same_hash_across_formats(zoo: Path, tmp_path: Path) -> None:
    a = run_cli_here(zoo, "prepare", write_generic(tmp_path / "csv"), "--domain", "shop", "--json")
    b = run_cli_here(zoo, "prepare", write_json_lists(tmp_path / "jl"), "--domain", "shop2", "--json")
    c = run_cli_here(
        zoo,
        "prepare",
        write_amazon(tmp_path / "amz"),
        "--domain",
        "shop3",
        "--json",
        "--format",
        "amazon-raw",
    )
    for r in (a, b, c):
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
    ja, jb, jc = (json.loads(r.stdout) for r in (a, b, c))
    assert set(ja) == {"name", "id", "stats", "report", "format"}
    assert ja["name"] == "shop" and ja["format"] == "generic" and jb["format"] == "json-lists"
    assert ja["stats"] == {
        "users": 3,
        "items": 4,
        "interactions": 10,
        "avg_length": 3.33,
        "density": 0.833333,
    }
    assert ja["id"] == jb["id"]
    # amazon-raw keeps categories as a list ("Kitchen, Mugs" either way) but every review 30 times
    assert jc["stats"]["interactions"] == 300 and jc["format"] == "amazon-raw"


def test_explicit_item_and_interaction_files(zoo: Path, tmp_path: Path) -> None:
    folder = write_generic(tmp_path / "x")
    inter, items = folder / "interactions.csv", folder / "items.csv"
    inter.rename(tmp_path / "events.csv")
    items.rename(tmp_path / "catalogue.csv")
    r = run_cli_here(zoo, "prepare", "--interactions", tmp_path / "events.csv", "--items", tmp_path / "catalogue.csv",
                "--domain", "shop", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["interactions"] == 10


def test_movielens_100k_by_short_name(tmp_path: Path) -> None:
    pytest.importorskip("recbole", reason="the recbole wheel carries ml-100k")
    r = run_cli_here(tmp_path / "zoo", "prepare", "--source", "movielens-100k", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "ml-100k" and out["format"] == "recbole"
    assert (out["stats"]["users"], out["stats"]["items"], out["stats"]["interactions"]) == (943, 1682, 100000)


def test_amazon_scientific_table(tmp_path: Path) -> None:
    folder = SHARED_DATA / "amazon-scientific"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    r = run_cli_here(tmp_path / "zoo", "prepare", folder, "--domain", "scientific")
    assert r.returncode == 0, r.stderr
    assert "8,317" in r.stdout and "4,344" in r.stdout and "58,492" in r.stdout


def test_usage_errors(zoo: Path, tmp_path: Path) -> None:
    before = snapshot(zoo)
    r = run_cli_here(zoo, "prepare", write_generic(tmp_path / "g"))  # no --domain
    assert r.returncode == 2 and "--domain" in r.stderr
    r = run_cli_here(zoo, "prepare", "--source", "no-such-dataset", "--domain", "x")
    assert r.returncode != 0 and r.stderr.startswith("Error: unknown dataset short name")
    assert snapshot(zoo) == before


# ---- bad input: one line on stderr, non-zero exit, zoo unchanged ----------------------------------

Case = Callable[[Path], tuple[list, str, str]]  # -> (args, "file:line:" or "file:" prefix, message part)


def truncated_gzip(d: Path):
    write_amazon(d)
    path = d / "Shop_5.json.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [d], rf"{re.escape(str(path))}:\d+: ", "truncated gzip"


def malformed_json_line(d: Path):
    lines = [json.dumps({"asin": k, "title": t}) for k, t, _, _ in ITEMS]
    lines[2] = '{"asin": "B00X", "title": }'
    write_amazon(d, lines, gz=False)
    return [d], rf"{re.escape(str(d / 'meta_Shop.json'))}:3: ", "malformed JSON"


def python_literal_meta(d: Path):
    lines = [repr({"asin": k, "title": t}) for k, t, _, _ in ITEMS]
    write_amazon(d, lines)
    return [d], rf"{re.escape(str(d / 'meta_Shop.json.gz'))}:1: ", "Python literal, not JSON"


def missing_title_column(d: Path):
    write_generic(d)
    (d / "items.csv").write_text("item,name_of_thing,brand\n7,Red Mug,Acme\n")
    return [d, "--format", "generic"], rf"{re.escape(str(d / 'items.csv'))}:1: ", "no title"


def missing_title_field(d: Path):
    write_json_lists(d)
    items = json.loads((d / "Shop.item.json").read_text())
    del items["B00X"]["title"]
    (d / "Shop.item.json").write_text(json.dumps(items, indent=2))
    line = (d / "Shop.item.json").read_text().splitlines().index('  "B00X": {') + 1
    return [d], rf"{re.escape(str(d / 'Shop.item.json'))}:{line}: ", "item 'B00X' has no title field"


def unknown_format(d: Path):
    write_generic(d)
    return (
        [d, "--format", "parquet"],
        rf"{re.escape(str(d))}: ",
        "unknown format 'parquet'; accepted formats: amazon-raw",
    )


def empty_file(d: Path):
    write_generic(d)
    (d / "items.csv").write_bytes(b"")
    return [d], rf"{re.escape(str(d / 'items.csv'))}: ", "empty file"


def non_utf8(d: Path):
    d.mkdir()
    (d / "shop.inter").write_text(
        "user_id:token\titem_id:token\ttimestamp:float\n" + "".join(f"{u}\t{i}\t{t}\n" for u, i, t in ROWS)
    )
    (d / "shop.item").write_bytes(b"item_id:token\tmovie_title:token_seq\n7\tRed Mug\n12\tCaf\xe9 Mug\n")
    return [d], rf"{re.escape(str(d / 'shop.item'))}:3: ", "not UTF-8"


def duplicate_item_ids(d: Path):
    write_generic(d, items=[*ITEMS, ("12", "Green Mug", "Acme", "Kitchen")])
    return [d], rf"{re.escape(str(d / 'items.csv'))}:6: ", "item '12' appears twice with different attributes"


def duplicate_json_keys(d: Path):
    write_json_lists(d)
    text = (d / "Shop.item.json").read_text()
    text = text.replace('"B00X": {', '"12": {"title": "Other"},\n  "B00X": {', 1)
    (d / "Shop.item.json").write_text(text)
    line = text.splitlines().index('  "12": {"title": "Other"},') + 1
    return (
        [d],
        rf"{re.escape(str(d / 'Shop.item.json'))}:{line}: ",
        "key '12' appears twice with different values",
    )


def malformed_json_document(d: Path):
    write_json_lists(d)
    (d / "Shop.inter.json").write_text('{"u1": [7, 12, 3],\n "u2": [3, 12\n}\n')
    return [d], rf"{re.escape(str(d / 'Shop.inter.json'))}:3: ", "malformed JSON"


def unrecognisable_dir(d: Path):
    d.mkdir()
    (d / "README.txt").write_text("nothing here\n")
    return [d, "--domain", "x"], rf"{re.escape(str(d))}: ", "no recognisable dataset files; accepted formats"


def missing_path(d: Path):
    return [d / "nope"], rf"{re.escape(str(d / 'nope'))}: ", "no such file or directory"


def strict_unknown_item(d: Path):
    write_generic(d, rows=[*ROWS, ("u3", "GHOST", 13)])
    return [d, "--strict"], rf"{re.escape(str(d / 'interactions.csv'))}:12: ", "'GHOST' is not in items.csv"


def wrong_field_count(d: Path):
    d.mkdir()
    (d / "shop.inter").write_text("user_id:token\titem_id:token\n1\t7\n1\t12\textra\n")
    (d / "shop.item").write_text("item_id:token\ttitle:token_seq\n7\tRed Mug\n")
    return [d], rf"{re.escape(str(d / 'shop.inter'))}:3: ", "3 tab-separated fields, the header has 2"


def bad_timestamp(d: Path):
    d.mkdir()
    with gzip.open(d / "Shop.json.gz", "wt") as f:
        f.write(json.dumps({"reviewerID": "u", "asin": "7", "unixReviewTime": "yesterday"}) + "\n")
    with gzip.open(d / "meta_Shop.json.gz", "wt") as f:
        f.write(json.dumps({"asin": "7", "title": "Red Mug"}) + "\n")
    return [d], rf"{re.escape(str(d / 'Shop.json.gz'))}:1: ", "timestamp 'yesterday' is not a number"


def recformer_missing_title(d: Path):
    d.mkdir()
    files = {
        "train": {"0": [0, 1], "1": [1, 0]},
        "val": {"0": [1], "1": [0]},
        "test": {"0": [0], "1": [1]},
        "smap": {"A1": 0, "A2": 1},
        "meta_data": {"A1": {"title": "One", "brand": "b"}, "A2": {"brand": "b", "category": "c"}},
    }
    for name, obj in files.items():
        (d / f"{name}.json").write_text(json.dumps(obj))
    return [d], rf"{re.escape(str(d / 'meta_data.json'))}:1: ", "item 'A2' has no title field"


BAD: list[Case] = [
    truncated_gzip,
    malformed_json_line,
    python_literal_meta,
    missing_title_column,
    missing_title_field,
    unknown_format,
    empty_file,
    non_utf8,
    duplicate_item_ids,
    duplicate_json_keys,
    malformed_json_document,
    unrecognisable_dir,
    missing_path,
    strict_unknown_item,
    wrong_field_count,
    bad_timestamp,
    recformer_missing_title,
]


@pytest.mark.parametrize("case", BAD, ids=[c.__name__ for c in BAD])
def test_bad_input_one_error_line_and_zoo_unchanged(zoo: Path, tmp_path: Path, case: Case) -> None:
    args, where, what = case(tmp_path / "in")
    if "--domain" not in args:
        args = [*args, "--domain", "shop"]
    before = snapshot(zoo)
    r = run_cli_here(zoo, "prepare", *args)
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert re.match(rf"Error: {where}", lines[0]), lines[0]
    assert what in lines[0]
    assert snapshot(zoo) == before
