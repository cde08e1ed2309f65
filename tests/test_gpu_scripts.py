"""The GPU benchmark scripts run end to end on a CPU (tiny Llama, toy data), so they cannot rot between the
rare runs on a lent GPU: `python -m bench.gpu_real` (import, prepare, full tuning, ILP, per-user ranks) and
`python -m bench.gpu_compare` (the table against baselines, paired intervals, dataset check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_env, write_generic_source

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: object, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    src = write_generic_source(tmp / "src", n_users=30)
    out = tmp / "out"
    r = _run(
        "-m", "bench.gpu_real", "--data", src, "--gguf", "tiny-llama", "--backbone", "tiny", "--domain", "toy",
        "--out", out, "--zoo", tmp / "zoo", "--device", "cpu", "--steps", "full,ilp,quality", "--epochs", "2",
        "--batch-size", "8", "--grad-accum", "2", "--budget", "900",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return tmp, out


def test_gpu_real_records_every_step_and_the_per_user_ranks(gpu_run):
    _, out = gpu_run
    record = json.loads((out / "gpu-real-toy.json").read_text())
    steps = {s["step"]: s for s in record["steps"]}
    assert {
        k: steps[k]["returncode"] for k in ("pull", "prepare", "full", "ilp", "quality")
    } == dict.fromkeys(("pull", "prepare", "full", "ilp", "quality"), 0)
    run = next(s for s in record["steps"] if s["step"] == "full-record")["output"][0]
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    assert run["config"]["train"]["grad_accum"] == 2 and run["metrics"]["test"]["n_users"] == 30
    assert "epoch   1" in (out / "gpu-real-toy.log").read_text()  # epoch lines reach the log
    quality = json.loads(next(out.glob("*-quality-toy-gpu.json")).read_text())
    rows = {r["head"]: r for r in quality["rows"]}
    assert set(rows) == {"toy/gpu-full", steps["ilp"]["output"][0]["head"]}
    full = rows["toy/gpu-full"]
    assert len(full["ranks"].split()) == 30
    # the quality step's features are recomputed from the stored backbone: same test figure as pretrain's own
    assert full["metrics"]["NDCG@10"] == pytest.approx(run["metrics"]["test"]["NDCG@10"], abs=0.02)


def _baselines(quality: dict, path: Path, dataset_id: str | None = None) -> Path:
    """A quality file of the same split: two 'converged' baselines made of the st2si rows' ranks."""
    st2si = quality["rows"]
    fake = []
    for name, row in (("RecBole SASRec", st2si[0]), ("RecBole GRU4Rec", st2si[-1])):
        fake.append(
            {
                **{k: row[k] for k in ("ranks", "ranks_masked", "metrics", "valid_metrics")},
                "model": name,
                "source": "recbole",
                "early_stopped": True,
                "epochs_run": 5,
                "best_epoch": 3,
            }
        )
    paper = [{**r, "paper_ilp": True} if r["method"] == "ilp" else r for r in st2si]
    data = {**quality, "rows": fake + paper}
    if dataset_id:
        data["dataset"] = {**data["dataset"], "id": dataset_id}
    path.write_text(json.dumps(data))
    return path


def test_gpu_compare_sets_the_run_beside_the_baselines_with_paired_intervals(gpu_run):
    tmp, out = gpu_run
    quality_path = next(out.glob("*-quality-toy-gpu.json"))
    quality = json.loads(quality_path.read_text())
    base = _baselines(quality, tmp / "baselines.json")
    report = tmp / "report"
    r = _run(
        "-m", "bench.gpu_compare", "--gpu-record", out / "gpu-real-toy.json", "--gpu-quality", quality_path,
        "--baselines", base, "--out", report, "--note", "a note", "--backbone", "tiny",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(next(report.glob("*-gpu-full-toy.json")).read_text())
    rows = {row["model"]: row for row in result["rows"]}
    full = rows["st2si full tuning [toy/gpu-full]"]
    sasrec = rows["RecBole SASRec"]
    assert sasrec["ratio_to_sasrec"] == 1.0
    # SASRec here is the full-tuning row's own ranks: the paired difference is exactly 0
    assert full["diff"]["vs_SASRec"]["mean"] == 0.0 and full["diff"]["vs_SASRec"]["ci95"] == [0.0, 0.0]
    assert [h["epoch"] for h in result["full_tuning"]["history"]] == [1, 2]
    md = next(report.glob("*-gpu-full-toy.md")).read_text()
    assert "- a note" in md and "RecBole SASRec" in md
    assert (
        "--zoo ZOO" in md and str(tmp / "zoo") not in md and str(out) not in md
    )  # the GPU machine's folders


def test_gpu_compare_refuses_another_split(gpu_run):
    tmp, out = gpu_run
    quality_path = next(out.glob("*-quality-toy-gpu.json"))
    base = _baselines(json.loads(quality_path.read_text()), tmp / "other.json", dataset_id="0" * 64)
    r = _run(
        "-m", "bench.gpu_compare", "--gpu-record", out / "gpu-real-toy.json", "--gpu-quality", quality_path,
        "--baselines", base, "--out", tmp / "refused",
    )  # fmt: skip
    assert r.returncode != 0 and "different datasets" in r.stderr
    assert not (tmp / "refused").exists()
