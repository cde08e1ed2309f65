"""Quality side by side: st2si heads against converged RecBole SASRec / GRU4Rec, same split, same metric code.

    python bench/quality.py --domain amazon-scientific --models sasrec,gru4rec

1. The domain's dataset is exported to RecBole atomic files (user = st2si user index, item = st2si item
   index, timestamp = position in the user's sequence, so RecBole's order is exactly st2si's; the
   RecBole dataset is named `st2si_<domain>`, never `ml-100k`, which RecBole would swap for its own copy).
2. Each RecBole model trains in RecBole's own virtual environment (bench/setup_recbole.sh) through
   bench/recbole_runner.py until early stopping fires: `stopping_step 10` on valid NDCG@10,
   `train_batch_size 256`, `learning_rate 0.001`, at most 300 epochs, no wall-clock cap. Training
   state is saved after every epoch under --work, so a killed run resumes where it stopped; a finished
   run is reused. A model that reached the epoch cap without early stopping is "not converged" and
   no claim is made against it.
3. The split is proved identical: for every user, RecBole's test (and validation) target equals
   st2si's, and its input history equals st2si's history truncated to the newest 50 items. Any
   difference stops the run.
4. Every model's metrics (st2si's heads and RecBole's) come from `st2si_cli.metrics` on full-ranking
   ranks with pessimistic ties, history unmasked and again masked: NDCG@10, Recall@10, MRR (whole list),
   MRR@10. Paired per-user differences of NDCG@10 get a 95% bootstrap interval.

st2si rows: every head of the domain (or those given with --head), scored from the feature cache of
its backbone. "st2si_best" is the head with the best validation NDCG@10 (the choice never sees test);
"st2si_ilp" the paper-faithful ILP (random init, the authors' constant learning rate, no sweep) on the
default backbone.
Writes `<out>/<date>-<machine>-quality-<domain>.json`, updates `<out>/quality-summary.json`, prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from st2si_cli import DEFAULT_BACKBONE

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH_DIR,
    RESULTS_DIR,
    format_table,
    load_average,
    log,
    provenance,
    result_path,
    write_json,
)

RECBOLE_MODELS = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "bert4rec": "BERT4Rec"}
MAX_LEN = 50  # RecBole's MAX_ITEM_LIST_LENGTH, as in the paper's setting
KS = (10,)


class SplitMismatch(SystemExit):
    pass


# ---- st2si side --------------------------------------------------------------------------------------------


def st2si_heads(zoo: Any, domain: str, refs: list[str]) -> list[Any]:
    """The heads named, else every head of the domain (newest first)."""
    if refs:
        return [zoo.get(r, kind="head") for r in refs]
    return zoo.ls(kind="head", domain=domain)


def is_paper_ilp(head: Any) -> bool:
    """The paper-faithful ILP: random init, constant learning rate, frozen backbone, no sweep, and the
    paper's item text (titles as they are, '.' as the query token)."""
    train = head.meta.get("train") or {}
    text = head.meta.get("text") or {}
    return (
        text.get("attributes", ["title"]) == ["title"]
        and not text.get("trim_periods", False)
        and text.get("query", "dot") == "dot"
        and head.meta.get("method") == "ilp"
        and head.meta.get("head", "ilp") == "ilp"
        and "sweep" not in head.meta
        and train.get("schedule", "constant") == "constant"
        and train.get("init", "random") == "random"
        and train.get("dropout", 0.0) == 0.0
    )


def head_features(zoo: Any, head: Any, dataset_art: Any, compute_on: str | None) -> Any | None:
    """The FeatureSet a head scores from: its own cache, the same key recomputed on device `compute_on`,
    or None (`compute_on` None: never compute)."""
    from st2si_cli.adapt import FeatureOptions, get_features
    from st2si_cli.backbones import resolve_dtype
    from st2si_cli.features import cache_key, cache_name, dtype_name, load_feature_set
    from st2si_cli.heads import head_text_config

    ref = head.meta.get("inputs", {}).get("features")
    art = zoo.find(ref, kind="features") if ref else None
    if art is None:
        key = cache_key(
            head.meta["backbone"],
            dataset_art.id,
            head_text_config(head),
            dtype_name(resolve_dtype(head.meta.get("dtype") or "auto")),
            True,
        )
        art = zoo.find(cache_name(key), kind="features")
    if art is not None:
        return load_feature_set(zoo, art)
    if compute_on is None:
        return None
    log(f"Computing features for head {head.name} (one forward pass over the dataset)")
    _, fs, _ = get_features(
        zoo,
        head.meta["backbone"],
        dataset_art,
        head_text_config(head),
        FeatureOptions(dtype=head.meta.get("dtype") or "auto", device=compute_on),
    )
    return fs


def st2si_row(
    zoo: Any, head: Any, ds: Any, dataset_art: Any, compute_on: str | None
) -> dict[str, Any] | None:
    from st2si_cli.heads import check_compatible, head_kind
    from st2si_cli.metrics import metrics_from_ranks
    from st2si_cli.model.samples import TEST, VALID
    from st2si_cli.ranking import user_ranks

    check_compatible(head, dataset=dataset_art)
    fs = head_features(zoo, head, dataset_art, compute_on)
    if fs is None:
        log(
            f"head {head.name}: no cached features for its backbone and text settings; skipped "
            "(rerun with --compute-features)"
        )
        return None
    kind = head_kind(head)
    method = head.meta.get("method", "ilp")
    label = f"st2si {kind}" + (" (fully tuned backbone)" if method == "full" else "")
    timings = head.meta.get("timings", {})
    row: dict[str, Any] = {
        "model": f"{label} [{head.name}]",
        "source": "st2si",
        "head": head.name,
        "head_id": head.id,
        "kind": kind,
        "method": method,
        "paper_ilp": is_paper_ilp(head),
        "backbone": head.meta.get("backbone_name"),
        "best_epoch": head.meta.get("best_epoch"),
        "epochs_run": len(head.meta.get("history", [])),
        "train": head.meta.get("train"),
        "sweep": (head.meta.get("sweep") or {}).get("chosen"),
        "text": head.meta.get("text"),
        "train_seconds": timings.get("training_seconds"),
        "features_seconds": (timings.get("features_cached") or {}).get("seconds"),
        "history": [
            {
                "epoch": r["epoch"],
                "valid_NDCG@10": r.get("valid_NDCG@10"),
                "loss": r.get("loss"),
                "seconds": r.get("seconds"),
            }
            for r in head.meta.get("history", [])
        ],
        "metrics_source": "st2si_cli.metrics on st2si_cli.ranking.user_ranks (cached features)",
    }
    valid = user_ranks(zoo, head, fs, ds.sequences, VALID)
    row["valid_metrics"] = metrics_from_ranks(valid, KS)
    for masked in (False, True):
        ranks = user_ranks(zoo, head, fs, ds.sequences, TEST, mask_history=masked)
        row[rank_key(masked)] = ranks.tolist()
        row[metric_key(masked)] = metrics_from_ranks(ranks, KS)
    return row


def rank_key(masked: bool) -> str:
    return "ranks_masked" if masked else "ranks"


def metric_key(masked: bool) -> str:
    return "metrics_masked" if masked else "metrics"


# ---- RecBole side -----------------------------------------------------------------------------------------


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

    from st2si_cli.metrics import metrics_from_ranks, rank_of_target

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


# ---- the table ----------------------------------------------------------------------------------------------


def ndcg_gains(ranks: list[int]) -> np.ndarray:
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0)


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean over users."""
    rng = np.random.default_rng(seed)
    means = np.empty(n)
    for k in range(n):  # one resample at a time keeps memory at O(users)
        means[k] = values[rng.integers(0, len(values), size=len(values))].mean()
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_diff(a: list[int], b: list[int]) -> dict[str, Any]:
    """Per-user NDCG@10 of a minus b (same users, same targets): mean, 95% bootstrap CI, wins/losses."""
    d = ndcg_gains(a) - ndcg_gains(b)
    lo, hi = bootstrap_ci(d)
    return {
        "mean": float(d.mean()),
        "ci95": [lo, hi],
        "excludes_zero": bool(lo > 0 or hi < 0),
        "users_better": int((d > 0).sum()),
        "users_worse": int((d < 0).sum()),
    }


def status(r: dict[str, Any]) -> str:
    if r["source"] == "st2si":
        if r["kind"] == "fusion":
            return f"fusion, w = {(r.get('sweep') or {}).get('w')} (valid)"
        return f"best epoch {r.get('best_epoch')} of {r.get('epochs_run')}"
    if r["converged"]:
        return f"converged: early stop at {r['epochs_run']}, best {r['best_epoch']}"
    return f"NOT CONVERGED ({r['epochs_run']} epochs, cap {r['epoch_cap']}): no claim"


def table(rows: list[dict[str, Any]], masked: bool, reference: dict[str, Any] | None) -> str:
    headers = [
        "model",
        "valid NDCG@10",
        "NDCG@10",
        "Recall@10",
        "MRR",
        "MRR@10",
        "NDCG@10 95% CI",
        f"diff vs {reference['model'] if reference else '-'} (95% CI)",
        "training",
    ]
    body = []
    for r in rows:
        m = r[metric_key(masked)]
        ci = r.get("ndcg_ci_masked" if masked else "ndcg_ci")
        diff = (
            (r.get("diff_masked" if masked else "diff") or {}).get(reference["method"]) if reference else None
        )
        valid = (r.get("valid_metrics") or {}).get("NDCG@10")
        body.append(
            [
                r["model"],
                None if valid is None else f"{valid:.4f}",
                m.get("NDCG@10"),
                m.get("Recall@10"),
                m.get("MRR"),
                m.get("MRR@10"),
                f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else None,
                f"{diff['mean']:+.4f} ({diff['ci95'][0]:+.4f}, {diff['ci95'][1]:+.4f})" if diff else None,
                status(r),
            ]
        )
    return format_table(headers, body)


def summary_entry(r: dict[str, Any], sasrec: dict[str, Any] | None) -> dict[str, Any]:
    m = r["metrics"]
    entry: dict[str, Any] = {
        "ndcg10": m["NDCG@10"],
        "recall10": m["Recall@10"],
        "mrr": m["MRR"],
        "valid_ndcg10": (r.get("valid_metrics") or {}).get("NDCG@10"),
        "history_masked": {
            "ndcg10": r["metrics_masked"]["NDCG@10"],
            "recall10": r["metrics_masked"]["Recall@10"],
            "mrr": r["metrics_masked"]["MRR"],
        },
    }
    if r["source"] == "recbole":
        entry.update(
            early_stopped=r["early_stopped"],
            epochs=r["epochs_run"],
            best_epoch=r["best_epoch"],
            train_seconds=r["train_seconds"],
        )
    else:
        entry.update(
            head={
                "name": r["head"],
                "id": r["head_id"],
                "kind": r["kind"],
                "train": r["train"],
                "sweep_chosen": r["sweep"],
                "text": r["text"],
                "backbone": r["backbone"],
            }
        )
        if sasrec is not None:
            entry["ndcg10_diff_ci95"] = r["diff"]["SASRec"]["ci95"]
            entry["ndcg10_diff_mean"] = r["diff"]["SASRec"]["mean"]
            entry["history_masked"]["ndcg10_diff_ci95"] = r["diff_masked"]["SASRec"]["ci95"]
            entry["ratio_to_sasrec"] = (
                m["NDCG@10"] / sasrec["metrics"]["NDCG@10"]
                if sasrec["converged"] and sasrec["metrics"]["NDCG@10"] > 0
                else None
            )
    return entry


def update_summary(
    path: Path, key: str, rows: list[dict[str, Any]], record: dict[str, Any]
) -> dict[str, Any]:
    """One object per dataset in quality-summary.json: the converged baselines, the paper ILP, the best head."""
    by_method = {r["method"]: r for r in rows if r["source"] == "recbole"}
    sasrec = by_method.get("SASRec")
    st2si = [r for r in rows if r["source"] == "st2si"]
    entry: dict[str, Any] = {
        "dataset": record["dataset"],
        "protocol": record["protocol"],
        "command": record["provenance"]["command"],
        "date": record["provenance"].get("date"),
        "git": record["provenance"].get("git"),
        "selection": "st2si_best = the st2si head with the best validation NDCG@10; test reported once",
    }
    for name, method in (("sasrec", "SASRec"), ("gru4rec", "GRU4Rec")):
        if method in by_method:
            entry[name] = summary_entry(by_method[method], None)
    # the paper's ILP on the default backbone (another backbone's paper-settings ILP is a row, not this entry)
    paper = sorted((r for r in st2si if r["paper_ilp"]), key=lambda r: r["backbone"] != DEFAULT_BACKBONE)
    if paper:
        entry["st2si_ilp"] = summary_entry(paper[0], sasrec)
    if st2si:
        best = max(st2si, key=lambda r: (r["valid_metrics"]["NDCG@10"], r is paper[0] if paper else False))
        entry["st2si_best"] = summary_entry(best, sasrec)
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary[key] = entry
    write_json(path, dict(sorted(summary.items())))
    return entry


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $ST2SI_HOME, else the user data dir)")
    ap.add_argument("--domain", required=True)
    ap.add_argument(
        "--models", default="sasrec,gru4rec", help="RecBole models, comma-separated ('' for none)"
    )
    ap.add_argument("--recbole-venv", default=str(BENCH_DIR / ".venv-recbole"))
    ap.add_argument(
        "--head", action="append", default=[], help="st2si head to score (repeat; default: all of the domain)"
    )
    ap.add_argument(
        "--compute-features",
        action="store_true",
        help="run a forward pass where a head's features are not cached (may take long)",
    )
    ap.add_argument("--device", default="cpu", help="device of that forward pass (cpu, cuda, cuda:N)")
    ap.add_argument("--seed", type=int, default=2020, help="RecBole seed")
    ap.add_argument(
        "--epoch-cap",
        type=int,
        default=RECBOLE_SETTINGS["epochs"],
        help="most RecBole epochs (smoke runs of the instrument only: a model stopped by the cap "
        "is printed NOT CONVERGED)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for RecBole (default: one per core; 1 is faster on a busy machine)",
    )
    ap.add_argument(
        "--check-splits",
        default="test,valid",
        help="which of RecBole's splits must be st2si's, user by user (test alone: only its test rows are "
        "compared, e.g. on a cold split where RecBole's validation leaves out some 3-item users)",
    )
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    ap.add_argument("--summary", default=None, help="summary file (default: <out>/quality-summary.json)")
    ap.add_argument("--tag", default=None, help="added to the result file name (e.g. smoke)")
    ap.add_argument(
        "--work",
        default=None,
        help="RecBole's files: resumable training state, logs, score matrices (default: bench/.work/<domain>)",
    )
    args = ap.parse_args()

    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.zoo.store import Zoo

    RECBOLE_SETTINGS["epochs"] = args.epoch_cap  # recorded in the result's settings
    t_start = time.time()
    prov = provenance()
    zoo = Zoo(args.zoo)
    dataset_art = zoo.get(args.domain, kind="dataset")
    ds = load_dataset(zoo, dataset_art.id)
    log(
        f"Dataset {args.domain}: {ds.n_users} users, {ds.n_items} items, "
        f"{sum(len(s) for s in ds.sequences)} interactions"
    )

    rows: list[dict[str, Any]] = []
    models = [RECBOLE_MODELS.get(m.strip().lower(), m.strip()) for m in args.models.split(",") if m.strip()]
    work = Path(args.work) if args.work else BENCH_DIR / ".work" / args.domain
    if models:
        python = Path(args.recbole_venv) / "bin" / "python"
        if not python.exists():
            raise SystemExit(
                f"no RecBole environment at {args.recbole_venv}: run `bash bench/setup_recbole.sh`"
            )
        name = recbole_name(args.domain)
        export_atomic(ds, work / "data", name)
        for model in models:
            out = work / model
            result = run_recbole(python, model, work / "data", name, ds.n_items, out, args.seed, args.threads)
            rows.append(recbole_row(ds, out, result, model, tuple(args.check_splits.split(","))))
            log(
                f"RecBole {model}: split identical to st2si's for all {ds.n_users} users (test and valid); "
                f"{rows[-1]['stopped']}"
            )

    heads = st2si_heads(zoo, args.domain, args.head)
    if not heads:
        log(f"No st2si head for {args.domain}: run `st2si adapt --domain {args.domain}` for the st2si rows")
    for head in heads:
        row = st2si_row(zoo, head, ds, dataset_art, args.device if args.compute_features else None)
        if row is not None:
            rows.append(row)

    baselines = [r for r in rows if r["source"] == "recbole"]
    for r in rows:
        r["ndcg_ci"] = bootstrap_ci(ndcg_gains(r["ranks"]))
        r["ndcg_ci_masked"] = bootstrap_ci(ndcg_gains(r["ranks_masked"]))
        if r["source"] == "st2si":
            r["diff"] = {b["method"]: paired_diff(r["ranks"], b["ranks"]) for b in baselines}
            r["diff_masked"] = {
                b["method"]: paired_diff(r["ranks_masked"], b["ranks_masked"]) for b in baselines
            }
    reference = next((b for b in baselines if b["method"] == "SASRec"), baselines[0] if baselines else None)
    texts = {"unmasked": table(rows, False, reference), "masked": table(rows, True, reference)}
    record = {
        "part": "quality",
        "domain": args.domain,
        "dataset": {
            "id": dataset_art.id,
            "users": ds.n_users,
            "items": ds.n_items,
            "interactions": sum(len(s) for s in ds.sequences),
        },
        "protocol": {
            "split": "leave-one-out (last = test, second to last = valid; valid item in the test input)",
            "ranking": "full, all items",
            "ties": "pessimistic",
            "mask_history": "both (unmasked, masked)",
            "metric_code": "st2si_cli.metrics",
            "recbole_max_len": MAX_LEN,
            "ci": "95% percentile bootstrap over users, 2000 resamples; differences paired per user",
        },
        "settings": {
            "models": models,
            "recbole": RECBOLE_SETTINGS,
            "seed": args.seed,
            "recbole_threads": args.threads,
        },
        "provenance": {
            **prov,
            "load_average_end": load_average(),
            "wall_seconds": round(time.time() - t_start, 1),
        },
        "rows": rows,
        "table": texts["unmasked"],
        "table_masked": texts["masked"],
    }
    for r in rows:  # per-user ranks (user order) as one string each: a list of ints takes a line per user
        for key in ("ranks", "ranks_masked"):
            r[key] = " ".join(map(str, r[key]))
    record["protocol"]["ranks"] = (
        "per row: space-separated 1-based test ranks, one per user in st2si user order"
    )
    out_dir = Path(args.out)
    path = write_json(result_path(out_dir, f"quality-{args.domain}", args.tag), record)
    summary_path = Path(args.summary) if args.summary else out_dir / "quality-summary.json"
    entry = update_summary(summary_path, args.domain, rows, record)
    print(
        f"\nQuality on {args.domain} ({ds.n_users} users, {ds.n_items} items; full ranking, pessimistic ties, "
        f"st2si_cli.metrics)\ncommand: {prov['command']}\n"
    )
    print("History unmasked:\n" + texts["unmasked"])
    print("\nHistory masked:\n" + texts["masked"])
    best = entry.get("st2si_best")
    if best and best.get("ratio_to_sasrec") is not None:
        print(
            f"\nst2si_best ({best['head']['name']}, chosen on validation) / converged SASRec NDCG@10: "
            f"{best['ratio_to_sasrec']:.3f}x; paired difference {best['ndcg10_diff_mean']:+.4f}, "
            f"95% CI ({best['ndcg10_diff_ci95'][0]:+.4f}, {best['ndcg10_diff_ci95'][1]:+.4f})"
        )
    elif reference is not None and not reference["converged"]:
        print(f"\n{reference['model']} did not converge: no claim against it.")
    print(f"\nwrote {path} and {summary_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
