"""The zoo library: content-addressed artifacts, names, removal plans, verification, migrations."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from st2si_cli.errors import ZooError
from st2si_cli.zoo import store
from st2si_cli.zoo.maintenance import execute_rm, plan_rm, verify
from st2si_cli.zoo.store import Zoo, migrations


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def zoo(tmp_path: Path) -> Zoo:
    z = Zoo(tmp_path / "zoo")
    yield z
    z.close()


def table_counts(zoo: Zoo) -> dict[str, int]:
    return {t: zoo.db[t].count for t in ("artifacts", "files", "blobs", "names")}


def blob_files(zoo: Zoo) -> set[str]:
    return {p.name for p in zoo.iter_blob_files()}


# ---- put / get ---------------------------------------------------------------------------------------
def test_get_by_name_full_id_and_id_prefix(zoo: Zoo) -> None:
    art = zoo.put("dataset", {"a.jsonl": b"one\n"}, {"stats": {"users": 1}}, name="ml", domain="ml-100k")
    assert zoo.get("ml").id == art.id
    assert zoo.get(art.id).id == art.id
    assert zoo.get(art.short_id).id == art.id
    assert zoo.get(art.id[:6]).id == art.id
    assert art.name == "ml" and art.domain == "ml-100k" and art.kind == "dataset"
    assert art.meta == {"stats": {"users": 1}}
    assert art.files == {"a.jsonl": sha(b"one\n")}
    assert art.size == 4


def test_unknown_reference_raises_zoo_error(zoo: Zoo) -> None:
    with pytest.raises(ZooError, match="nope"):
        zoo.get("nope")
    assert zoo.find("abcdef") is None
    art = zoo.put("dataset", {"a": b"x"}, {}, name="ds")
    with pytest.raises(ZooError):
        zoo.get("ds", kind="head")
    assert zoo.find(art.id, kind="dataset") is not None


def test_put_of_same_content_gives_same_id_and_one_row(zoo: Zoo) -> None:
    a = zoo.put("head", {"w.bin": b"weights", "c.json": b"{}"}, {"metrics": {"NDCG@10": 0.1}})
    b = zoo.put("head", {"c.json": b"{}", "w.bin": b"weights"}, {"metrics": {"NDCG@10": 0.1}})
    assert a.id == b.id
    assert table_counts(zoo) == {"artifacts": 1, "files": 2, "blobs": 2, "names": 0}


def test_identity_and_kind_enter_the_id(zoo: Zoo) -> None:
    files = {"w.bin": b"weights"}
    ids = {
        zoo.put("head", files, {}).id,
        zoo.put("run", files, {}).id,
        zoo.put("head", files, {}, identity={"seed": 1}).id,
    }
    assert len(ids) == 3
    assert zoo.db["blobs"].count == 1


def test_name_moves_to_newer_artifact(zoo: Zoo) -> None:
    old = zoo.put("head", {"w": b"v1"}, {}, name="best")
    new = zoo.put("head", {"w": b"v2"}, {}, name="best")
    assert zoo.get("best").id == new.id
    assert zoo.get(old.id).name is None
    assert zoo.names_of(new) == ["best"]
    assert [a.id for a in zoo.ls(kind="head")] == [new.id, old.id]


def test_an_artifact_found_by_one_of_its_names_carries_that_name(zoo: Zoo) -> None:
    """The same weights stored twice under two names (a tuning run that kept its start) are one
    artifact; each name finds it and it carries the name it was asked by."""
    base = zoo.put("backbone", {"w": b"same"}, {}, name="smollm2-135m")
    again = zoo.put("backbone", {"w": b"same"}, {}, name="smollm2-135m-tuned-kept-start")
    assert again.id == base.id
    assert zoo.get("smollm2-135m").name == "smollm2-135m"
    assert zoo.get("smollm2-135m-tuned-kept-start", kind="backbone").name == "smollm2-135m-tuned-kept-start"
    assert zoo.get(base.id).name == "smollm2-135m-tuned-kept-start"  # by ID: the newest name


def test_put_from_files_and_move_from_staging(zoo: Zoo, tmp_path: Path) -> None:
    src = tmp_path / "catalog.jsonl"
    src.write_bytes(b"items\n")
    staged = zoo.staging_dir("job") / "model.bin"
    staged.write_bytes(b"model bytes")
    art = zoo.put("backbone", {"catalog.jsonl": src, "model.bin": staged}, {}, move=True)
    assert src.exists(), "a file outside tmp/ is copied, never moved"
    assert not staged.exists(), "a file staged under tmp/ is moved in"
    assert zoo.file(art, "model.bin").read_bytes() == b"model bytes"
    assert zoo.file(art, "catalog.jsonl").read_bytes() == b"items\n"


def test_put_rejects_unknown_kind(zoo: Zoo) -> None:
    with pytest.raises(ValueError):
        zoo.put("model", {"a": b"x"}, {})


def test_ls_filters_and_newest(zoo: Zoo) -> None:
    a = zoo.put("dataset", {"a": b"1"}, {}, domain="ml-100k")
    b = zoo.put("dataset", {"a": b"2"}, {}, domain="ml-1m")
    c = zoo.put("head", {"a": b"3"}, {}, domain="ml-100k")
    assert {x.id for x in zoo.ls(kind="dataset")} == {a.id, b.id}
    assert [x.id for x in zoo.ls(domain="ml-100k", kind="head")] == [c.id]
    assert zoo.newest("dataset", "ml-1m").id == b.id
    assert zoo.newest("run", "ml-1m") is None


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.text("abcxyz._", min_size=1, max_size=8), st.binary(max_size=64), max_size=4))
def test_put_then_get_round_trips_any_files(zoo: Zoo, files: dict[str, bytes]) -> None:
    art = zoo.put("features", files, {"n": len(files)})
    again = zoo.get(art.id)
    assert {f: zoo.file(again, f).read_bytes() for f in again.files} == files
    assert again.size == sum(len(b) for b in files.values())
    assert zoo.put("features", dict(reversed(list(files.items()))), {}).id == art.id


# ---- removal -----------------------------------------------------------------------------------------
def test_blobs_are_shared_and_rm_frees_only_unshared_ones(zoo: Zoo) -> None:
    a = zoo.put("dataset", {"shared": b"common", "own": b"only-a"}, {}, name="a")
    b = zoo.put("catalog", {"same": b"common"}, {}, name="b")
    assert zoo.db["blobs"].count == 2
    assert a.files["shared"] == b.files["same"]

    plan = plan_rm(zoo, "a")
    assert plan.artifact.id == a.id
    assert plan.names == ["a"]
    assert plan.blobs == [(sha(b"only-a"), 6)]
    assert plan.bytes_freed == 6


def test_execute_rm_leaves_no_row_or_file_behind(zoo: Zoo) -> None:
    a = zoo.put("dataset", {"shared": b"common", "own": b"only-a"}, {}, name="a")
    zoo.set_name("a-alias", a)
    b = zoo.put("catalog", {"same": b"common"}, {}, name="b")
    view = zoo.view(a)

    freed = execute_rm(zoo, plan_rm(zoo, "a"))
    assert freed == [sha(b"only-a")]
    for table, column in (("artifacts", "id"), ("files", "artifact"), ("names", "artifact")):
        assert zoo.db[table].count_where(f"{column} = ?", [a.id]) == 0
    assert not zoo.blob_path(sha(b"only-a")).exists()
    assert zoo.blob_path(sha(b"common")).exists()
    assert not view.exists()
    assert zoo.find("a") is None and zoo.find("a-alias") is None
    assert verify(zoo).ok and not verify(zoo).orphans

    execute_rm(zoo, plan_rm(zoo, b.id))
    assert table_counts(zoo) == {"artifacts": 0, "files": 0, "blobs": 0, "names": 0}
    assert blob_files(zoo) == set()


def test_execute_rm_keeps_a_blob_shared_after_the_plan_was_made(zoo: Zoo) -> None:
    zoo.put("dataset", {"own": b"only-a"}, {}, name="a")
    plan = plan_rm(zoo, "a")
    late = zoo.put("run", {"copy": b"only-a"}, {}, name="late")
    assert execute_rm(zoo, plan) == []
    assert zoo.file(late, "copy").read_bytes() == b"only-a"
    assert verify(zoo).ok


def test_plan_rm_lists_dependents(zoo: Zoo) -> None:
    ds = zoo.put("dataset", {"d": b"data"}, {}, name="ds")
    bb = zoo.put("backbone", {"m": b"model"}, {}, name="bb")
    head = zoo.put(
        "head", {"h": b"head"}, {"inputs": {"dataset": ds.id, "backbone": {"id": bb.id}}}, name="h"
    )
    run = zoo.put("run", {"r": b"run"}, {"inputs": {"heads": [head.id]}}, name="r")
    assert [d.id for d in plan_rm(zoo, "ds").dependents] == [head.id]
    assert [d.id for d in zoo.dependents(bb)] == [head.id]
    assert [d.id for d in zoo.dependents(head)] == [run.id]
    assert zoo.dependents(run) == []


# ---- verify ------------------------------------------------------------------------------------------
def test_verify_is_clean_on_a_fresh_store(zoo: Zoo) -> None:
    zoo.put("dataset", {"a": b"alpha", "b": b"beta"}, {})
    seen: list[int] = []
    report = verify(zoo, progress=seen.append)
    assert report.ok and report.checked == 2
    assert (report.mismatched, report.missing, report.orphans) == ([], [], [])
    assert sum(seen) == zoo.blobs_total_size() == 9


def test_verify_reports_changed_missing_and_orphan_blobs(zoo: Zoo) -> None:
    art = zoo.put("dataset", {"a": b"alpha", "b": b"beta", "c": b"gamma"}, {})
    changed = zoo.blob_path(art.files["a"])
    data = bytearray(changed.read_bytes())
    data[0] ^= 0x01
    changed.write_bytes(bytes(data))
    zoo.blob_path(art.files["b"]).unlink()
    orphan = zoo.root / "blobs" / "ff" / ("f" * 64)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"stray")

    report = verify(zoo)
    assert not report.ok
    assert report.mismatched == [art.files["a"]]
    assert report.missing == [art.files["b"]]
    assert report.orphans == ["f" * 64]
    assert zoo.artifacts_using_blob(art.files["a"]) == [art.id]


# ---- view --------------------------------------------------------------------------------------------
def test_view_is_a_folder_whose_files_read_the_stored_bytes(zoo: Zoo) -> None:
    files = {"config.json": b'{"a": 1}', "sub/weights.bin": b"\x00\x01\x02"}
    art = zoo.put("backbone", files, {})
    view = zoo.view(art)
    assert view.is_dir()
    assert {f: (view / f).read_bytes() for f in files} == files
    assert zoo.view(art) == view, "a second call reuses the folder"


def test_view_links_resolve_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with Zoo("relative-zoo") as zoo:
        view = zoo.view(zoo.put("backbone", {"w": b"bytes"}, {}))
    monkeypatch.chdir(tmp_path.parent)
    assert (view / "w").read_bytes() == b"bytes"


# ---- migrations, root resolution, atomicity -----------------------------------------------------------
def test_migrations_are_applied_once(tmp_path: Path) -> None:
    Zoo(tmp_path / "z").close()
    Zoo(tmp_path / "z").close()
    db = sqlite_utils.Database(tmp_path / "z" / "index.db")
    rows = list(db["_sqlite_migrations"].rows_where("migration_set = ?", [migrations.name]))
    names = [r["name"] for r in rows]
    assert names == [m.name for m in migrations._migrations]
    assert len(names) == len(set(names)) >= 1
    assert not migrations.pending(db)


def test_root_resolution_prefers_argument_then_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(store.ENV_HOME, str(tmp_path / "env"))
    assert store.resolve_root(tmp_path / "arg") == tmp_path / "arg"
    assert store.resolve_root() == tmp_path / "env"
    monkeypatch.delenv(store.ENV_HOME)
    assert store.resolve_root() == store.default_root().absolute()
    assert store.resolve_root("rel").is_absolute()


def test_failed_blob_write_during_put_registers_nothing(zoo: Zoo, monkeypatch: pytest.MonkeyPatch) -> None:
    before = zoo.put("dataset", {"a": b"kept"}, {}, name="before")
    real = zoo._store_blob
    calls = []

    def failing(source, move=False):
        calls.append(source)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(source, move=move)

    monkeypatch.setattr(zoo, "_store_blob", failing)
    with pytest.raises(OSError, match="disk full"):
        zoo.put("dataset", {"x": b"first", "y": b"second"}, {}, name="broken")
    assert [a.id for a in zoo.ls()] == [before.id]
    assert zoo.find("broken") is None
    assert table_counts(zoo) == {"artifacts": 1, "files": 1, "blobs": 1, "names": 1}
    report = verify(zoo)
    assert report.ok and report.orphans == [sha(b"first")], "the half-put leaves an orphan, never a row"


def test_failure_inside_the_index_transaction_rolls_back_every_row(
    zoo: Zoo, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = table_counts(zoo)
    real_insert_all = sqlite_utils.db.Table.insert_all

    def insert_all(self, records, *args, **kwargs):
        if self.name == "files":
            raise RuntimeError("crash between index writes")
        return real_insert_all(self, records, *args, **kwargs)

    monkeypatch.setattr(sqlite_utils.db.Table, "insert_all", insert_all)
    with pytest.raises(RuntimeError):
        zoo.put("dataset", {"x": b"payload"}, {}, name="half")
    assert table_counts(zoo) == before
    monkeypatch.undo()
    # and the store still works afterwards: no transaction left open
    assert zoo.put("dataset", {"x": b"payload"}, {}, name="whole").name == "whole"
    assert not zoo.db.conn.in_transaction


def test_update_meta_and_set_name(zoo: Zoo) -> None:
    art = zoo.put("run", {"log": b"l"}, {"flags": {"mq": True}})
    art = zoo.update_meta(art, metrics={"NDCG@10": 0.2})
    assert art.meta == {"flags": {"mq": True}, "metrics": {"NDCG@10": 0.2}}
    zoo.set_name("r1", art)
    assert zoo.get("r1").id == art.id
    assert os.path.basename(zoo.file(art, "log")) == art.files["log"]


# ---- names per kind, the old schema, prune -------------------------------------------------------------
def test_names_are_per_kind(zoo: Zoo) -> None:
    ds = zoo.put("dataset", {"c": b"data"}, {}, name="tiny", domain="tiny")
    bb = zoo.put("backbone", {"w": b"weights"}, {}, name="tiny")
    assert zoo.get("tiny", kind="dataset").id == ds.id and zoo.get("tiny", kind="backbone").id == bb.id
    with pytest.raises(ZooError, match="names a backbone and a dataset: say which with --kind"):
        zoo.get("tiny")
    with pytest.raises(ZooError, match=r"no head artifact named 'tiny'.*there is a backbone and a dataset"):
        zoo.get("tiny", kind="head")
    execute_rm(zoo, plan_rm(zoo, "tiny", "backbone"))
    assert zoo.get("tiny").id == ds.id


def test_a_name_refused_for_other_data_registers_nothing(zoo: Zoo) -> None:
    zoo.put("dataset", {"c": b"old"}, {}, name="d", domain="d")
    before = table_counts(zoo)
    with pytest.raises(store.NameTakenError):
        zoo.put("dataset", {"c": b"new"}, {}, name="d", domain="d", replace_name=False)
    assert table_counts(zoo) == before and verify(zoo).orphans == []
    same = zoo.put("dataset", {"c": b"old"}, {}, name="d", domain="d", replace_name=False)
    assert zoo.get("d").id == same.id, "the same data again is not a conflict"
    new = zoo.put("dataset", {"c": b"new"}, {}, name="d", domain="d")
    assert zoo.get("d", kind="dataset").id == new.id


def test_a_zoo_of_the_first_schema_migrates_and_its_artifacts_still_load(tmp_path: Path) -> None:
    root = tmp_path / "old"
    (root / "blobs" / sha(b"w")[:2]).mkdir(parents=True)
    (root / "blobs" / sha(b"w")[:2] / sha(b"w")).write_bytes(b"w")
    db = sqlite_utils.Database(root / "index.db")
    migrations.apply(db, stop_before="m002_blob_stat")
    art_id = "ab" * 32
    db["artifacts"].insert(
        {"id": art_id, "kind": "head", "domain": "d", "created": 1.0, "size": 1, "meta": "{}"}
    )
    db["files"].insert({"artifact": art_id, "name": "head.safetensors", "blob": sha(b"w")})
    db["blobs"].insert({"sha256": sha(b"w"), "size": 1})
    db["names"].insert({"name": "d/tiny", "artifact": art_id, "kind": "head", "updated": 1.0})
    db.close()
    with Zoo(root) as zoo:
        assert not migrations.pending(zoo.db)
        head = zoo.get("d/tiny", kind="head")
        assert zoo.file(head, "head.safetensors").read_bytes() == b"w"
        assert zoo.db.execute("SELECT mtime_ns FROM blobs").fetchone()[0] is not None, (
            "checked, then recorded"
        )


def test_prune_removes_orphans_and_leftovers_of_ended_processes_only(zoo: Zoo) -> None:
    import subprocess
    import sys

    from st2si_cli.zoo.maintenance import execute_prune, plan_prune

    kept = zoo.put("dataset", {"c": b"kept"}, {}, name="k")
    orphan = zoo.blob_path(sha(b"orphan"))
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    tmp = zoo.root / "tmp"
    dead = tmp / f"import-{int(ended.stdout)}-x1"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp / f"blob-{os.getpid()}-x2"
    live.write_bytes(b"mine")
    claimed = zoo.staging_dir("features-live")
    lock = zoo.claim("features-live")
    lock.acquire()
    unclaimed = zoo.staging_dir("features-dead")
    (unclaimed / "shard-00000.safetensors").write_bytes(b"s" * 10)
    (tmp / "features-dead.lock").touch()  # the lock file of a killed run: nobody holds it
    recent = tmp / "legacy-recent"
    recent.write_bytes(b"r")

    plan = plan_prune(zoo)
    removed = {i.path for i in plan.remove}
    # The lock of the killed run goes in the same pass as its unfinished work (one prune suffices).
    assert removed == {orphan, dead, unclaimed, tmp / "features-dead.lock"}
    assert {i.path for i in plan.kept} >= {live, claimed, recent, tmp / "features-live.lock"}
    assert plan.bytes_freed == len(b"orphan") + 1000 + 10
    assert execute_prune(zoo, plan) == plan.bytes_freed
    assert not any(p.exists() for p in removed) and live.exists() and claimed.exists()
    assert plan_prune(zoo).remove == []
    assert zoo.file(kept, "c").read_bytes() == b"kept"
    assert verify(zoo).ok and verify(zoo).orphans == []
    lock.release()
