"""`st2si zoo ...` and the commands around it: stdout carries results, stderr messages, exit codes matter.

The commands run in this process (`run_cli_here`, the CLI's own entry with its one-line errors and exit
codes); a real process only where the process is what is tested: the confirmation prompt on a terminal
and the import cost of `--help`."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, cli_command, cli_env, quick_head, run_cli, run_cli_here, write_generic_source

from st2si_cli.zoo.maintenance import verify
from st2si_cli.zoo.store import Zoo


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash, with the index compared by content (SQLite's -wal/-shm files come and go)."""
    state = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("index.db")
    }
    con = sqlite3.connect(root / "index.db")
    state["index.db"] = hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()
    con.close()
    return state


@pytest.fixture
def populated(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A zoo with a dataset, a backbone sharing nothing, a head that uses both, and a run."""
    root = tmp_path / "zoo"
    with Zoo(root) as zoo:
        ds = zoo.put(
            "dataset",
            {"sequences.jsonl": b'{"user": "1", "items": ["a", "b"]}\n', "catalog.jsonl": b'{"item": "a"}\n'},
            {"stats": {"users": 943, "items": 1682, "interactions": 100000}},
            name="ml-100k",
            domain="ml-100k",
        )
        bb = zoo.put(
            "backbone",
            {"config.json": b"{}", "model.bin": b"weights"},
            {"versions": {"torch": "2"}},
            name="smol",
        )
        head = zoo.put(
            "head",
            {"head.bin": b"head weights", "catalog.jsonl": b'{"item": "a"}\n'},
            {
                "inputs": {"dataset": ds.id, "backbone": bb.id},
                "metrics": {"test": {"NDCG@10": 0.0312, "Recall@10": 0.07}},
            },
            name="ml-head",
            domain="ml-100k",
        )
        run = zoo.put(
            "run",
            {"log.jsonl": b"{}\n"},
            {"inputs": {"head": head.id}, "flags": {"multi_query": True, "id_align": False}},
            name="run-1",
            domain="ml-100k",
        )
        ids = {"dataset": ds.id, "backbone": bb.id, "head": head.id, "run": run.id}
    return root, ids


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for f in fragments:
        assert f in lines[0]


# ---- path --------------------------------------------------------------------------------------------
def test_path_honours_zoo_option_over_st2si_home(tmp_path: Path) -> None:
    env = {"ST2SI_HOME": str(tmp_path / "home")}
    assert run_cli_here(None, "zoo", "path", env=env).stdout.strip() == str(tmp_path / "home")
    proc = run_cli_here(tmp_path / "opt", "zoo", "path", "--json", env=env)
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"root": str(tmp_path / "opt")}
    assert not (tmp_path / "opt").exists() and not (tmp_path / "home").exists(), "path creates nothing"


# ---- ls / info ---------------------------------------------------------------------------------------
def test_ls_json_is_an_array_of_what_was_put(populated) -> None:
    root, ids = populated
    proc = run_cli_here(root, "zoo", "ls", "--json")
    assert proc.returncode == 0, proc.stderr
    arts = json.loads(proc.stdout)
    assert isinstance(arts, list)
    assert {a["id"] for a in arts} == set(ids.values())
    by_name = {a["name"]: a for a in arts}
    assert by_name["ml-100k"]["kind"] == "dataset"
    assert by_name["ml-100k"]["meta"]["stats"]["users"] == 943
    assert by_name["ml-head"]["names"] == ["ml-head"]

    runs = json.loads(
        run_cli_here(root, "zoo", "ls", "--json", "--kind", "run", "--domain", "ml-100k").stdout
    )
    assert [a["id"] for a in runs] == [ids["run"]]


def test_ls_table_shows_a_summary_from_meta(populated) -> None:
    root, ids = populated
    proc = run_cli_here(root, "zoo", "ls", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "ml-100k" in proc.stdout and ids["head"][:12] in proc.stdout
    assert "users 943" in proc.stdout
    assert "NDCG@10 0.0312" in proc.stdout
    assert "multi_query" in proc.stdout and "id_align" not in proc.stdout
    assert "4 artifact(s)" in proc.stderr


def test_info_json_lists_files_names_inputs_and_dependents(populated) -> None:
    root, ids = populated
    proc = run_cli_here(root, "zoo", "info", "ml-head", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["id"] == ids["head"] and info["names"] == ["ml-head"]
    assert {f["name"]: f["size"] for f in info["file_details"]} == {"head.bin": 12, "catalog.jsonl": 14}
    assert {(i["role"], i["id"], i["name"]) for i in info["inputs"]} == {
        ("dataset", ids["dataset"], "ml-100k"),
        ("backbone", ids["backbone"], "smol"),
    }
    assert [d["id"] for d in info["dependents"]] == [ids["run"]]
    assert info["meta"]["metrics"]["test"]["NDCG@10"] == 0.0312

    by_prefix = json.loads(run_cli_here(root, "zoo", "info", ids["dataset"][:10], "--json").stdout)
    assert by_prefix["name"] == "ml-100k"
    human = run_cli_here(root, "zoo", "info", "ml-head", env={"COLUMNS": "200"})
    assert human.returncode == 0 and "head.bin" in human.stdout and "run run-1" in human.stdout


def test_unknown_name_gives_one_error_line(populated) -> None:
    root, _ = populated
    assert_one_error_line(run_cli_here(root, "zoo", "info", "no-such-thing"), "no-such-thing")
    assert_one_error_line(run_cli_here(root, "zoo", "rm", "no-such-thing", "--yes"), "no-such-thing")


# ---- rm ----------------------------------------------------------------------------------------------
def test_rm_dry_run_changes_nothing_and_warns_about_dependents(populated) -> None:
    root, ids = populated
    before = snapshot(root)
    proc = run_cli_here(root, "zoo", "rm", "ml-100k", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["id"] == ids["dataset"] and plan["dry_run"] and not plan["removed"]
    assert plan["names"] == ["ml-100k"]
    # catalog.jsonl is shared with the head: only sequences.jsonl is freed
    assert plan["bytes_freed"] == len(b'{"user": "1", "items": ["a", "b"]}\n')
    assert plan["blobs_kept"] == 1
    assert [d["id"] for d in plan["dependents"]] == [ids["head"]]
    assert "Warning" in proc.stderr and "ml-head" in proc.stderr
    human = run_cli_here(root, "zoo", "rm", "ml-100k", "--dry-run")
    assert human.returncode == 0 and human.stdout.startswith("Would remove dataset ml-100k")
    assert snapshot(root) == before


def test_rm_without_yes_on_non_tty_stdin_refuses(populated) -> None:
    root, _ = populated
    before = snapshot(root)
    assert_one_error_line(run_cli_here(root, "zoo", "rm", "smol"), "--yes")
    assert snapshot(root) == before


def test_rm_yes_removes_the_artifact_and_its_unshared_blobs(populated) -> None:
    root, ids = populated
    before = snapshot(root)
    assert_one_error_line(
        run_cli_here(root, "zoo", "rm", "smol", "--yes"), "input of head ml-head", "--force"
    )
    assert snapshot(root) == before, "an artifact others depend on stays without --force"
    proc = run_cli_here(root, "zoo", "rm", "smol", "--yes", "--force", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["removed"] and result["bytes_freed"] == len(b"{}") + len(b"weights")
    with Zoo(root) as zoo:
        assert zoo.find("smol") is None and zoo.find(ids["backbone"]) is None
        assert {a.id for a in zoo.ls()} == {ids["dataset"], ids["head"], ids["run"]}
        report = verify(zoo)  # the head's backbone is gone: a dangling input, reported
        assert report.dangling == [(ids["head"], ids["backbone"])] and not report.ok and not report.orphans
    human = run_cli_here(root, "zoo", "rm", "run-1", "--yes")
    assert human.returncode == 0 and "Removed run run-1" in human.stdout


def run_on_a_terminal(root: Path, args: list[str], typed: bytes) -> tuple[int, str]:
    """Run the CLI with stdin, stdout and stderr on a pseudo-terminal, `typed` already waiting as input."""
    pty = pytest.importorskip("pty")
    cmd, env = cli_command(root, *args), cli_env()
    pid, fd = pty.fork()
    if pid == 0:  # the child: replace it with the CLI at once
        os.chdir(REPO)
        os.execve(cmd[0], cmd, env)
    os.write(fd, typed)
    output = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def test_rm_asks_for_confirmation_on_a_terminal(populated) -> None:
    root, ids = populated
    before = snapshot(root)
    code, output = run_on_a_terminal(root, ["zoo", "rm", "smol", "--force"], b"n\n")
    assert code == 1 and "[y/N]" in output and "Nothing removed." in output
    assert snapshot(root) == before
    code, output = run_on_a_terminal(root, ["zoo", "rm", "smol", "--force"], b"y\n")
    assert code == 0 and "Removed backbone smol" in output
    with Zoo(root) as zoo:
        assert zoo.find(ids["backbone"]) is None


# ---- verify ------------------------------------------------------------------------------------------
def test_verify_exit_code_and_output_name_a_corrupted_blob(populated) -> None:
    root, ids = populated
    clean = run_cli_here(root, "zoo", "verify")
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("OK: checked 6 blob(s)")

    with Zoo(root) as zoo:
        blob = zoo.get("smol").files["model.bin"]
        path = zoo.blob_path(blob)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))

    bad = run_cli_here(root, "zoo", "verify")
    assert bad.returncode == 1
    assert f"MISMATCH  {blob}  used by backbone smol" in bad.stdout
    report = json.loads(run_cli_here(root, "zoo", "verify", "--json").stdout)
    assert not report["ok"] and report["checked"] == 6
    assert [(b["sha256"], [a["id"] for a in b["artifacts"]]) for b in report["mismatched"]] == [
        (blob, [ids["backbone"]])
    ]


def test_verify_reports_missing_blobs_and_warns_about_orphans(populated) -> None:
    root, _ = populated
    with Zoo(root) as zoo:
        missing = zoo.get("run-1").files["log.jsonl"]
        zoo.blob_path(missing).unlink()
    orphan = root / "blobs" / "ee" / ("e" * 64)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"stray")
    proc = run_cli_here(root, "zoo", "verify", "--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert [b["sha256"] for b in report["missing"]] == [missing]
    assert [o["sha256"] for o in report["orphans"]] == ["e" * 64]
    assert "Warning: 1 orphan" in proc.stderr

    orphan_only = root.parent / "orphan-only"
    Zoo(orphan_only).close()
    (orphan_only / "blobs" / "ee").mkdir()
    (orphan_only / "blobs" / "ee" / ("e" * 64)).write_bytes(b"stray")
    proc = run_cli_here(orphan_only, "zoo", "verify")
    assert proc.returncode == 0, "orphans alone are a warning"
    assert "orphan" in proc.stderr


# ---- the command line itself -------------------------------------------------------------------------
def test_help_exits_zero_and_usage_errors_exit_two(tmp_path: Path) -> None:
    proc = run_cli_here(None, "zoo", "rm", "--help")  # `--help` and `zoo --help`: see the import test below
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:") and "--dry-run" in proc.stdout
    bad = run_cli_here(tmp_path, "zoo", "ls", "--kind", "model")
    assert bad.returncode == 2 and "Invalid value for '--kind'" in bad.stderr and bad.stdout == ""
    assert run_cli_here(None, "zoo", "ls", "--no-such-option").returncode == 2


HEAVY = ("torch", "transformers", "deepspeed")
IMPORT_PROBE = textwrap.dedent(
    """
    import atexit, sys
    HEAVY = {heavy!r}
    attempted = []

    class Recorder:  # notes an import of a heavy package even when it is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                attempted.append(name)
            return None

    sys.meta_path.insert(0, Recorder())
    atexit.register(lambda: print("HEAVY:" + ",".join(sorted(set(attempted) | {{m for m in HEAVY if m in sys.modules}}))))
    """
)  # run before the CLI's entry point, see helpers.run_cli


@pytest.mark.parametrize("argv", [["st2si", "--help"], ["st2si", "zoo", "--help"]], ids=["root", "zoo"])
def test_help_does_not_import_heavy_modules(argv: list[str]) -> None:
    proc = run_cli(None, *argv[1:], prelude=IMPORT_PROBE.format(heavy=HEAVY))
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY:", proc.stdout


# ---- prepare --replace, names per kind, prune, identical reruns ------------------------------------------


def test_prepare_refuses_other_data_for_a_domain_unless_replace(tmp_path: Path) -> None:
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.backbones.pull import pull
    from st2si_cli.train.head import HeadConfig

    root = tmp_path / "zoo"
    first, other = (
        write_generic_source(tmp_path / "a", 20, seed=1),
        write_generic_source(tmp_path / "b", 25, seed=2),
    )
    assert run_cli_here(root, "prepare", first, "--domain", "shop").returncode == 0
    assert run_cli_here(root, "prepare", first, "--domain", "shop").returncode == 0, (
        "the same data again is fine"
    )
    with Zoo(root) as zoo:
        pull(zoo, "tiny-opt")
        head = adapt(
            zoo,
            "shop",
            backbone="tiny-opt",
            head_cfg=HeadConfig(max_epochs=1),
            feature_opts=FeatureOptions(dtype="fp32"),
        )
        old = zoo.get("shop", kind="dataset")
    before = snapshot(root)
    assert_one_error_line(
        run_cli_here(root, "prepare", other, "--domain", "shop"),
        "'shop' already holds other data",
        "--replace",
    )
    assert snapshot(root) == before
    proc = run_cli_here(root, "prepare", other, "--domain", "shop", "--replace", "--json")
    assert proc.returncode == 0, proc.stderr
    new_id = json.loads(proc.stdout)["id"]
    assert f"Replaced dataset shop: {old.short_id} -> {new_id[:12]}" in proc.stderr
    assert f"no longer match it: shop/tiny-opt ({head.short_id})" in proc.stderr
    with Zoo(root) as zoo:
        assert zoo.get("shop", kind="dataset").id == new_id


def test_a_dataset_and_a_backbone_may_share_a_name(tmp_path: Path) -> None:
    root = tmp_path / "zoo"
    assert run_cli_here(root, "zoo", "pull", "tiny-opt").returncode == 0
    assert (
        run_cli_here(
            root, "prepare", write_generic_source(tmp_path / "a", 20, seed=1), "--domain", "tiny-opt"
        ).returncode
        == 0
    )
    proc = run_cli_here(
        root,
        "adapt",
        "--domain",
        "tiny-opt",
        "--backbone",
        "tiny-opt",
        "--head",
        "ilp",
        "--epochs",
        "1",
        "--dtype",
        "fp32",
    )
    assert proc.returncode == 0, proc.stderr
    assert_one_error_line(
        run_cli_here(root, "zoo", "info", "tiny-opt"), "names a backbone and a dataset", "--kind"
    )
    info = json.loads(run_cli_here(root, "zoo", "info", "tiny-opt", "--kind", "backbone", "--json").stdout)
    assert info["kind"] == "backbone" and info["names"] == ["tiny-opt"]
    assert_one_error_line(
        run_cli_here(root, "adapt", "--domain", "tiny-opt", "--backbone", "nope"),
        "no backbone 'nope'",
        "zoo ls --kind backbone",
    )


def test_prune_plans_first_and_frees_what_it_reports(populated) -> None:
    root, _ = populated
    orphan = root / "blobs" / "ee" / ("ee" * 32)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan bytes")
    gone = root / "tmp" / "import-999999999-abc"  # no such process
    gone.mkdir()
    (gone / "w.safetensors").write_bytes(b"w" * 100)
    before = snapshot(root)
    dry = run_cli_here(root, "zoo", "prune", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert {r["path"] for r in plan["remove"]} == {str(orphan), str(gone)} and plan["bytes"] == 112
    assert snapshot(root) == before
    assert_one_error_line(run_cli_here(root, "zoo", "prune"), "--yes")
    assert snapshot(root) == before
    proc = run_cli_here(root, "zoo", "prune", "--yes")
    assert proc.returncode == 0 and "Pruned: freed 112 B (112 bytes)." in proc.stdout, proc.stdout
    assert not orphan.exists() and not gone.exists()
    assert run_cli_here(root, "zoo", "verify").returncode == 0


def test_an_identical_adapt_rerun_reuses_its_head(tmp_path: Path) -> None:
    from helpers import build_zoo, synthetic_dataset

    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.train.head import HeadConfig

    zoo = build_zoo(tmp_path / "zoo", {"toy": synthetic_dataset(n_users=15)})
    runs = [quick_head(zoo, "toy") for _ in range(2)]
    assert runs[0].id == runs[1].id and len(zoo.ls(kind="head")) == 1
    other = adapt(
        zoo,
        "toy",
        backbone="tiny-opt",
        head_cfg=HeadConfig(max_epochs=2),
        feature_opts=FeatureOptions(dtype="fp32"),
    )
    assert other.id != runs[0].id and len(zoo.ls(kind="head")) == 2, "other settings: another head"


def test_pull_of_a_missing_path_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    proc = run_cli_here(tmp_path / "zoo", "zoo", "pull", missing)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines()[-1] == f"Error: {missing}: no such file or folder", proc.stderr


def test_pull_writes_nothing_but_data_on_stdout(tmp_path: Path) -> None:
    plain = run_cli_here(tmp_path / "zoo", "zoo", "pull", "tiny-opt")
    assert plain.returncode == 0 and plain.stdout == "", repr(plain.stdout)
    as_json = run_cli_here(tmp_path / "zoo2", "zoo", "pull", "tiny-opt", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["kind"] == "backbone"
