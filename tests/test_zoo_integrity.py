"""What the zoo trusts: blob hashes checked on load (with the stat fast path), `zoo verify --repair`,
readers that lose a race with `zoo rm`, relative views in a moved zoo, and no code from model folders."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import build_zoo, quick_head, run_cli, synthetic_dataset

from st2si_cli.errors import ZooError
from st2si_cli.zoo import integrity
from st2si_cli.zoo.integrity import IntegrityError
from st2si_cli.zoo.maintenance import execute_rm, plan_rm
from st2si_cli.zoo.store import Zoo

HISTORY = '{"user": "a", "history": ["3", "4", "5"]}\n'


@pytest.fixture
def adapted(tmp_path: Path) -> Zoo:
    """A zoo with the synthetic domain "toy", tiny-opt and one ILP head (and its feature cache)."""
    zoo = build_zoo(tmp_path / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy")
    return zoo


def flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-2, os.SEEK_END)
        b = f.read(1)
        f.seek(-2, os.SEEK_END)
        f.write(bytes([b[0] ^ 0x01]))


def one_error_line(proc) -> str:
    """The one `Error:` line a failed command ends with (progress messages may come before it)."""
    assert proc.returncode != 0 and proc.stdout == "", proc.stdout
    lines = proc.stderr.strip().splitlines()
    errors = [x for x in lines if x.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def eval_cli(zoo: Zoo):
    return run_cli(zoo, "eval", "--domain", "toy", "--dtype", "fp32")


def recommend_cli(zoo: Zoo):
    return run_cli(zoo, "recommend", "--domain", "toy", "--user-history", "-", "-k", "3", input=HISTORY)


def test_a_flipped_byte_in_a_head_catalog_or_feature_cache_stops_eval_and_recommend(adapted: Zoo) -> None:
    zoo = adapted
    head = zoo.get("toy/tiny-opt", kind="head")
    dataset = zoo.get("toy", kind="dataset")
    features = zoo.get(head.meta["inputs"]["features"], kind="features")
    assert eval_cli(zoo).returncode == 0 and recommend_cli(zoo).returncode == 0
    cases = [
        (head, "head.safetensors", (eval_cli, recommend_cli)),
        (dataset, "catalog.jsonl", (eval_cli, recommend_cli)),
        (features, "features.safetensors", (eval_cli,)),  # recommend runs the backbone, not the cache
    ]
    for art, fname, commands in cases:
        path = zoo.blob_path(art.files[fname])
        original = path.read_bytes()
        flip_last_byte(path)
        for command in commands:
            line = one_error_line(command(zoo))
            assert "corrupted" in line and art.short_id in line and f"{art.kind} " in line, line
            assert "zoo verify --repair" in line
        path.write_bytes(original)  # a new mtime: the next check hashes again, and finds it intact
    assert eval_cli(zoo).returncode == 0 and recommend_cli(zoo).returncode == 0


def test_the_check_hashes_once_and_again_only_when_the_stat_changes(adapted: Zoo, monkeypatch) -> None:
    zoo = adapted
    calls: list[Path] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, **kw: calls.append(p) or real(p, **kw))
    integrity.forget_checks()
    head = zoo.get("toy/tiny-opt", kind="head")
    zoo.file(head, "head.safetensors")
    zoo.file(head, "head.safetensors")
    assert calls == [], "stat recorded at put: the fast path trusts it without hashing"
    path = zoo.blob_path(head.files["head.safetensors"])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    zoo.file(head, "head.safetensors")
    zoo.file(head, "head.safetensors")
    assert calls == [path], "a changed stat is hashed once, then recorded"
    integrity.forget_checks()
    with Zoo(zoo.root) as other:  # another process's view: the new stat is in the index
        other.file(head, "head.safetensors")
    assert calls == [path]
    flip_last_byte(path)
    with pytest.raises(IntegrityError, match=f"head toy/tiny-opt \\({head.short_id}"):
        zoo.file(head, "head.safetensors")


def test_verify_repair_drops_damaged_artifacts_and_says_how_to_rebuild(adapted: Zoo) -> None:
    zoo = adapted
    head = zoo.get("toy/tiny-opt", kind="head")
    flip_last_byte(zoo.blob_path(head.files["head.safetensors"]))
    bad = run_cli(zoo, "zoo", "verify")
    assert bad.returncode == 1 and "zoo verify --repair" in bad.stderr
    fixed = run_cli(zoo, "zoo", "verify", "--repair")
    assert fixed.returncode == 0, fixed.stderr
    assert f"Dropped head toy/tiny-opt ({head.short_id})" in fixed.stdout
    assert "st2si adapt --domain toy --backbone tiny-opt" in fixed.stdout
    clean = run_cli(zoo, "zoo", "verify", "--json")
    assert clean.returncode == 0 and json.loads(clean.stdout)["ok"]
    assert zoo.find(head.id) is None and zoo.find("toy", kind="dataset") is not None


def test_a_reader_that_loses_a_race_with_rm_gets_one_clear_error(adapted: Zoo) -> None:
    head = adapted.get("toy/tiny-opt", kind="head")  # read before another process removes it
    with Zoo(adapted.root) as other:
        execute_rm(other, plan_rm(other, head.id))
    with pytest.raises(ZooError, match="removed"):
        adapted.file(head, "head.safetensors")
    backbone = adapted.get("tiny-opt", kind="backbone")
    with Zoo(adapted.root) as other:
        with pytest.raises(ZooError, match="in use as an input"):  # adapt in `adapted` still holds it
            execute_rm(other, plan_rm(other, "tiny-opt"))
        adapted.release_holds()
        with pytest.raises(ZooError, match="input of"):  # the head's feature cache still uses it
            execute_rm(other, plan_rm(other, "tiny-opt"))
        execute_rm(other, plan_rm(other, "tiny-opt"), force=True)
    with pytest.raises(ZooError, match="tiny-opt .* removed"):
        adapted.view(backbone)


def test_a_moved_zoo_still_recommends_and_verify_catches_broken_views(adapted: Zoo, tmp_path: Path) -> None:
    assert recommend_cli(adapted).returncode == 0  # builds the backbone's view
    views = list((adapted.root / "views").iterdir())
    assert views and all(not os.readlink(p).startswith("/") for v in views for p in v.iterdir())
    adapted.close()
    moved = tmp_path / "elsewhere" / "zoo2"
    shutil.move(adapted.root, moved)
    proc = run_cli(moved, "recommend", "--domain", "toy", "--user-history", "-", "-k", "3", input=HISTORY)
    assert proc.returncode == 0, proc.stderr
    assert run_cli(moved, "zoo", "verify").returncode == 0
    # a view as older versions made it: absolute links into the old location
    view = next((moved / "views").iterdir())
    link = next(view.iterdir())
    target = os.readlink(link)
    link.unlink()
    link.symlink_to(str(adapted.root / "views" / view.name / target))
    bad = run_cli(moved, "zoo", "verify")
    assert bad.returncode == 1 and f"BROKEN VIEW  {view}" in bad.stdout
    assert run_cli(moved, "zoo", "verify", "--repair").returncode == 0
    assert run_cli(moved, "zoo", "verify").returncode == 0
    proc = run_cli(moved, "recommend", "--domain", "toy", "--user-history", "-", "-k", "3", input=HISTORY)
    assert proc.returncode == 0, proc.stderr


def test_pull_refuses_a_folder_that_asks_for_custom_code(tmp_path: Path) -> None:
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "x-custom",
                "architectures": ["XModel"],
                "auto_map": {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"},
            }
        )
    )
    (folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "configuration_x.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    zoo_root = tmp_path / "zoo"
    for answer in ("y\n", "yes\ny\ny\n", ""):
        proc = run_cli(zoo_root, "zoo", "pull", folder, "--name", "x", input=answer)
        line = one_error_line(proc)
        assert "auto_map" in line and "config.json" in line
        assert not marker.exists(), "code from the model folder ran"
    with Zoo(zoo_root) as zoo:
        assert zoo.ls() == []
