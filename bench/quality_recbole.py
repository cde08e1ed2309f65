"""The RecBole side of the quality benchmark: export the domain as RecBole atomic files, train a model
until early stopping in RecBole's own environment (bench/recbole_runner.py, resumable), prove its split is
st2si's user by user, and rank its full score matrices with st2si's metric code."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BENCH_DIR, log
from bench.quality_stats import KS, metric_key, rank_key

RECBOLE_MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec"}
MAX_LEN = 50  # RecBole's MAX_ITEM_LIST_LENGTH, as in the paper's setting


class SplitMismatch(SystemExit):
    pass


def recbole_name(domain: str) -> str:
    """RecBole dataset name: never one of RecBole's bundled names (ml-100k would load its own copy)."""
    return "st2si_" + (re.sub(r"[^A-Za-z0-9]+", "", domain) or "data")


def export_atomic(ds: Any, data_path: Path, name: str) -> Path:
    """`<data_path>/<name>/<name>.inter`: user = st2si user index, item = st2si item index, time = position."""
    folder = data_path / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.inter"
    with open(path, "w", encoding="utf-8") as f:
        f.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, seq in enumerate(ds.sequences):
            for t, item in enumerate(seq):
                f.write(f"{u}\t{item}\t{t}\n")
    return path


# The converged-baseline protocol (../shared/peers/RECBOLE.md): early stopping decides, never a clock.
RECBOLE_SETTINGS = {
    "train_batch_size": 256,
    "learning_rate": 0.001,
    "epochs": 300,
    "stopping_step": 10,
    "max_len": MAX_LEN,
}


def run_recbole(
    python: Path,
    model: str,
    data_path: Path,
    name: str,
    n_items: int,
    out: Path,
    seed: int,
    threads: int | None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) one RecBole model in `out`; returns its result.json."""
    done = out / "result.json"
    if done.exists():
        result = json.loads(done.read_text())
        cfg = result.get("config", {})
        if (
            cfg.get("train_batch_size"),
            cfg.get("learning_rate"),
            cfg.get("epochs"),
            cfg.get("stopping_step"),
            cfg.get("seed"),
        ) == (
            RECBOLE_SETTINGS["train_batch_size"],
            RECBOLE_SETTINGS["learning_rate"],
            RECBOLE_SETTINGS["epochs"],
            RECBOLE_SETTINGS["stopping_step"],
            seed,
        ):
            log(f"RecBole {model}: reusing the finished run in {out}")
            return result
        raise SystemExit(f"{done} was made with other settings ({cfg}); remove {out} to retrain")
    argv = [
        str(python),
        str(BENCH_DIR / "recbole_runner.py"),
        "--data-path",
        str(data_path.resolve()),
        "--dataset",
        name,
        "--model",
        model,
        "--n-items",
        str(n_items),
        "--out",
        ".",
        "--seed",
        str(seed),
        "--max-len",
        str(MAX_LEN),
        "--epochs",
        str(RECBOLE_SETTINGS["epochs"]),
        "--stopping-step",
        str(RECBOLE_SETTINGS["stopping_step"]),
        "--train-batch-size",
        str(RECBOLE_SETTINGS["train_batch_size"]),
        "--learning-rate",
        str(RECBOLE_SETTINGS["learning_rate"]),
    ]
    if threads:
        argv += ["--threads", str(threads)]
    env = dict(os.environ)
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # RecBole's process only: its own checkpoint, this run
    env.pop("PYTHONPATH", None)
    out.mkdir(parents=True, exist_ok=True)
    resuming = (out / "resume.pt").exists()
    log(
        f"{'Resuming' if resuming else 'Training'} RecBole {model} until early stopping "
        f"(log: {out / 'runner.log'})"
    )
    with open(out / "runner.log", "a") as logf:
        # cwd = out: RecBole writes log/ and log_tensorboard/ into the working directory.
        proc = subprocess.run(argv, cwd=out, env=env, stdout=logf, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join((out / "runner.log").read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"RecBole {model} failed (exit {proc.returncode}); log tail:\n{tail}")
    return json.loads(done.read_text())


def check_split(
    ds: Any, out: Path, model: str, splits: tuple[str, ...] = ("test", "valid")
) -> dict[str, Any]:
    """RecBole's test and validation targets and inputs must be st2si's, user by user. Raises otherwise.
    `splits`: which to check (the cold-start bench scores test rows only)."""
    report: dict[str, Any] = {}
    for split, cut in (("test", 1), ("valid", 2)):
        if split not in splits:
            continue
        users = np.load(out / f"{split}_users.npy")
        targets = np.load(out / f"{split}_targets.npy")
        histories = json.loads((out / f"{split}_histories.json").read_text())
        problems: list[str] = []
        if sorted(users.tolist()) != list(range(ds.n_users)):
            seen = set(users.tolist())
            problems.append(
                f"{len(users)} rows for {ds.n_users} users; missing {len(set(range(ds.n_users)) - seen)}, "
                f"duplicated {len(users) - len(seen)}"
            )
        n_target = n_hist = 0
        for u, t, h in zip(users.tolist(), targets.tolist(), histories):
            if not 0 <= u < ds.n_users:
                problems.append(f"user index {u} outside the dataset")
                continue
            seq = ds.sequences[u]
            want_t, want_h = seq[-cut], seq[:-cut][-MAX_LEN:]
            if t != want_t:
                n_target += 1
                if n_target <= 5:
                    problems.append(f"user {ds.users[u]!r}: RecBole {split} target {t}, st2si {want_t}")
            if h != want_h:
                n_hist += 1
                if n_hist <= 5:
                    problems.append(
                        f"user {ds.users[u]!r}: RecBole {split} input {h[-5:]}..., st2si {want_h[-5:]}..."
                    )
        if problems:
            raise SplitMismatch(
                f"RecBole {model}: the {split} split differs from st2si's "
                f"({n_target} targets, {n_hist} histories differ):\n  " + "\n  ".join(problems)
            )
        report[split] = {
            "users": int(len(users)),
            "targets_equal": True,
            "histories_equal": True,
            "history_truncation": MAX_LEN,
        }
    return report


def recbole_row(
    ds: Any, out: Path, result: dict[str, Any], model: str, splits: tuple[str, ...] = ("test", "valid")
) -> dict[str, Any]:
    import torch

    from st2si_cli import metrics_from_ranks, rank_of_target

    split = check_split(ds, out, model, splits)
    users = np.load(out / "test_users.npy")
    targets = np.load(out / "test_targets.npy")
    scores = np.load(out / "test_scores.npy", mmap_mode="r")
    if scores.shape != (len(users), ds.n_items):
        raise SystemExit(f"RecBole {model}: score matrix {scores.shape}, expected {(len(users), ds.n_items)}")
    order = torch.from_numpy(np.argsort(users, kind="stable"))  # rows in st2si user order
    row: dict[str, Any] = {}
    for masked in (False, True):
        ranks = torch.empty(len(users), dtype=torch.long)
        for r0 in range(0, len(users), 1024):
            block = torch.from_numpy(np.array(scores[r0 : r0 + 1024]))
            exclude = [ds.sequences[int(u)][:-1] for u in users[r0 : r0 + 1024]] if masked else None
            ranks[r0 : r0 + 1024] = rank_of_target(
                block, torch.from_numpy(targets[r0 : r0 + 1024]), ties="pessimistic", exclude=exclude
            )
        ranks = ranks[order]
        row[rank_key(masked)] = ranks.tolist()
        row[metric_key(masked)] = metrics_from_ranks(ranks, KS)
    metrics = row["metrics"]
    own = result.get("recbole_test", {})
    cross = {}
    for ours, theirs in (("NDCG@10", "ndcg@10"), ("Recall@10", "recall@10"), ("MRR@10", "mrr@10")):
        if theirs in own:
            cross[ours] = {
                "st2si_metrics": metrics[ours],
                "recbole_printed": own[theirs],
                "abs_diff": abs(metrics[ours] - own[theirs]),
            }
    worst = max((c["abs_diff"] for c in cross.values()), default=0.0)
    if worst > 2e-3:
        log(
            f"WARNING: RecBole {model}: its printed metrics differ from st2si's by up to {worst:.4f} "
            "(ties ranked differently?)"
        )
    early = bool(result.get("early_stopped", result["epochs_run"] < result["epoch_cap"]))
    best_valid = next(
        (r.get("valid_NDCG@10") for r in result["history"] if r["epoch"] == result["best_epoch"]), None
    )
    return {
        "model": f"RecBole {model}",
        "source": "recbole",
        "method": model,
        **row,
        "valid_metrics": {"NDCG@10": best_valid},
        "metrics_source": "st2si_cli.metrics.rank_of_target on RecBole's full score matrix",
        "recbole_printed_test": own,
        "cross_check": cross,
        "split_check": split,
        "train_seconds": result["timings"]["train_seconds"],
        "features_seconds": None,
        "epochs_run": result["epochs_run"],
        "epoch_cap": result["epoch_cap"],
        "best_epoch": result["best_epoch"],
        "early_stopped": early,
        "converged": early,
        "stopped": result["stopped"],
        "resumed_from_epoch": result.get("resumed_from_epoch"),
        "n_params": result["n_params"],
        "model_config": result["model_config"],
        "config": result["config"],
        "versions": result["versions"],
        "torch_threads": result.get("torch_threads"),
        "anomaly_detection": result.get("anomaly_detection"),
        "history": [
            {
                "epoch": r["epoch"],
                "valid_NDCG@10": r.get("valid_NDCG@10"),
                "loss": r.get("loss"),
                "seconds": round(r.get("train_seconds", 0) + r.get("valid_seconds", 0), 3),
            }
            for r in result["history"]
        ],
    }
