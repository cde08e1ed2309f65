"""The GPU benchmark scripts run end to end on a CPU (tiny Llama, toy data), so they cannot rot between the
rare runs on a lent GPU: `python -m bench.gpu_real` (import, prepare, full tuning, ILP, tuning variants read
from step names, per-user ranks), `python -m bench.gpu_compare` (the table against baselines, paired
intervals, dataset check) and `bench.tuning_summary` on what the run wrote."""

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


VARIANT_STEPS = "full,ilp,lora2+init,full+dropout0.1,quality"


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    src = write_generic_source(tmp / "src", n_users=30)
    out = tmp / "out"
    r = _run(
        "-m", "bench.gpu_real", "--data", src, "--gguf", "tiny-llama", "--backbone", "tiny", "--domain", "toy",
        "--out", out, "--zoo", tmp / "zoo", "--device", "cpu", "--steps", VARIANT_STEPS, "--epochs", "2",
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
    quality = json.loads(quality_path(out).read_text())
    rows = {r["head"]: r for r in quality["rows"]}
    made = {
        "toy/gpu-full",
        steps["ilp"]["output"][0]["head"],
        "toy/gpu-lora2-init",
        "toy/gpu-full-dropout0.1",
    }
    assert set(rows) == made
    assert steps["quality"]["result_file"] == quality_path(out).name
    full = rows["toy/gpu-full"]
    assert len(full["ranks"].split()) == 30
    # the quality step's features are recomputed from the stored backbone: same test figure as pretrain's own
    assert full["metrics"]["NDCG@10"] == pytest.approx(run["metrics"]["test"]["NDCG@10"], abs=0.02)


def quality_path(out: Path) -> Path:
    return next(out.glob("*-quality-toy-gpu.json"))


def test_gpu_real_runs_the_pretrain_variants_its_step_names_say(gpu_run):
    _, out = gpu_run
    record = json.loads((out / "gpu-real-toy.json").read_text())
    steps = {s["step"]: s for s in record["steps"]}
    ilp_head = steps["ilp"]["output"][0]["head"]
    lora, dropout = steps["lora2+init"], steps["full+dropout0.1"]
    assert lora["returncode"] == 0 and dropout["returncode"] == 0
    assert "--out gpu-lora2-init" in lora["command"] and "--dropout" not in lora["command"]
    assert lora["command"].endswith(f"--lora 2 --init-head {ilp_head}")
    assert "--out gpu-full-dropout0.1" in dropout["command"] and dropout["command"].endswith("--dropout 0.1")
    assert "--init-head" not in dropout["command"] and "--lora" not in dropout["command"]
    assert lora["variant"] == {
        "tune_layers": 0, "lora": 2, "dropout": 0.0, "head_lr": None, "lr": None, "init_head": ilp_head,
    }  # fmt: skip
    assert (lora["head"], dropout["head"]) == ("toy/gpu-lora2-init", "toy/gpu-full-dropout0.1")
    assert lora["max_minutes"] > 0.5 and steps["full"]["variant"]["init_head"] is None
    lora_run = steps["lora2+init-record"]["output"][0]
    assert lora_run["flags"]["lora"] == 2 and lora_run["flags"]["init-head"] == 1
    assert lora_run["history"][0]["epoch"] == 0  # the start is validated first
    assert steps["full+dropout0.1-record"]["output"][0]["flags"]["dropout"] == 0.1


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("ilp,full+bogus,quality", "unknown modifier 'bogus'"),
        ("ilp,fulll", "unknown step 'fulll'"),
        ("lora2+init,ilp", "put ilp before it"),
        ("full+dropout2", "dropout 2 is out of range"),
        ("full,full", "given twice"),
    ],
)
def test_gpu_real_refuses_a_step_it_cannot_read_before_starting(tmp_path, steps, message):
    r = _run(
        "-m", "bench.gpu_real", "--data", tmp_path, "--gguf", "tiny-llama", "--out", tmp_path / "out",
        "--steps", steps, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr
    assert not (tmp_path / "out").exists()  # nothing ran


def test_tuning_summary_reads_the_run(gpu_run, tmp_path):
    from bench.tuning_summary import main

    _, out = gpu_run
    quality = json.loads(quality_path(out).read_text())
    record = json.loads((out / "gpu-real-toy.json").read_text())
    ilp_head = next(s for s in record["steps"] if s["step"] == "ilp")["output"][0]["head"]
    sasrec = {**next(r for r in quality["rows"] if r["head"] == ilp_head), "source": "recbole"}
    sasrec.update(method="SASRec", model="RecBole SASRec", converged=True)
    base = tmp_path / "base.json"
    base.write_text(json.dumps({**quality, "rows": [sasrec]}))
    summary = tmp_path / "tuning-summary.json"
    assert (
        main(
            [
                "--gpu-record",
                str(out / "gpu-real-toy.json"),
                "--baseline",
                str(base),
                "--summary",
                str(summary),
            ]
        )
        == 0
    )
    entry = json.loads(summary.read_text())["toy"]
    rows = {r["head"]: r for r in entry["rows"]}
    assert set(rows) == {"toy/gpu-full", "toy/gpu-lora2-init", "toy/gpu-full-dropout0.1"}
    assert rows["toy/gpu-lora2-init"]["method"] == f"LoRA r=2 on every layer, lr 5e-05, from {ilp_head}"
    assert (
        rows["toy/gpu-full-dropout0.1"]["method"]
        == "full tuning, dropout 0.1, lr 5e-05, from random ILP rows"
    )
    assert all(r["figures_from"].startswith("per-user ranks") for r in rows.values())
    moved = [r for r in rows.values() if not r["kept_start"]]
    tuned = entry["tuned"]
    assert tuned["valid_ndcg10"] == max(r["valid_ndcg10"] for r in moved)
    assert entry["start"]["head"] == ilp_head and len(tuned["test_diff_vs_start_ci95"]) == 2
    # SASRec here is the ILP head's own ranks: the same figures as the start's
    assert tuned["ratio_vs_sasrec"] == pytest.approx(tuned["test_ndcg10"] / entry["start"]["test_ndcg10"])


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
    quality_file = quality_path(out)
    quality = json.loads(quality_file.read_text())
    base = _baselines(quality, tmp / "baselines.json")
    report = tmp / "report"
    r = _run(
        "-m", "bench.gpu_compare", "--gpu-record", out / "gpu-real-toy.json", "--gpu-quality", quality_file,
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
    quality_file = quality_path(out)
    base = _baselines(json.loads(quality_file.read_text()), tmp / "other.json", dataset_id="0" * 64)
    r = _run(
        "-m", "bench.gpu_compare", "--gpu-record", out / "gpu-real-toy.json", "--gpu-quality", quality_file,
        "--baselines", base, "--out", tmp / "refused",
    )  # fmt: skip
    assert r.returncode != 0 and "different datasets" in r.stderr
    assert not (tmp / "refused").exists()
