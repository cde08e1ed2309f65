"""One-line messages that name the file or artifact at fault, where a row of bad_inputs.tsv cannot set
the scene: an unreadable file, a zoo blob changed in place, a torch without CUDA; and `eval` measuring a
head on the features it was trained on."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import build_zoo, quick_head, synthetic_dataset

from st2si_cli.cli import recommend_cmd
from st2si_cli.cli.app import _one_line, run
from st2si_cli.errors import St2siError, ZooError
from st2si_cli.zoo.integrity import forget_checks, record_stats
from st2si_cli.zoo.store import Zoo


@pytest.fixture(scope="module")
def base_zoo(tmp_path_factory):
    """tiny-opt, the synthetic domain "toy" and one ILP head trained on fp32 features."""
    zoo = build_zoo(tmp_path_factory.mktemp("messages") / "zoo", {"toy": synthetic_dataset()})
    quick_head(zoo, "toy")
    return zoo.root


@pytest.fixture
def own_zoo(base_zoo, tmp_path):
    """A copy of the module's zoo that a test may damage: its blobs' stats recorded as known good."""
    root = tmp_path / "zoo"
    shutil.copytree(base_zoo, root)
    zoo = Zoo(root)
    record_stats(zoo.db, [(a.files[f], zoo.blob_path(a.files[f])) for a in zoo.ls() for f in a.files])
    forget_checks()
    yield zoo
    forget_checks()


def cli(monkeypatch, capsys, *argv):
    monkeypatch.setenv("ST2SI_NO_PROGRESS", "1")
    monkeypatch.delenv("ST2SI_DEBUG", raising=False)
    status = run([str(a) for a in argv])
    return status, capsys.readouterr()


def error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1, err
    return lines[0]


def change_in_place(path, offset: int, byte: bytes) -> None:
    """Overwrite one byte, keeping the file's size, mtime and inode (what the stat fast path trusts)."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)
    os.chmod(path, st.st_mode)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )


# ---- files that cannot be read ---------------------------------------------------------------------------


def test_unreadable_user_history_names_the_file(base_zoo, tmp_path, monkeypatch, capsys):
    history = tmp_path / "history.jsonl"
    history.write_text('{"user": "a", "history": ["1"]}\n')
    real_open = open

    def refusing_open(file, *args, **kwargs):  # what mode 000 does for a user other than root
        if str(file) == str(history):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(recommend_cmd, "open", refusing_open, raising=False)
    status, cap = cli(
        monkeypatch, capsys, "--zoo", base_zoo, "recommend", "--domain", "toy", "--user-history", history
    )
    assert status == 1 and cap.out == ""
    assert error_line(cap.err) == f"Error: {history}: Permission denied"
    assert "PermissionError" not in cap.err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files of mode 000")
def test_mode_000_user_history_names_the_file(base_zoo, tmp_path, monkeypatch, capsys):
    history = tmp_path / "history.jsonl"
    history.write_text('{"user": "a", "history": ["1"]}\n')
    history.chmod(0)
    status, cap = cli(
        monkeypatch, capsys, "--zoo", base_zoo, "recommend", "--domain", "toy", "--user-history", history
    )
    assert status != 0 and str(history) in error_line(cap.err) and "Permission denied" in cap.err


def test_the_catch_all_is_one_line_naming_the_file():
    assert (
        _one_line(PermissionError(13, "Permission denied", "/x/h.jsonl")) == "/x/h.jsonl: Permission denied"
    )
    assert _one_line(IsADirectoryError(21, "Is a directory", "/x/d")) == "/x/d: Is a directory"
    try:
        json.loads('{"a": 1,}')
    except json.JSONDecodeError as e:
        message = _one_line(e)
    assert "not valid JSON" in message and "line 1 column 9" in message and "zoo verify" in message
    message = _one_line(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert "not UTF-8" in message and "0xff" in message
    message = _one_line(TypeError("first line\nframe #0: c10::Error\nframe #1: ..."))
    assert "\n" not in message and message.startswith("TypeError: first line")


# ---- zoo files changed in place ------------------------------------------------------------------------


def test_dataset_blob_changed_in_place_names_the_artifact(own_zoo, monkeypatch, capsys):
    dataset = own_zoo.get("toy", kind="dataset")
    change_in_place(own_zoo.blob_path(dataset.files["catalog.jsonl"]), 0, b"X")
    status, cap = cli(monkeypatch, capsys, "--zoo", own_zoo.root, "eval", "--domain", "toy")
    line = error_line(cap.err)
    assert status == 1, cap.err
    assert f"dataset toy ({dataset.short_id}, file catalog.jsonl)" in line
    assert "st2si zoo verify --repair" in line and "JSONDecodeError: Expecting" not in line.split("(", 1)[0]


def test_sequences_blob_changed_in_place_names_its_file(own_zoo, monkeypatch, capsys):
    dataset = own_zoo.get("toy", kind="dataset")
    change_in_place(own_zoo.blob_path(dataset.files["sequences.jsonl"]), 2, b"X")  # {"Xser": ...
    status, cap = cli(
        monkeypatch, capsys, "--zoo", own_zoo.root, "adapt", "--domain", "toy", "--backbone", "tiny-opt"
    )
    line = error_line(cap.err)
    assert status == 1 and "file sequences.jsonl" in line and "st2si zoo verify --repair" in line


def test_read_json_of_a_changed_blob_is_a_zoo_error(own_zoo):
    backbone = own_zoo.get("tiny-opt", kind="backbone")
    change_in_place(own_zoo.blob_path(backbone.files["config.json"]), 0, b"X")
    with pytest.raises(
        ZooError, match=r"backbone tiny-opt \(\w+, file config.json\) does not decode.*verify --repair"
    ):
        own_zoo.read_json(backbone, "config.json")


def test_features_blob_changed_in_place_is_a_zoo_error(own_zoo):
    from st2si_cli.features.cache import load_feature_set

    features = own_zoo.ls(kind="features")[0]
    change_in_place(own_zoo.blob_path(features.files["features.safetensors"]), 7, b"\x7f")  # header length
    with pytest.raises(ZooError, match=r"file features.safetensors\) does not decode.*verify --repair"):
        load_feature_set(own_zoo, features)


# ---- devices -------------------------------------------------------------------------------------------


@pytest.fixture
def cpu_only_torch(monkeypatch):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)


def test_cuda_on_a_cpu_only_torch_is_a_usage_error(base_zoo, cpu_only_torch, monkeypatch, capsys):
    for argv in (
        ("eval", "--domain", "toy", "--device", "cuda"),
        ("recommend", "--domain", "toy", "--user-history", "-", "--device", "cuda:0"),
        ("pretrain", "--domain", "toy", "--backbone", "tiny-opt", "--device", "cuda"),
    ):
        status, cap = cli(monkeypatch, capsys, "--zoo", base_zoo, *argv)
        assert status == 2, cap.err
        assert "CUDA is not available in this torch build" in error_line(cap.err)
        assert "Traceback" not in cap.err and "AssertionError" not in cap.err


def test_load_backbone_refuses_cuda_on_a_cpu_only_torch(base_zoo, cpu_only_torch):
    from st2si_cli.backbones.load import load_backbone

    with pytest.raises(St2siError, match="CUDA is not available in this torch build"):
        load_backbone(Zoo(base_zoo), "tiny-opt", device="cuda")


def test_gpu_index_beyond_those_visible(monkeypatch):
    import torch

    from st2si_cli.backbones.load import device_problem

    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("cuda:1") is None
    assert device_problem("cuda:2") == "cuda:2 is not a GPU here: torch sees 2 (cuda:0 to cuda:1)"


# ---- eval's dtype --------------------------------------------------------------------------------------


def test_eval_uses_the_heads_dtype_by_default(own_zoo, monkeypatch, capsys):
    """The head was trained on fp32 features; even where `auto` would mean bf16, eval reads those."""
    import torch

    from st2si_cli.backbones import load as backbones
    from st2si_cli.zoo.meta import HeadMeta

    real = backbones.resolve_dtype
    monkeypatch.setattr(
        backbones, "resolve_dtype", lambda d, device="cpu": torch.bfloat16 if d == "auto" else real(d, device)
    )
    head = own_zoo.get("toy/tiny-opt", kind="head")
    features_before = {a.id for a in own_zoo.ls(kind="features")}
    status, cap = cli(monkeypatch, capsys, "--zoo", own_zoo.root, "eval", "--domain", "toy", "--json")
    assert status == 0, cap.err
    assert {a.id for a in Zoo(own_zoo.root).ls(kind="features")} == features_before
    measured = json.loads(cap.out)["metrics"]
    recorded = HeadMeta.of(head).metrics.test
    shared = [k for k in recorded if k in measured and isinstance(recorded[k], float)]
    assert "NDCG@10" in shared
    assert {k: measured[k] for k in shared} == pytest.approx({k: recorded[k] for k in shared}, abs=1e-6)


def test_eval_candidates_beyond_eligible_negatives_is_one_line(base_zoo, monkeypatch, capsys):
    status, cap = cli(
        monkeypatch, capsys, "--zoo", base_zoo, "eval", "--domain", "toy", "--protocol", "candidates-25"
    )
    assert status == 1 and "eligible negatives" in error_line(cap.err) and "ValueError" not in cap.err
