"""Several processes on one zoo at once: first opens of a fresh zoo, parallel `prepare`, and `adapt`
runs that share a feature cache. Every artifact and name lands, and `zoo verify` is clean after."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, cli_command, cli_env, run_cli, synthetic_dataset, write_generic_source

from st2si_cli.backbones.pull import pull
from st2si_cli.data.prepare import store_dataset
from st2si_cli.zoo.locks import FileLock
from st2si_cli.zoo.store import Zoo

WORKERS = 4


def test_parallel_prepare_on_a_fresh_zoo_lands_every_dataset(tmp_path: Path) -> None:
    sources = [write_generic_source(tmp_path / f"src{i}", seed=i) for i in range(WORKERS)]
    for trial in range(3):  # each trial starts from a fresh zoo: the migrations race too
        root = tmp_path / f"zoo{trial}"
        procs = [
            subprocess.Popen(
                cli_command(root, "prepare", src, "--domain", f"d{i}", "--json"),
                cwd=REPO,
                env=cli_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, src in enumerate(sources)
        ]
        results = [(p, *p.communicate(timeout=300)) for p in procs]
        for p, _out, err in results:
            assert p.returncode == 0, err
        ids = {json.loads(out)["name"]: json.loads(out)["id"] for _, out, _ in results}
        with Zoo(root) as zoo:
            assert {d: zoo.get(d, kind="dataset").id for d in ids} == ids
        verify = run_cli(root, "zoo", "verify", "--json")
        assert verify.returncode == 0 and json.loads(verify.stdout)["orphans"] == []


@pytest.mark.parametrize("rounds", [int(os.environ.get("ST2SI_CONCURRENCY_ROUNDS", "10"))])
def test_parallel_prepare_and_adapt_rounds(tmp_path: Path, rounds: int) -> None:
    root = tmp_path / "zoo"
    with Zoo(root) as zoo:
        pull(zoo, "tiny-opt")
        store_dataset(zoo, synthetic_dataset(n_users=12), domain="shared", fmt="synthetic", source="x")
    go = tmp_path / "GO"
    worker = Path(__file__).with_name("zoo_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, root, str(i), str(rounds), go, tmp_path / f"out{i}.json"],
            cwd=REPO,
            env=cli_env({"OMP_NUM_THREADS": "1"}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(WORKERS)
    ]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, err[-3000:]
    stored = [
        s for i in range(WORKERS) for s in json.loads((tmp_path / f"out{i}.json").read_text())["stored"]
    ]
    with Zoo(root) as zoo:
        datasets = [s for s in stored if s["kind"] == "dataset"]
        assert len(datasets) == WORKERS * rounds
        for s in datasets:
            assert zoo.get(s["name"], kind="dataset").id == s["id"]
        heads = [s for s in stored if s["kind"] == "head"]
        for s in heads:
            assert zoo.find(s["id"], kind="head") is not None
        for s in heads:
            if s["domain"] != "shared":  # one head per private domain, under its default name
                assert zoo.get(s["name"], kind="head").id == s["id"]
        shared = {s["id"] for s in heads if s["domain"] == "shared"}
        assert len(shared) == 1, "identical adapt runs store one head, not one per run"
        assert len(zoo.ls(kind="head")) == WORKERS * rounds + 1
        # one feature cache per domain: the shared one computed once, then reused by the others
        assert len(zoo.ls(kind="features")) == WORKERS * rounds + 1
        leftovers = [p.name for p in (root / "tmp").iterdir() if not p.name.endswith(".lock")]
        assert leftovers == []
    verify = run_cli(root, "zoo", "verify", "--json")
    assert verify.returncode == 0, verify.stdout
    assert json.loads(verify.stdout)["orphans"] == []


def test_a_claimed_cache_waits_for_its_owner(tmp_path: Path) -> None:
    """The lock `compute_features` holds: a second claimant blocks until the first lets go."""
    with Zoo(tmp_path / "zoo") as zoo:
        lock = zoo.claim("features-abc")
        assert lock.acquire()
        code = (
            "import sys, time; from st2si_cli.zoo.store import Zoo; z = Zoo(sys.argv[1]);"
            "print('ready', flush=True); z.claim('features-abc').acquire(); print('got it', flush=True)"
        )
        child = subprocess.Popen(
            [sys.executable, "-c", code, zoo.root], cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        assert child.poll() is None, "the second claimant must wait"
        assert not FileLock(zoo.root / "tmp" / "features-abc.lock").acquire(blocking=False)
        lock.release()
        assert child.stdout.readline().strip() == "got it"
        assert child.wait(timeout=60) == 0


def test_a_view_another_process_made_meanwhile_is_kept(tmp_path: Path, monkeypatch) -> None:
    """Two processes (the ranks of a torchrun job) build one artifact's view at once: the one that
    finishes second keeps the first one's sound view, never moving it from under a loader reading it."""
    import st2si_cli.zoo.views as views

    zoo = Zoo(tmp_path / "zoo")
    art = zoo.put("backbone", {"config.json": b"{}", "model.bin": b"weights"}, {}, name="bb")
    real_mkdtemp = views.tempfile.mkdtemp
    made = {}

    def other_process_first(*args, **kwargs):
        if not made:  # the other process builds and publishes the view while this one starts its own
            made["ino"] = None  # (its own mkdtemp call comes back here)
            made["ino"] = views.build_view(zoo.root, art.id, art.files).stat().st_ino
        return real_mkdtemp(*args, **kwargs)

    monkeypatch.setattr(views.tempfile, "mkdtemp", other_process_first)
    target = views.build_view(zoo.root, art.id, art.files)
    assert target.stat().st_ino == made["ino"]  # the other's folder, not moved aside and replaced
    assert views.view_is_sound(zoo.root, target, art.files)
    assert not [p for p in (zoo.root / "tmp").iterdir() if "view" in p.name]  # this one's copy is gone
