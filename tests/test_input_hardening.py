"""Hostile input: terminal control sequences in names and titles, names that cannot be names, over-long
lines and attribute values, lone surrogates, and non-finite timestamps. Each is refused with FILE:LINE
(exit 2), skipped under --skip-bad, or shown escaped; none may crash a command or balloon its memory."""

from __future__ import annotations

import io
import json
import sys
import tracemalloc
from pathlib import Path

import pytest
from helpers import build_zoo, quick_head, synthetic_dataset

from st2si_cli.cli.app import run
from st2si_cli.cli.output import safe_text
from st2si_cli.errors import InputError
from st2si_cli.names import MAX_NAME_LENGTH, check_name, escape_controls

EVIL = "evil\x1b[2J\x1b]0;pwned\x07\u202e\x9b31m"  # clear screen, retitle, bidi override, 8-bit CSI


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """tiny-opt, the synthetic domain "toy" with one ILP head, and a domain whose name holds escapes."""
    root = tmp_path_factory.mktemp("hardening")
    z = build_zoo(root / "zoo", {"toy": synthetic_dataset(), EVIL: synthetic_dataset(n_users=5)})
    quick_head(z, "toy")
    return z


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run the CLI in this process, as `main` does: (status, stdout, stderr)."""

    def call(argv, zoo=None, stdin=""):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        status = run([*(["--zoo", str(zoo.root)] if zoo is not None else []), *map(str, argv)])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return call


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ST2SI_NO_PROGRESS", "1")
    monkeypatch.delenv("ST2SI_DEBUG", raising=False)


# ---- 7. control sequences are shown escaped; names are checked at the door ----------------------------
def test_safe_text_escapes_every_control_and_keeps_printable_text():
    assert safe_text("a\x1b[31mb\nc\td\u202ee\x9bf\ud800") == "a\\x1b[31mb\\nc\\td\\u202ee\\x9bf\\ud800"
    assert safe_text("Café – 東京 (1995) [red]") == "Café – 東京 (1995) [red]"
    assert safe_text(42) == "42"
    assert escape_controls("\U000e0001") == "\\U000e0001"


def test_zoo_ls_and_info_show_names_escaped(zoo, cli):
    for argv in (["zoo", "ls"], ["zoo", "ls", "--domain", EVIL], ["zoo", "info", EVIL, "--kind", "dataset"]):
        status, out, err = cli(argv, zoo)
        assert status == 0, err
        assert "evil\\x1b[2J" in out and "\\u202e" in out
        for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
            assert raw not in out and raw not in err, argv


def test_tables_escape_titles_and_names(capsys):
    from rich.console import Console

    from st2si_cli.cli import prepare_cmd
    from st2si_cli.cli.output import metrics_table

    buf = io.StringIO()
    Console(file=buf, width=200).print(metrics_table(f"head {EVIL} [bold]x", {EVIL: {"ndcg@10": 0.5}}))
    assert "\x1b" not in buf.getvalue() and "\\x1b[2J" in buf.getvalue() and "[bold]x" in buf.getvalue()
    stats = {"users": 1, "items": 2, "interactions": 3, "avg_length": 3.0, "density": 0.5}
    prepare_cmd._print_table(EVIL, "0" * 64, "generic", stats, {"notes": f"file {EVIL}"})
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\u202e" not in shown and "\\x1b[2J" in shown


@pytest.mark.parametrize(
    "name", ["ml-100k", "amazon/scientific", "toy/tiny-opt", "Café 1", "n" * MAX_NAME_LENGTH, "abcde"]
)
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name,why",
    [
        ("", "empty"),
        ("a" * (MAX_NAME_LENGTH + 1), "at most 128"),
        ("toy\x1b[31m", "\\x1b"),
        ("two\nlines", "\\n"),
        ("tab\there", "\\t"),
        ("rtl\u202eltr", "\\u202e"),
        ("nbsp\u00a0x", "\\xa0"),
        ("half\ud800", "\\ud800"),
        (" toy", "space"),
        ("toy ", "space"),
        ("-toy", "'-'"),
        ("deadbeef", "ID prefix"),
        ("1234567", "ID prefix"),
    ],
)
def test_bad_names(name, why):
    with pytest.raises(ValueError) as e:
        check_name(name)
    assert why in str(e.value)
    assert all(c.isprintable() for c in str(e.value))


@pytest.mark.parametrize("name", ["toy\x1b[31mred", "two\nlines", "rtl\u202e", "x\udcff"])
def test_prepare_refuses_a_bad_domain_name_before_reading(tmp_path, name, cli):
    status, out, err = cli(["prepare", tmp_path / "nosuch", "--domain", name], zoo=None)
    assert status == 2 and out == ""
    assert "--domain" in err and "a name cannot hold" in err
    assert all(c.isprintable() or c == "\n" for c in err)


def test_the_library_refuses_a_bad_domain_name_too(tmp_path):
    from st2si_cli.data.prepare import prepare_dataset

    def no_zoo():
        raise AssertionError("the zoo must not be opened")

    with pytest.raises(InputError, match=r"domain 'a\\nb': a name cannot hold \\n") as e:
        prepare_dataset(tmp_path, domain="a\nb", zoo=no_zoo)
    assert e.value.exit_code == 2


# ---- 8. over-long lines are refused; attribute values are cut before tokenising -----------------------
def _line_file(path: Path, sizes: list[int]) -> Path:
    with open(path, "wb") as f:
        for i, size in enumerate(sizes):
            f.write(b'{"user": "%d", "history": ["1"], "pad": "' % i)
            f.write(b"x" * size + b'"}\n')
    return path


def test_line_batches_skips_an_over_long_line_without_holding_it(tmp_path, monkeypatch):
    from st2si_cli.data import line_stream

    monkeypatch.setattr(line_stream, "MAX_LINE_BYTES", 256 << 10)
    path = _line_file(tmp_path / "h.jsonl", [10, 8 << 20, 10])
    tracemalloc.start()
    try:
        with open(path, "rb") as f:
            lines = [line for batch in line_stream.line_batches(f, 64) for line in batch]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [n for n, _ in lines] == [1, 2, 3]
    assert isinstance(lines[1][1], line_stream.TooLong) and json.loads(lines[2][1])["user"] == "2"
    assert peak < 2 << 20, f"{peak:,} bytes traced while reading an 8 MB line"
    text = io.StringIO(path.read_text())
    assert isinstance(next(line_stream.line_batches(text, 64))[1][1], line_stream.TooLong)


def test_an_over_long_history_line_is_one_bad_line(tmp_path, monkeypatch):
    from st2si_cli.data import line_stream
    from st2si_cli.recommend import BadLine, Request, parse_requests

    monkeypatch.setattr(line_stream, "MAX_LINE_BYTES", 4096)
    path = _line_file(tmp_path / "h.jsonl", [10, 5000, 10])
    catalog = [{"id": "1", "title": "One"}]
    with open(path, "rb") as f:
        batch = next(line_stream.line_batches(f, 64))
    with pytest.raises(InputError, match=r"h\.jsonl:2: line longer than 0\.00390625 MiB"):
        parse_requests(batch, str(path), catalog)
    parsed = parse_requests(batch, str(path), catalog, skip_bad=True)
    assert [type(r) for r in parsed] == [Request, BadLine, Request]
    assert "line longer than" in parsed[1].error and parsed[1].line == 2


def test_recommend_refuses_an_over_long_line_with_file_and_line(zoo, tmp_path, monkeypatch, cli):
    from st2si_cli.data import line_stream

    monkeypatch.setattr(line_stream, "MAX_LINE_BYTES", 4096)
    path = _line_file(tmp_path / "h.jsonl", [10, 5000])
    status, out, err = cli(["recommend", "--domain", "toy", "--user-history", path], zoo)
    assert status == 2 and out == ""
    assert f"{path}:2: line longer than" in err


def test_prepare_refuses_an_over_long_line_with_file_and_line(tmp_path, monkeypatch, cli):
    from st2si_cli.data.formats import _io

    monkeypatch.setattr(_io, "MAX_LINE_BYTES", 1000)
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.csv").write_text("item,title\n1,One\n2," + "t" * 2000 + "\n")
    (src / "interactions.csv").write_text("user,item,timestamp\nu,1,1\nu,2,2\nu,1,3\n")
    status, out, err = cli(["prepare", src, "--domain", "long"], zoo=None)
    assert status == 2 and out == ""
    assert "items.csv:3: line longer than" in err


class _RecordingTokenizer:
    """Stands in for a tokenizer: one token per character, and a record of every text it was given."""

    pad_token_id = 0

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts, add_special_tokens=False):
        texts = [texts] if isinstance(texts, str) else list(texts)
        self.calls.append(texts)
        return {"input_ids": [[ord(c) % 1000 + 1 for c in t] for t in texts]}


def test_the_text_handed_to_the_tokenizer_is_capped(capsys, monkeypatch):
    from st2si_cli.model import text
    from st2si_cli.model.text import ItemTokenizer, TextConfig, attr_char_cap

    monkeypatch.setattr(text, "_warned_cut", False)
    cfg = TextConfig(attributes=("title", "brand"))
    tok = _RecordingTokenizer()
    itok = ItemTokenizer(tok, cfg, query_id=1, pad_id=0)
    huge = "word " * 2_000_000  # a 10 MB title
    ids = itok.encode_items([{"title": huge, "brand": "b" * 300_000}, {"title": "Short"}] * 3)
    cap = attr_char_cap(cfg)
    assert cap == 32 * 256
    sent = [t for call in tok.calls for t in call]
    assert max(map(len, sent)) <= cap + len(" brand: ")
    assert sum(map(len, sent)) < 7 * (cap + 10)
    assert all(sum(map(len, call)) <= max(text.BATCH_CHARS, max(map(len, call))) for call in tok.calls)
    assert ids[0] == ids[2] and len(ids[0]) == 2 * cfg.max_attr_tokens
    err = capsys.readouterr().err
    assert err.count("Warning:") == 1 and "10,000,000 characters was cut to its first 8,192" in err


def test_the_cap_leaves_the_tokens_of_a_long_title_unchanged(zoo):
    from st2si_cli.backbones.load import load_backbone
    from st2si_cli.model.text import ItemTokenizer, TextConfig

    tokenizer = load_backbone(zoo, "tiny-opt", dtype="fp32").tokenizer
    cfg = TextConfig()
    itok = ItemTokenizer.create(tokenizer, cfg)
    title = " ".join(f"part{i} of a very long product title" for i in range(1000))  # ~37,000 characters
    full = tokenizer(title, add_special_tokens=False)["input_ids"][: cfg.max_attr_tokens]
    assert itok.encode_items([{"title": title}]) == [full]


# ---- 9. lone surrogates: one bad line, never a crash ---------------------------------------------------
def test_recommend_skip_bad_answers_around_a_lone_surrogate(zoo, cli):
    lines = [
        {"user": "a", "history": ["1", "2"]},
        {"user": "b", "history": ["1", {"title": "x\ud800y"}]},
        {"user": "\udcff", "history": ["1"]},
        {"user": "c", "history": ["3", {"title": "emoji \U0001f600 ok"}]},
    ]
    stdin = "".join(json.dumps(x) + "\n" for x in lines)  # ASCII JSON: surrogates as \\ud800 escapes
    status, out, err = cli(["recommend", "--domain", "toy", "--user-history", "-", "--skip-bad"], zoo, stdin)
    assert status == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r.get("user") for r in rows] == ["a", "b", None, "c"]
    assert "items" in rows[0] and "items" in rows[3]
    assert rows[1]["line"] == 2 and "lone surrogate \\ud800" in rows[1]["error"]
    assert rows[2]["line"] == 3 and "lone surrogate \\udcff" in rows[2]["error"]
    status, out, err = cli(["recommend", "--domain", "toy", "--user-history", "-"], zoo, stdin)
    assert status == 2 and "<stdin>:2: lone surrogate \\ud800" in err


def test_json_documents_name_the_line_of_a_lone_surrogate(tmp_path):
    from st2si_cli.data.formats._io import read_json

    path = tmp_path / "Shop.item.json"
    path.write_text('{\n "1": {"title": "\\ud83d\\ude00 ok"},\n "2": {"title": "bad \\udc00"}\n}\n')
    with pytest.raises(InputError, match=r"Shop\.item\.json:3: lone surrogate \\udc00"):
        read_json(path)
    path.write_text('{\n "1": {"title": "\\ud83d\\ude00 ok"}\n}\n')
    assert read_json(path)[0]["1"]["title"] == "\U0001f600 ok"


def test_items_update_refuses_a_title_that_is_not_text(zoo, cli):
    status, out, err = cli(["items", "update", "1", "--domain", "toy", "--title", "bad \udcff"], zoo)
    assert status == 2 and out == ""
    assert "lone surrogate \\udcff" in err


# ---- 13. timestamps must be finite numbers --------------------------------------------------------------
@pytest.mark.parametrize(
    "value", ["nan", "NaN", "inf", "-Infinity", float("nan"), float("-inf"), 10**400, True]
)
def test_non_finite_timestamps_are_refused(value):
    from st2si_cli.data.formats.base import timestamp

    with pytest.raises(InputError, match=r"t\.csv:7: timestamp .* not a (finite )?number"):
        timestamp(Path("t.csv"), 7, value)


@pytest.mark.parametrize(
    "value,expected", [("1700000000", 1.7e9), (" 12.5 ", 12.5), (3, 3.0), ("-1e3", -1000.0)]
)
def test_finite_timestamps_are_read(value, expected):
    from st2si_cli.data.formats.base import timestamp

    assert timestamp(Path("t.csv"), 1, value) == expected
