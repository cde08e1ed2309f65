"""The CLI as a script sees it: which head answers and why, recommend as a stream (FIFO, shards),
history exclusion by title, one metrics JSON shape, and help that teaches. Most commands run in this
process through `st2si_cli.cli.app.run`; the FIFO test runs a real process."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from helpers import REPO, build_zoo, cli_command, cli_env, quick_head, synthetic_dataset

from st2si_cli.adapt import FeatureOptions, adapt
from st2si_cli.cli.app import app, hoist_zoo, run
from st2si_cli.data.prepare import load_dataset
from st2si_cli.heads.choice import RECORD_KEYS
from st2si_cli.train.head import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_zoo(tmp_path_factory):
    """tiny-opt, the synthetic domain "toy" and one ILP head "toy/first"; tests copy it before changing it."""
    zoo = build_zoo(tmp_path_factory.mktemp("surface") / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy", name="toy/first")
    return zoo


@pytest.fixture
def cli(base_zoo, capsys, monkeypatch):
    """cli(*args, stdin=None) -> (status, stdout, stderr), in this process against `base_zoo`."""
    monkeypatch.setenv("ST2SI_NO_PROGRESS", "1")

    def call(*args, stdin=None, zoo=base_zoo):
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        capsys.readouterr()
        status = run(["--zoo", str(zoo.root), *map(str, args)])
        got = capsys.readouterr()
        return status, got.out, got.err

    return call


def lines_of(*histories, users=None) -> str:
    users = users or [f"u{i}" for i in range(len(histories))]
    return "".join(json.dumps({"user": u, "history": h}) + "\n" for u, h in zip(users, histories))


def test_recommend_lines_carry_head_and_backbone_and_the_choice_is_named(base_zoo, cli):
    head = base_zoo.get("toy/first", kind="head")
    status, out, err = cli("recommend", "--domain", "toy", "--user-history", "-", stdin=lines_of(["1", "2"]))
    assert status == 0, err
    [row] = [json.loads(x) for x in out.splitlines()]
    assert row["head"] == "toy/first" and row["head_id"] == head.id
    assert row["backbone_id"] == base_zoo.get("tiny-opt", kind="backbone").id
    assert "Using head toy/first" in err and "the only head for domain toy" in err
    status, out, err = cli(
        "recommend", "--domain", "toy", "--head", "toy/first", "--user-history", "-", stdin=""
    )
    assert status == 0 and out == "" and "Using head" not in err  # --head given: nothing to announce


def test_a_new_head_better_on_validation_becomes_the_default_and_every_command_says_so(
    base_zoo, cli, tmp_path
):
    zoo = build_zoo(tmp_path / "copy", {})
    shutil.rmtree(zoo.root)
    shutil.copytree(base_zoo.root, zoo.root)
    from st2si_cli.heads.choice import valid_score
    from st2si_cli.zoo.store import Zoo

    zoo = Zoo(zoo.root)
    second = adapt(
        zoo,
        "toy",
        backbone="tiny-opt",
        head_cfg=HeadConfig(max_epochs=1, seed=1),
        feature_opts=FeatureOptions(dtype="fp32"),
        name="toy/second",
    )
    first = zoo.get("toy/first", kind="head")
    # the newer head wins only by being better on validation (ties: the newer)
    best = second if valid_score(second) >= valid_score(first) else first
    why = f"the best on validation NDCG@10 ({valid_score(best):.4f}) of 2 heads for domain toy"
    status, out, err = cli("eval", "--domain", "toy", "--json", zoo=zoo)
    assert status == 0, err
    assert json.loads(out)["head_id"] == best.id
    assert f"Using head {best.name}" in err and why in err
    status, out, err = cli(
        "recommend", "--domain", "toy", "--user-history", "-", stdin=lines_of(["3"]), zoo=zoo
    )
    assert status == 0 and json.loads(out)["head_id"] == best.id
    status, out, err = cli("zoo", "ls", "--domain", "toy", zoo=zoo)
    assert status == 0 and f"Default head: {best.name}, {why}" in err


def test_exclude_history_drops_items_given_by_title_and_names_those_it_cannot_resolve(base_zoo, cli):
    catalog = load_dataset(base_zoo, "toy").items
    n = len(catalog)
    by_title = catalog[5]
    history = [
        "1",
        {"title": "  " + by_title["title"].upper().replace(" ", "   ") + " "},  # case and spacing differ
        {"title": "an item this catalog has never seen"},
    ]
    status, out, err = cli(
        "recommend",
        "--domain",
        "toy",
        "--user-history",
        "-",
        "-k",
        n,
        "--exclude-history",
        stdin=lines_of(history),
    )
    assert status == 0, err
    [row] = [json.loads(x) for x in out.splitlines()]
    ids = [it["id"] for it in row["items"]]
    assert len(ids) == n - 2 and catalog[1]["id"] not in ids and by_title["id"] not in ids
    assert row["unresolved"] == [{"position": 2, "title": "an item this catalog has never seen"}]
    status, out, _ = cli(
        "recommend", "--domain", "toy", "--user-history", "-", "-k", n, stdin=lines_of(history)
    )
    row = json.loads(out)
    assert by_title["id"] in [it["id"] for it in row["items"]] and "unresolved" not in row


def test_shards_concatenate_in_order_to_the_whole_output(cli, tmp_path):
    histories = [[str(i % 25), str((i * 7) % 25)] for i in range(11)]
    text = lines_of(*histories).replace("\n", "\n\n", 3)  # blank lines are skipped, not counted
    f = tmp_path / "h.jsonl"
    f.write_text(text)
    status, whole, err = cli("recommend", "--domain", "toy", "--user-history", f, "-k", 3, "--batch-lines", 2)
    assert status == 0, err
    assert len(whole.splitlines()) == 11
    for source, stdin in ((f, None), ("-", text)):
        parts = []
        for i in range(3):
            args = ("recommend", "--domain", "toy", "--user-history", source, "-k", 3, "--shard", f"{i}/3")
            status, out, err = cli(*args, stdin=stdin)
            assert status == 0, err
            parts.append(out)
        assert [len(p.splitlines()) for p in parts] == [3, 4, 4]
        assert "".join(parts) == whole


def test_recommend_accepts_a_byte_order_mark_and_crlf(cli, tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + lines_of(["1"], ["2"]).replace("\n", "\r\n").encode())
    status, out, err = cli("recommend", "--domain", "toy", "--user-history", f)
    assert status == 0, err
    assert [json.loads(x)["user"] for x in out.splitlines()] == ["u0", "u1"]


def test_recommend_answers_a_fifo_before_its_input_ends(base_zoo, tmp_path):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cli_command(base_zoo, "recommend", "--domain", "toy", "--user-history", fifo, "-k", 3),
        cwd=REPO,
        env=cli_env({"OMP_NUM_THREADS": "1"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open(fifo, "w") as w:  # blocks until the process opens the FIFO
            w.write(lines_of(["1", "2"], users=["first"]))
            w.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no answer within 120 s while the input stayed open"
            first = json.loads(proc.stdout.readline())
            first_line_seconds = time.monotonic() - t0
            assert first["user"] == "first" and len(first["items"]) == 3
            assert proc.poll() is None  # still waiting for more input
            w.write(lines_of(["3"], users=["second"]))
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert [json.loads(x)["user"] for x in out.decode().splitlines()] == ["second"]
    print(f"first line after {first_line_seconds:.2f} s (tiny-opt, process start included)")


def test_adapt_eval_and_pretrain_print_one_metrics_shape(cli, base_zoo, tmp_path):
    from st2si_cli.zoo.store import Zoo

    shutil.copytree(base_zoo.root, tmp_path / "zoo")
    zoo = Zoo(tmp_path / "zoo")
    common = ("--domain", "toy", "--backbone", "tiny-opt", "--epochs", "1", "--json")
    records = {}
    for name, args in {
        "adapt": ("adapt", *common, "--head", "ilp", "--dtype", "fp32", "--name", "toy/shape"),
        "eval": ("eval", "--domain", "toy", "--head", "toy/shape", "--json"),
        "pretrain": ("pretrain", *common, "--batch-size", "8", "--out", "shape-ft"),
    }.items():
        status, out, err = cli(*args, zoo=zoo)
        assert status == 0, err
        [line] = out.splitlines()  # one compact line per head: stdout holds nothing else
        records[name] = json.loads(line)
    for name, rec in records.items():
        assert set(RECORD_KEYS) <= set(rec), name
        assert rec["domain"] == "toy" and rec["split"] == "test" and "NDCG@10" in rec["metrics"], name
        assert zoo.get(rec["head_id"], kind="head").name == rec["head"]
        assert zoo.get(rec["backbone_id"], kind="backbone")
        assert set(rec["protocol"]) == {"ranking", "ties", "mask_history"}
    assert records["eval"]["head_id"] == records["adapt"]["head_id"]
    assert records["eval"]["metrics"]["NDCG@10"] == pytest.approx(records["adapt"]["metrics"]["NDCG@10"])
    assert records["pretrain"]["head"] == "toy/shape-ft"


def _commands(group, prefix=()):
    import typer.main

    click_group = typer.main.get_command(group)
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            yield from ((*prefix, name, *sub) for sub in [(n,) for n in cmd.commands])
        else:
            yield (*prefix, name)


def test_every_command_has_an_example_and_short_help(cli):
    commands = list(_commands(app))
    assert len(commands) >= 13
    for cmd in commands:
        status, out, err = cli(*cmd, "-h")
        assert status == 0, (cmd, err)
        assert "Example" in out and "-h, --help" in out, cmd
    status, out, _ = cli("-h")
    for var in ("ST2SI_HOME", "ST2SI_DEBUG", "ST2SI_NO_PROGRESS"):
        assert var in out
    assert "--install-completion" in out
    status, out, _ = cli("recommend", "-h")
    assert '"history"' in out and '"head_id"' in out and '"backbone_id"' in out and "--shard" in out


def test_zoo_may_come_after_the_command(base_zoo, capsys, tmp_path):
    assert hoist_zoo(["zoo", "path", "--zoo", "Z", "--json"]) == ["--zoo", "Z", "zoo", "path", "--json"]
    assert hoist_zoo(["recommend", "--zoo=Z", "--", "--zoo", "x"]) == [
        "--zoo=Z",
        "recommend",
        "--",
        "--zoo",
        "x",
    ]
    assert run(["zoo", "path", "--json", "--zoo", str(base_zoo.root)]) == 0
    assert json.loads(capsys.readouterr().out)["root"] == str(base_zoo.root)


def test_shell_completion_completes_commands():
    env = cli_env({"_ST2SI_COMPLETE": "complete_bash", "COMP_WORDS": "st2si rec", "COMP_CWORD": "1"})
    r = subprocess.run(
        [sys.executable, "-m", "st2si_cli"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["recommend"]


def test_the_model_loads_once_per_call_whatever_the_batches(cli, monkeypatch):
    from st2si_cli import recommend as recommend_model

    loads = []
    real_init = recommend_model.RecommendModel.__init__

    def counted(self, *args, **kwargs):
        loads.append(1)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(recommend_model.RecommendModel, "__init__", counted)
    text = lines_of(*[[str(i)] for i in range(7)])
    status, out, err = cli(
        "recommend", "--domain", "toy", "--user-history", "-", "--batch-lines", 2, stdin=text
    )
    assert status == 0, err
    assert len(out.splitlines()) == 7 and len(loads) == 1
