"""Every row of tests/bad_inputs.tsv: a bad command line or input file, its exit code and a fragment of
its message. Each row runs in this process (the CLI's `run`, as `main` calls it) against one small zoo
built once for the module, which must be byte-identical afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shlex
import sqlite3
import sys
from pathlib import Path

import pytest
from helpers import build_zoo, quick_head, synthetic_dataset

from st2si_cli.cli.app import run

TABLE = Path(__file__).with_name("bad_inputs.tsv")


def _rows() -> list[tuple[str, str, str | None, int, str]]:
    rows = []
    for line in TABLE.read_text("utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        rid, args, stdin, code, fragment = line.split("\t")
        text = None if stdin == "-" else stdin.encode().decode("unicode_escape")
        rows.append((rid, args, text, int(code), fragment))
    return rows


ROWS = _rows()


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under the zoo root, byte for byte. The index's write-ahead log is folded
    into index.db first: SQLite moves pages from one to the other whenever a connection closes, which
    changes no content; the shared-memory file is SQLite's scratch space and left out."""
    with contextlib.closing(sqlite3.connect(root / "index.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("index.db-shm", "index.db-wal")
    }


def _write_bad_files(data: Path) -> None:
    data.mkdir()
    (data / "regular-file").write_text("not a zoo\n")
    (data / "line3.jsonl").write_text(
        '{"user": "a", "history": ["1"]}\n{"user": "b", "history": ["2"]}\n{"user": "c", "history": ["x9"]}\n'
    )
    (data / "notutf8.jsonl").write_bytes(b'{"user": "a", "history": ["1"]}\n{"user": "\xff\xfe"}\n')
    (data / "deep.jsonl").write_text("[" * 100_000 + "\n")
    shop = data / "unterminated"
    shop.mkdir()
    # items.csv of 10 lines whose line 5 opens a quote it never closes.
    items = ["item,title"] + [f"{i},Item number {i}" for i in range(1, 10)]
    items[4] = '4,"Item number 4 with an open quote'
    (shop / "items.csv").write_text("\n".join(items) + "\n")
    (shop / "interactions.csv").write_text(
        "user,item,timestamp\n" + "".join(f"u{u},{i},{i}\n" for u in range(3) for i in range(1, 10))
    )
    nocol = data / "nocolumn"
    nocol.mkdir()
    (nocol / "items.csv").write_text("id,title\n1,One\n")
    (nocol / "interactions.csv").write_text("user,thing,timestamp\nu1,1,1\n")
    (data / "empty").mkdir()
    deep = data / "deep-generic"  # line 2 of interactions.jsonl nests deeper than the recursion limit
    deep.mkdir()
    (deep / "items.csv").write_text("item,title\n1,One\n")
    (deep / "interactions.jsonl").write_text('{"user": "u", "item": "1"}\n' + '{"a": ' * 100_000 + "\n")
    (data / "unknown-model").mkdir()  # a model folder whose architecture transformers does not know
    (data / "unknown-model" / "config.json").write_text('{"model_type": "nosuchmodel", "hidden_size": 8}\n')
    for name, ts in (
        ("nan-ts", "nan"),
        ("inf-ts", "inf"),
        ("neginf-ts", "-inf"),
    ):  # line 3 of interactions.csv
        (data / name).mkdir()
        (data / name / "items.csv").write_text("item,title\n1,One\n2,Two\n")
        (data / name / "interactions.csv").write_text(f"user,item,timestamp\nu1,1,1\nu1,2,{ts}\nu1,1,3\n")
    (data / "jsonl-ts").mkdir()  # JSON's NaN literal on line 2
    (data / "jsonl-ts" / "items.csv").write_text("item,title\n1,One\n")
    (data / "jsonl-ts" / "interactions.jsonl").write_text(
        '{"user":"u","item":"1","timestamp":1}\n{"user":"u","item":"1","timestamp":NaN}\n'
    )
    (data / "surrogate").mkdir()  # a lone surrogate in the title on line 2 of items.jsonl
    (data / "surrogate" / "items.jsonl").write_text(
        '{"item":"new1","title":"Fine"}\n{"item":"new2","title":"x\\ud800"}\n'
    )
    (data / "surrogate" / "interactions.csv").write_text(
        "user,item,timestamp\nu1,new1,1\nu1,new2,2\nu1,new1,3\n"
    )


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The zoo (tiny-opt, the synthetic domain "toy" and one ILP head) and the folder of bad files."""
    root = tmp_path_factory.mktemp("bad-inputs")
    zoo = build_zoo(root / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy")
    _write_bad_files(root / "data")
    return zoo.root, root / "data"


def test_the_table_is_large_and_covers_every_command():
    commands = {shlex.split(args)[0] for _, args, *_ in ROWS} | {
        shlex.split(args)[1] for _, args, *_ in ROWS if args.startswith("zoo ")
    }
    assert len(ROWS) >= 60 and len({r[0] for r in ROWS}) == len(ROWS)
    assert {"adapt", "eval", "fuse", "prepare", "pretrain", "quickstart", "recommend", "zoo"} <= commands
    assert {"info", "rm", "ls", "verify", "pull"} <= commands


@pytest.mark.parametrize("rid,args,stdin,code,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(setting, rid, args, stdin, code, fragment, capsys, monkeypatch):
    zoo, data = setting
    argv = shlex.split(args.format(zoo=zoo, data=data))
    if "--zoo" not in argv:
        argv = ["--zoo", str(zoo), *argv]
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
    monkeypatch.setenv("ST2SI_NO_PROGRESS", "1")
    monkeypatch.delenv("ST2SI_DEBUG", raising=False)
    before = snapshot(zoo)
    status = run(argv)
    captured = capsys.readouterr()
    assert snapshot(zoo) == before, f"{rid} changed the zoo"
    assert status == code, captured.err
    assert captured.out == "", f"{rid} wrote to stdout"
    assert fragment in captured.err, captured.err
    assert "Traceback" not in captured.err
