"""`bench/tuning_summary.py` on records built here: the tuned model is chosen on validation among the runs
that moved from their start, its paired interval against the start and its ratio to SASRec come from the
per-user ranks given, and nothing is filled in where a record has no figure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.quality_stats import ndcg_gains, paired_diff
from bench.tuning_summary import main

DATASET = {"id": "d" * 64, "users": 12, "items": 30, "interactions": 99}
SASREC = [1, 3, 12, 2, 40, 5, 1, 9, 30, 2, 7, 11]
START = [2, 4, 15, 1, 40, 8, 3, 9, 25, 2, 11, 12]  # the ilp step's head
DROPOUT = [1, 2, 11, 1, 20, 6, 2, 9, 25, 1, 9, 12]  # second best on valid, not the best on test
LORA = START  # kept its start
HEADLR = [1, 1, 3, 1, 2, 1, 2, 1, 4, 1, 1, 2]  # the best on test, the worst on valid


def _ndcg(ranks: list[int]) -> float:
    return float(ndcg_gains(ranks).mean())


def _quality_row(head: str, valid: float, ranks: list[int]) -> dict:
    return {
        "source": "st2si",
        "head": head,
        "valid_metrics": {"NDCG@10": valid},
        "metrics": {"NDCG@10": _ndcg(ranks)},
        "ranks": " ".join(map(str, ranks)),
    }


def _baseline(path: Path) -> Path:
    sasrec = {
        "model": "RecBole SASRec",
        "source": "recbole",
        "method": "SASRec",
        "converged": True,
        "early_stopped": True,
        "metrics": {"NDCG@10": _ndcg(SASREC)},
        "valid_metrics": {"NDCG@10": 0.5},
        "ranks": SASREC,
    }
    rows = [sasrec, _quality_row("dom/ilp-cpu", 0.33, START)]
    path.write_text(json.dumps({"domain": "dom", "dataset": DATASET, "rows": rows}))
    return path


def _pretrain(step: str, head: str, command: str, record: dict | None, **extra) -> list[dict]:
    entry = {"step": step, "command": command, "returncode": 0, "seconds": 100.0, "head": head, **extra}
    if record is None:
        return [entry]
    return [
        entry,
        {"step": f"{step}-record", "command": "st2si zoo info", "returncode": 0, "output": [record]},
    ]


def _record(valid: float, test: float, best_step: int, history: list | None = None) -> dict:
    return {
        "metrics": {"valid": {"NDCG@10": valid}, "test": {"NDCG@10": test}},
        "best_epoch": 1 if best_step else 0,
        "best_step": best_step,
        "stopped_by": "patience",
        "history": history or [],
        "timings": {"train_seconds": 50.0},
    }


def _gpu_run(folder: Path, dataset_id: str = DATASET["id"], quality: bool = True) -> Path:
    """A gpu_real.py record with its quality file beside it (named by the quality step, as it does)."""
    folder.mkdir(parents=True, exist_ok=True)
    pretrain = "st2si pretrain --domain dom --backbone b --lr 5e-05 --device cuda"
    steps = [
        {"step": "prepare", "returncode": 0, "output": [{"id": dataset_id}]},
        {
            "step": "ilp",
            "returncode": 0,
            "command": "st2si adapt --domain dom --name gpu-ilp",
            "output": [{"head": "gpu-ilp", "valid": {"NDCG@10": 0.30}, "metrics": {"NDCG@10": 0.25}}],
        },
        *_pretrain(
            "full+dropout0.1+init",
            "dom/gpu-full-dropout0.1-init",
            f"{pretrain} --out gpu-full-dropout0.1-init --dropout 0.1 --init-head gpu-ilp",
            _record(0.32, 0.26, 33, [{"epoch": 0, "valid_NDCG@10": 0.301}]),
            variant={"init_head": "gpu-ilp"},
        ),
        *_pretrain(
            "lora8+init",
            "dom/gpu-lora8-init",
            f"{pretrain} --out gpu-lora8-init --lora 8 --init-head gpu-ilp",
            _record(0.40, 0.25, 0),  # its best point is the start: the best validation, but nothing tuned
            variant={"init_head": "gpu-ilp"},
        ),
        *_pretrain(
            "full+headlr1e-3",
            "dom/gpu-full-headlr1e-3",
            f"{pretrain} --out gpu-full-headlr1e-3 --head-lr 0.001",
            _record(0.20, 0.60, 99),
            variant={"init_head": None},
        ),
        {"step": "full+lr1e-4+init", "skipped": "80 s left"},
        {"step": "quality", "returncode": 0, "seconds": 30.0, "result_file": "q-gpu.json"},
    ]
    record = {"domain": "dom", "device": "cuda", "environment": {"gpu": "Fake GPU"}, "steps": steps}
    path = folder / "gpu-real-dom.json"
    path.write_text(json.dumps(record))
    if quality:
        rows = [
            _quality_row("gpu-ilp", 0.31, START),
            _quality_row("dom/gpu-full-dropout0.1-init", 0.33, DROPOUT),
            _quality_row("dom/gpu-lora8-init", 0.41, LORA),
            _quality_row("dom/gpu-full-headlr1e-3", 0.21, HEADLR),
        ]
        (folder / "q-gpu.json").write_text(json.dumps({"domain": "dom", "dataset": DATASET, "rows": rows}))
    return path


def _summary(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "tuning-summary.json"
    assert main([*args, "--baseline", str(_baseline(tmp_path / "base.json")), "--summary", str(out)]) == 0
    return json.loads(out.read_text())["dom"]


def test_the_tuned_model_is_the_best_on_validation_among_runs_that_left_their_start(tmp_path):
    entry = _summary(tmp_path, "--gpu-record", str(_gpu_run(tmp_path / "gpu")))
    rows = {r["head"]: r for r in entry["rows"]}
    assert len(entry["rows"]) == 4  # three runs and the skipped one
    assert rows["dom/gpu-lora8-init"]["kept_start"] is True
    assert rows["dom/gpu-full-lr1e-4-init"]["status"] == "skipped: 80 s left"
    assert rows["dom/gpu-full-lr1e-4-init"]["valid_ndcg10"] is None
    tuned, start = entry["tuned"], entry["start"]
    # lora8+init has the best validation but kept its start; headlr has the best test but not validation
    assert tuned["head"] == "dom/gpu-full-dropout0.1-init"
    assert tuned["method"] == "full tuning, dropout 0.1, lr 5e-05, from gpu-ilp"
    assert tuned["device"] == "Fake GPU" and "--dropout 0.1" in tuned["command"]
    # figures of heads in the quality file are those of their ranks
    assert tuned["valid_ndcg10"] == 0.33 and tuned["test_ndcg10"] == pytest.approx(_ndcg(DROPOUT))
    assert start["head"] == "gpu-ilp" and start["valid_ndcg10"] == 0.31
    assert start["test_ndcg10"] == pytest.approx(_ndcg(START))
    assert tuned["beats_start_on_valid"] is True
    expected = paired_diff(DROPOUT, START)
    assert tuned["test_diff_vs_start_mean"] == pytest.approx(
        float(np.mean(ndcg_gains(DROPOUT) - ndcg_gains(START)))
    )
    assert tuned["test_diff_vs_start_ci95"] == pytest.approx(expected["ci95"])
    assert tuned["test_diff_vs_sasrec_ci95"] == pytest.approx(paired_diff(DROPOUT, SASREC)["ci95"])
    assert tuned["ratio_vs_sasrec"] == pytest.approx(_ndcg(DROPOUT) / _ndcg(SASREC))
    assert "ci_missing" not in tuned
    assert entry["baseline"]["sasrec_test_ndcg10"] == pytest.approx(_ndcg(SASREC))


def test_without_ranks_the_figures_come_from_the_run_records_and_no_interval_is_made(tmp_path):
    gpu = _gpu_run(tmp_path / "gpu", quality=False)
    entry = _summary(tmp_path, "--gpu-record", str(gpu))
    tuned = entry["tuned"]
    assert tuned["valid_ndcg10"] == 0.32 and tuned["test_ndcg10"] == 0.26
    assert tuned["figures_from"] == "its run record"
    assert entry["start"]["valid_ndcg10"] == 0.30 and entry["start"]["figures_from"] == "its adapt record"
    assert tuned["test_diff_vs_start_ci95"] is None and tuned["test_diff_vs_sasrec_ci95"] is None
    assert tuned["ci_missing"] == "no per-user ranks of the tuned model in the files given"
    assert tuned["ratio_vs_sasrec"] == pytest.approx(0.26 / _ndcg(SASREC))


def test_a_run_from_random_rows_is_set_against_the_same_machines_ilp(tmp_path):
    gpu = _gpu_run(tmp_path / "gpu")
    record = json.loads(gpu.read_text())
    record["steps"] = [s for s in record["steps"] if "dropout" not in s["step"] and "lora" not in s["step"]]
    gpu.write_text(json.dumps(record))
    entry = _summary(tmp_path, "--gpu-record", str(gpu))
    assert entry["tuned"]["head"] == "dom/gpu-full-headlr1e-3"
    assert entry["tuned"]["method"] == "full tuning, lr 5e-05, ILP lr 0.001, from random ILP rows"
    assert entry["start"]["head"] == "gpu-ilp" and entry["start"]["relation"].startswith(
        "the ilp step's head"
    )
    assert entry["tuned"]["beats_start_on_valid"] is False
    assert entry["tuned"]["test_diff_vs_start_ci95"] == pytest.approx(paired_diff(HEADLR, START)["ci95"])


def test_cpu_records_are_rows_and_their_start_is_found_in_the_baseline(tmp_path):
    top = tmp_path / "top.json"
    top.write_text(
        json.dumps(
            {
                "domain": "dom",
                "command": "python bench/top_layers.py --tune-layers 2",
                "cpu": "Some CPU",
                "cores": 2,
                "child": {
                    "command": "python -m st2si_cli pretrain --tune-layers 2 --lr 1e-05 --init-head dom/ilp-cpu",
                    "returncode": 0,
                    "wall_s": 900.0,
                },
                "valid": {"NDCG@10": 0.35},
                "test": {"ndcg10": 0.2},
                "best_epoch": 1,
                "best_step": 99,
                "stopped_by": "patience",
            }
        )
    )
    run = tmp_path / "run.json"
    run_record = {k: v for k, v in _record(0.34, 0.3, 0).items() if k != "metrics"}
    run.write_text(
        json.dumps(
            {
                "domain": "dom",
                "head": "dom/r",
                "valid": {"NDCG@10": 0.34},
                "metrics": {"NDCG@10": 0.3},
                **run_record,
            }
        )
    )
    entry = _summary(
        tmp_path,
        "--top",
        str(top),
        "--run",
        str(run),
        "--run-command",
        "st2si pretrain --domain dom --init-head dom/ilp-cpu --device cuda",
    )
    rows = entry["rows"]
    assert [r["method"] for r in rows] == [
        "full tuning, from dom/ilp-cpu",
        "top-2 tuning, lr 1e-05, from dom/ilp-cpu",
    ]
    assert rows[0]["kept_start"] is True and rows[0]["device"] == "cuda"
    assert rows[1]["seconds"] == 900.0 and rows[1]["device"] == "Some CPU (2 cores)"
    tuned = entry["tuned"]
    assert tuned["valid_ndcg10"] == 0.35 and tuned["test_ndcg10"] == 0.2
    assert entry["start"]["head"] == "dom/ilp-cpu" and entry["start"]["valid_ndcg10"] == 0.33
    assert tuned["test_diff_vs_start_ci95"] is None  # a top-K result holds no per-user ranks
    assert tuned["ratio_vs_sasrec"] == pytest.approx(0.2 / _ndcg(SASREC))


def test_other_domains_in_the_summary_are_kept(tmp_path):
    out = tmp_path / "tuning-summary.json"
    out.write_text(json.dumps({"other": {"tuned": None}}))
    gpu = _gpu_run(tmp_path / "gpu")
    assert (
        main(
            [
                "--gpu-record",
                str(gpu),
                "--baseline",
                str(_baseline(tmp_path / "b.json")),
                "--summary",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads(out.read_text())
    assert summary["other"] == {"tuned": None} and summary["dom"]["tuned"] is not None


def test_a_record_of_another_dataset_is_refused(tmp_path):
    gpu = _gpu_run(tmp_path / "gpu", dataset_id="e" * 64)
    out = tmp_path / "tuning-summary.json"
    with pytest.raises(SystemExit, match="dataset eeeeeeeeeeee"):
        main(
            [
                "--gpu-record",
                str(gpu),
                "--baseline",
                str(_baseline(tmp_path / "b.json")),
                "--summary",
                str(out),
            ]
        )
    assert not out.exists()


def test_a_top_k_record_with_its_runs_ranks_gets_a_paired_interval_against_its_start(tmp_path):
    """bench/top_layers.py keeps the run's per-user ranks (its final evaluation) and, for a start that is
    not in the baseline, the start head's own: the interval is then made from them."""
    top = tmp_path / "top.json"
    top.write_text(
        json.dumps(
            {
                "domain": "dom",
                "command": "python -m bench.top_layers --tune-layers 1 --lora 8 --tag lora8",
                "cpu": "Some CPU",
                "cores": 2,
                "child": {
                    "command": "python -m st2si_cli pretrain --tune-layers 1 --lora 8 --init-head dom/ilp-new",
                    "returncode": 0,
                    "wall_s": 300.0,
                },
                "valid": {"NDCG@10": 0.36},
                "test": {"ndcg10": _ndcg(HEADLR)},
                "best_epoch": 1,
                "best_step": 40,
                "stopped_by": "patience",
                "run": {"backbone": "b-top1-lora8"},
                "ranks": {"valid": "1 2 3", "test": " ".join(map(str, HEADLR))},
                "init_head_metrics": [
                    {
                        "name": "dom/ilp-new",
                        "valid_ndcg10": 0.34,
                        "ndcg10": _ndcg(DROPOUT),
                        "test_ranks": " ".join(map(str, DROPOUT)),
                    }
                ],
            }
        )
    )
    entry = _summary(tmp_path, "--top", str(top))
    tuned, start = entry["tuned"], entry["start"]
    assert start["head"] == "dom/ilp-new" and start["test_ndcg10"] == pytest.approx(_ndcg(DROPOUT))
    assert tuned["method"] == "LoRA r=8 on the top 1 layers, from dom/ilp-new"
    assert tuned["figures_from"].startswith("per-user ranks")
    want = paired_diff(HEADLR, DROPOUT)
    assert tuned["test_diff_vs_start_mean"] == pytest.approx(want["mean"])
    assert tuned["test_diff_vs_start_ci95"] == pytest.approx(want["ci95"])
    assert tuned["test_diff_vs_sasrec_ci95"] == pytest.approx(paired_diff(HEADLR, SASREC)["ci95"])


def test_the_method_names_the_training_samples_flags():
    from bench.tuning_records import method, pretrain_flags

    flags = pretrain_flags("st2si pretrain --tune-layers 1 --lr 1e-05 --no-alignment --init-head dom/ilp")
    assert method(flags) == "top-1 tuning, lr 1e-05, histories only (no ID alignment), from dom/ilp"
    flags = pretrain_flags("st2si pretrain --no-multi-query --no-alignment")
    assert method(flags) == (
        "full tuning, histories only (no ID alignment), last query only, from random ILP rows"
    )
