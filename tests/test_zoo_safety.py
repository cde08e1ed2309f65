"""A zoo that never loses data: a damaged index is refused (and rebuilt from the manifests), links are
never followed, inputs in use are not removed, reading commands create and lock nothing, a full disk
leaves nothing behind, and a pretrain's staging folder is claimed."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import build_zoo, quick_head, synthetic_dataset

from st2si_cli.cli.app import run
from st2si_cli.errors import St2siError, ZooError
from st2si_cli.zoo import schema, store
from st2si_cli.zoo.maintenance import execute_rm, plan_prune, plan_rm, verify
from st2si_cli.zoo.store import DamagedIndexError, Zoo

HISTORY = '{"user": "a", "history": ["3", "4", "5"]}\n'


def cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = run(list(args))
    got = capsys.readouterr()
    return code, got.out, got.err


def small_zoo(root: Path) -> tuple[Zoo, str, str]:
    """A zoo with a dataset and a head that lists it as an input; (zoo, dataset id, head id)."""
    zoo = Zoo(root)
    ds = zoo.put("dataset", {"a.jsonl": b"one\n", "b.jsonl": b"two\n"}, {"n": 1}, name="ds", domain="d")
    head = zoo.put("head", {"w": b"weights"}, {"inputs": {"dataset": ds.id}}, name="d/h", domain="d")
    return zoo, ds.id, head.id


def blob_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "blobs").rglob("*") if p.is_file()}


def drop_wal(root: Path) -> None:
    for suffix in ("-wal", "-shm"):
        (root / f"index.db{suffix}").unlink(missing_ok=True)


# ---- 1. an empty, missing or damaged index -------------------------------------------------------------
@pytest.mark.parametrize("damage", ["zero-bytes", "missing", "not-sqlite", "truncated"])
def test_a_damaged_index_is_refused_prune_deletes_nothing_and_repair_rebuilds_it(tmp_path, capsys, damage):
    root = tmp_path / "zoo"
    zoo, ds_id, head_id = small_zoo(root)
    zoo.close()
    drop_wal(root)
    index = root / "index.db"
    good = index.read_bytes()
    blobs = blob_bytes(root)
    if damage == "zero-bytes":
        index.write_bytes(b"")
    elif damage == "missing":
        index.unlink()
    elif damage == "not-sqlite":
        index.write_bytes(b"this is not a database\n" * 100)
    else:
        index.write_bytes(good[: len(good) // 2])
    before = index.read_bytes() if index.exists() else None
    for args in (["zoo", "ls"], ["zoo", "prune", "--yes"], ["zoo", "verify"], ["zoo", "info", "ds"]):
        code, out, err = cli(capsys, "--zoo", str(root), *args)
        assert code == 1 and out == "", (args, out, err)
        assert err.count("\n") == 1 and "is damaged" in err and "zoo verify --repair" in err, err
        assert (index.read_bytes() if index.exists() else None) == before
        assert blob_bytes(root) == blobs
    with pytest.raises(DamagedIndexError):  # a writing command refuses too
        Zoo(root)
    assert blob_bytes(root) == blobs

    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "verify", "--repair")
    assert code == 0, err
    assert "Rebuilt the index" in err and "from 2 manifest(s)" in err
    if damage != "missing":
        assert any(p.name.startswith("index.db.damaged-") for p in root.iterdir())  # kept, not deleted
    zoo = Zoo(root)
    assert zoo.get("ds", kind="dataset").id == ds_id and zoo.get("d/h", kind="head").id == head_id
    assert zoo.read_json is not None and zoo.file(zoo.get("ds"), "a.jsonl").read_bytes() == b"one\n"
    assert verify(zoo).ok and blob_bytes(root) == blobs
    zoo.close()


def test_prune_keeps_blobs_a_manifest_lists_even_when_the_index_lost_them(tmp_path, capsys):
    """An index swapped for an empty (valid) one: the manifests still witness every blob."""
    root = tmp_path / "zoo"
    zoo, ds_id, _ = small_zoo(root)
    with store.write_txn(zoo.db):
        for table in ("names", "files", "artifacts", "blobs"):
            zoo.db.execute(f"DELETE FROM {table}")
    blobs = blob_bytes(root)
    plan = plan_prune(zoo)
    assert plan.remove == [] and len([i for i in plan.kept if "manifest" in i.reason]) == len(blobs)
    code, _, _ = cli(capsys, "--zoo", str(root), "zoo", "prune", "--yes")
    assert code == 0 and blob_bytes(root) == blobs
    report = verify(zoo)
    assert not report.ok and len(report.unindexed) == 2
    code, out, _ = cli(capsys, "--zoo", str(root), "zoo", "verify", "--repair")
    assert code == 0, out
    assert Zoo(root).get("ds").id == ds_id and verify(Zoo(root)).ok


def test_manifests_follow_names_meta_and_removal(tmp_path):
    zoo, ds_id, head_id = small_zoo(tmp_path / "zoo")
    newer = zoo.put("head", {"w": b"newer"}, {"inputs": {"dataset": ds_id}}, name="d/h", domain="d")
    zoo.update_meta(newer, note="x")
    assert verify(zoo).ok  # every artifact has a manifest that matches
    execute_rm(zoo, plan_rm(zoo, head_id))
    assert verify(zoo).ok
    zoo.close()
    (tmp_path / "zoo" / "index.db").write_bytes(b"")
    drop_wal(tmp_path / "zoo")
    from st2si_cli.zoo.maintenance import rebuild_index

    rebuilt = rebuild_index(tmp_path / "zoo")
    assert sorted(rebuilt.registered) == sorted([ds_id, newer.id])
    zoo = Zoo(tmp_path / "zoo")
    head = zoo.get("d/h", kind="head")
    assert head.id == newer.id and head.meta["note"] == "x"


def test_an_existing_zoo_without_manifests_gets_them_on_first_write_open(tmp_path):
    zoo, ds_id, _ = small_zoo(tmp_path / "zoo")
    zoo.close()
    shutil.rmtree(tmp_path / "zoo" / "manifests")
    zoo = Zoo(tmp_path / "zoo")
    assert (tmp_path / "zoo" / "manifests" / ds_id[:2] / f"{ds_id}.json").is_file() and verify(zoo).ok


# ---- 2. links --------------------------------------------------------------------------------------------
def test_prune_and_rm_never_follow_a_linked_blob_folder_and_verify_names_the_link(tmp_path, capsys):
    root = tmp_path / "zoo"
    zoo, ds_id, head_id = small_zoo(root)
    ds = zoo.get(ds_id)
    sha = ds.files["a.jsonl"]
    outside = tmp_path / "outside"
    shutil.copytree(root / "blobs" / sha[:2], outside)
    (outside / ("f" * 64)).write_bytes(b"not the zoo's")  # would be an "orphan" if followed
    shutil.rmtree(root / "blobs" / sha[:2])
    (root / "blobs" / sha[:2]).symlink_to(outside, target_is_directory=True)
    kept = {p.name: p.read_bytes() for p in outside.iterdir()}

    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "prune", "--yes")
    assert code == 0 and {p.name: p.read_bytes() for p in outside.iterdir()} == kept
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "verify")
    assert code == 1 and f"LINK  {root / 'blobs' / sha[:2]}" in out
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "rm", "d/h", "--yes")
    assert code == 0
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "rm", "ds", "--yes")
    assert code == 0
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == kept  # nothing deleted through the link
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "verify", "--repair")
    assert code == 1 and "move them away" in err


# ---- 4. inputs in use, dangling inputs -----------------------------------------------------------------
HOLDER = """
import sys
from st2si_cli.zoo.store import Zoo
zoo = Zoo(sys.argv[1])
zoo.hold(zoo.get("ds"))
print("holding", flush=True)
sys.stdin.read()
"""


def test_rm_refuses_an_input_a_running_process_holds(tmp_path, capsys):
    root = tmp_path / "zoo"
    zoo, ds_id, head_id = small_zoo(root)
    execute_rm(zoo, plan_rm(zoo, head_id))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        code, out, err = cli(capsys, "--zoo", str(root), "zoo", "rm", "ds", "--yes")
        assert code == 1 and "in use as an input by a running command" in err, err
        assert zoo.get("ds").id == ds_id
    finally:
        holder.communicate("", timeout=60)
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "rm", "ds", "--yes")
    assert code == 0, err
    assert zoo.find("ds") is None


def test_adapt_holds_its_dataset_and_backbone(tmp_path):
    zoo = build_zoo(tmp_path / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy")
    other = Zoo(zoo.root)
    for ref, kind in (("toy", "dataset"), ("tiny-opt", "backbone")):
        art = zoo.get(ref, kind=kind)
        assert art.id in zoo._held
        with pytest.raises(ZooError, match="in use"):
            execute_rm(other, plan_rm(other, ref, kind), force=True)
    zoo.close()  # released: now it may go
    execute_rm(other, plan_rm(other, "toy", "dataset"), force=True)


def test_a_put_whose_input_was_removed_meanwhile_is_refused(tmp_path):
    zoo, ds_id, head_id = small_zoo(tmp_path / "zoo")
    execute_rm(zoo, plan_rm(zoo, ds_id), force=True)
    with pytest.raises(ZooError, match="removed from the zoo while it ran"):
        zoo.put("head", {"w": b"late"}, {"inputs": {"dataset": ds_id}}, name="d/late", domain="d")
    assert zoo.find("d/late") is None


def test_verify_reports_dangling_inputs_and_repair_drops_them(tmp_path, capsys):
    root = tmp_path / "zoo"
    zoo, ds_id, head_id = small_zoo(root)
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "rm", "ds", "--yes", "--force")
    assert code == 0
    report = verify(zoo)
    assert report.dangling == [(head_id, ds_id)] and not report.ok
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "verify")
    assert code == 1 and f"DANGLING INPUT  head d/h lists {ds_id[:12]}" in out
    code, out, err = cli(capsys, "--zoo", str(root), "zoo", "verify", "--repair")
    assert code == 0 and "Dropped head d/h" in out
    assert verify(zoo).ok and zoo.find("d/h") is None


# ---- 5, 6. reading commands: create nothing, lock nothing ----------------------------------------------
def test_reading_commands_create_nothing(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "zoo"
    for args in (
        ["zoo", "ls"],
        ["zoo", "ls", "--json"],
        ["zoo", "info", "x"],
        ["zoo", "verify"],
        ["zoo", "prune", "--yes"],
        ["zoo", "rm", "x", "--yes"],
        ["eval", "--domain", "toy"],
        ["recommend", "--domain", "toy", "--user-history", "-"],
    ):
        code, out, err = cli(capsys, "--zoo", str(missing), *args)
        assert code in (0, 1), (args, err)
        assert not (tmp_path / "no").exists(), args
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = cli(capsys, "--zoo", str(empty), "zoo", "ls")
    assert code == 0 and list(empty.iterdir()) == []
    code, out, err = cli(capsys, "--zoo", "", "zoo", "ls")
    assert code == 2 and "--zoo" in err and "empty path" in err


def make_read_only(root: Path) -> None:
    for dirpath, _dirs, filenames in os.walk(root):
        for n in filenames:
            p = Path(dirpath) / n
            if not p.is_symlink():
                p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        Path(dirpath).chmod(0o555)


def tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name not in ("index.db-shm", "index.db-wal")
    }


@pytest.fixture
def served_zoo():
    """An adapted zoo in a world-readable folder (so another user may read it), checkpointed."""
    base = Path(tempfile.mkdtemp(prefix="st2si-ro-"))
    base.chmod(0o755)
    zoo = build_zoo(base / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy")
    zoo.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    zoo.close()
    drop_wal(base / "zoo")
    yield base / "zoo"
    for dirpath, _, _ in os.walk(base):
        Path(dirpath).chmod(0o755)
    shutil.rmtree(base, ignore_errors=True)


def test_a_read_only_zoo_answers_ls_eval_and_recommend(served_zoo, capsys, monkeypatch):
    """In-process, with the zoo taken as one this process may not write: no lock, no file written."""
    make_read_only(served_zoo)
    before = tree(served_zoo)
    monkeypatch.setattr(schema, "may_write", lambda root: False)
    code, out, err = cli(capsys, "--zoo", str(served_zoo), "zoo", "ls")
    assert code == 0 and "toy/tiny-opt" in out, err
    code, out, err = cli(
        capsys, "--zoo", str(served_zoo), "eval", "--domain", "toy", "--dtype", "fp32", "--json"
    )
    assert code == 0 and '"ndcg@10"' in out.lower(), err
    sys_stdin = sys.stdin
    try:
        import io

        sys.stdin = io.StringIO(HISTORY)
        code, out, err = cli(
            capsys, "--zoo", str(served_zoo), "recommend", "--domain", "toy", "--user-history", "-"
        )
    finally:
        sys.stdin = sys_stdin
    assert code == 0 and '"user": "a"' in out, err
    assert tree(served_zoo) == before
    code, out, err = cli(capsys, "--zoo", str(served_zoo), "zoo", "prune", "--yes")
    assert code == 1 and "read-only" in err


def test_a_read_only_zoo_served_to_another_user(served_zoo):
    """The same, enforced by the operating system: a process that may not write the zoo reads it (as
    root, the rights to bypass file permissions are dropped from the child)."""
    make_read_only(served_zoo)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: file permissions cannot be enforced")
        prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    before = tree(served_zoo)
    env = {k: v for k, v in os.environ.items() if k != "ST2SI_DEBUG"}
    env.update(ST2SI_NO_PROGRESS="1", HOME=tempfile.gettempdir())

    def st2si(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        cmd = [*prefix, sys.executable, "-m", "st2si_cli", "--zoo", str(served_zoo), *args]
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, timeout=300)

    probe = subprocess.run(
        [*prefix, sys.executable, "-c", f"open({str(served_zoo / 'x')!r}, 'w')"], capture_output=True
    )
    assert probe.returncode != 0  # the child really may not write there
    ls = st2si("zoo", "ls")
    assert ls.returncode == 0 and "toy/tiny-opt" in ls.stdout, ls.stderr
    ev = st2si("eval", "--domain", "toy", "--dtype", "fp32", "--json")
    assert ev.returncode == 0, ev.stderr
    rec = st2si("recommend", "--domain", "toy", "--user-history", "-", stdin=HISTORY)
    assert rec.returncode == 0 and '"user": "a"' in rec.stdout, rec.stderr
    assert tree(served_zoo) == before


# ---- 11, 12. damaged folders, full disk ----------------------------------------------------------------
def test_views_replaced_by_a_file_is_named(tmp_path, capsys):
    zoo, _, _ = small_zoo(tmp_path / "zoo")
    zoo.close()
    shutil.rmtree(tmp_path / "zoo" / "views")
    (tmp_path / "zoo" / "views").write_text("x")
    code, out, err = cli(capsys, "--zoo", str(tmp_path / "zoo"), "zoo", "ls")
    assert code == 1 and f"{tmp_path / 'zoo' / 'views'} is not a folder" in err and err.count("\n") == 1


def test_a_full_disk_leaves_nothing_under_tmp(tmp_path, monkeypatch):
    zoo = Zoo(tmp_path / "zoo")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.os, "fsync", full)
    with pytest.raises(ZooError, match="no space left on the device of the zoo"):
        zoo.put(
            "dataset",
            {"a": b"x" * 100, "b": tmp_path.joinpath("src").write_bytes(b"y") and tmp_path / "src"},
            {},
        )
    with pytest.raises(ZooError, match="no space left"):
        zoo.put("dataset", {"b": tmp_path / "src"}, {})
    assert list((tmp_path / "zoo" / "tmp").iterdir()) == []
    assert zoo.ls() == []


# ---- 15. a pretrain's staging folder is claimed --------------------------------------------------------
def test_pretrain_staging_folder_is_claimed(tmp_path):
    from st2si_cli.model.text import TextConfig
    from st2si_cli.pretrain.config import PretrainConfig, RunSetup
    from st2si_cli.pretrain.distributed import DistInfo
    from st2si_cli.pretrain.full import _claim_stage

    zoo, ds_id, _ = small_zoo(tmp_path / "zoo")
    ds = zoo.get(ds_id)
    run_ = RunSetup(
        zoo=zoo,
        backbone=ds,
        datasets=[ds],
        text=TextConfig(),
        cfg=PretrainConfig(),
        info=DistInfo(),
        precision="fp32",
    )
    run_.stage = zoo.staging_dir("run-0123456789abcdef")
    first = _claim_stage(run_)
    assert first is not None
    with pytest.raises(St2siError, match="another pretrain with the same settings is running"):
        _claim_stage(run_)
    plan = plan_prune(zoo)
    assert run_.stage not in {i.path for i in plan.remove}
    first.release()
    second = _claim_stage(run_)
    assert second is not None
    second.release()
