"""Quality side by side: st2si heads against RecBole's SASRec / GRU4Rec on the same split, same metric code.

    python bench/quality.py --zoo ZOO --domain ml-100k --models sasrec,gru4rec --epochs 50

1. The domain's dataset is exported to RecBole atomic files (user = st2si user index, item = st2si item
   index, timestamp = position in the user's sequence, so RecBole's order is exactly st2si's; the
   RecBole dataset is named `st2si_<domain>`, never `ml-100k`, which RecBole would swap for its own copy).
2. Each RecBole model trains in RecBole's own virtual environment (bench/setup_recbole.sh) through
   bench/recbole_runner.py, which writes every test user's full score vector.
3. The split is proved identical: for every user, RecBole's test (and validation) target equals
   st2si's, and its input history equals st2si's history truncated to the newest 50 items. Any
   difference stops the run.
4. Every model's metrics (st2si's heads and RecBole's) come from `st2si_cli.metrics` on full-ranking
   ranks with pessimistic ties: NDCG@10, Recall@10, MRR (whole list), MRR@10. RecBole's own printed
   test metrics are kept as a cross-check.

st2si rows: the domain's newest ILP head (ranks from the cached features, the head weight and
`rank_rows`, test role) and, where one exists, the newest full-tuned head (meta "method" != "ilp").
Writes `<out>/<date>-<machine>-quality-<domain>.json` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def st2si_heads(zoo: Any, domain: str, head_ref: str | None, full_ref: str | None) -> list[Any]:
    """[newest ILP head, newest full-tuned head (if any)], or the heads named."""
    heads = zoo.ls(kind="head", domain=domain)
    out = []
    ilp = zoo.get(head_ref, kind="head") if head_ref else next((h for h in heads if h.meta.get("method") == "ilp"), None)
    if ilp is not None:
        out.append(ilp)
    full = zoo.get(full_ref, kind="head") if full_ref else next(
        (h for h in heads if h.meta.get("method") not in (None, "ilp")), None)
    if full is not None:
        out.append(full)
    return out


def head_features(zoo: Any, head: Any, dataset_art: Any, allow_compute: bool) -> tuple[Any, str] | None:
    """(FeatureSet, where from) for a head: the cache it was trained on, another cached set, or None."""
    from st2si_cli.adapt import FeatureOptions, get_features
    from st2si_cli.backbones import resolve_dtype
    from st2si_cli.features import cache_key, cache_name, dtype_name, load_feature_set
    from st2si_cli.heads import head_text_config

    ref = head.meta.get("inputs", {}).get("features")
    if ref:
        art = zoo.find(ref, kind="features")
        if art is not None:
            return load_feature_set(zoo, art), f"cache {art.name or art.short_id}"
    text = head_text_config(head)
    dtype = head.meta.get("dtype") or "auto"
    for alignment in (head.meta.get("train", {}).get("alignment", True), True, False):
        key = cache_key(head.meta["backbone"], dataset_art.id, text, dtype_name(resolve_dtype(dtype)), alignment)
        art = zoo.find(cache_name(key), kind="features")
        if art is not None:
            return load_feature_set(zoo, art), f"cache {art.name}"
    if not allow_compute:
        return None
    log(f"Computing features for head {head.name} (one forward pass over the dataset)")
    _, fs, _ = get_features(zoo, head.meta["backbone"], dataset_art, text, FeatureOptions(dtype=dtype))
    return fs, "computed now"


def st2si_row(zoo: Any, head: Any, ds: Any, dataset_art: Any, allow_compute: bool) -> dict[str, Any]:
    import torch

    from st2si_cli.features import TEST
    from st2si_cli.heads import check_compatible, load_head_weight
    from st2si_cli.metrics import metrics_from_ranks
    from st2si_cli.scoring import rank_rows

    check_compatible(head, dataset=dataset_art)
    method = head.meta.get("method", "ilp")
    label = "st2si ILP (frozen backbone)" if method == "ilp" else f"st2si {method}-tuned"
    timings = head.meta.get("timings", {})
    row: dict[str, Any] = {
        "model": label, "source": "st2si", "head": head.name, "head_id": head.id, "method": method,
        "backbone": head.meta.get("backbone_name"), "best_epoch": head.meta.get("best_epoch"),
        "epochs_run": len(head.meta.get("history", [])), "train": head.meta.get("train"), "text": head.meta.get("text"),
        "train_seconds": timings.get("training_seconds", timings.get("train_seconds")),
        "features_seconds": (timings.get("features_cached") or {}).get("seconds"),
        "history": [{"epoch": r["epoch"], "valid_NDCG@10": r.get("valid_NDCG@10"), "loss": r.get("loss"),
                     "seconds": r.get("seconds")} for r in head.meta.get("history", [])],
    }
    got = head_features(zoo, head, dataset_art, allow_compute)
    if got is None:
        recorded = (head.meta.get("metrics") or {}).get("test")
        if not recorded:
            raise SystemExit(f"head {head.name}: no cached features and no recorded test metrics "
                             "(rerun with --compute-features)")
        row.update(model=f"{label} (recorded)", metrics=recorded, metrics_source="the head's record (computed by st2si's metric code at "
                   "training time; no cached features for its backbone, so no per-user ranks)")
        log(f"{label}: no cached features for its backbone; using the head's recorded test metrics")
        return row
    fs, where = got
    rows = fs.rows(TEST)
    owners = fs.owner[rows]
    if sorted(owners.tolist()) != list(range(ds.n_users)):
        raise SystemExit(f"{label}: the feature set's test rows are not one per user")
    targets = fs.targets[rows]
    expected = torch.tensor([ds.sequences[int(u)][-1] for u in owners])
    if not torch.equal(targets, expected):
        raise SystemExit(f"{label}: the feature set's test targets differ from the dataset's last items")
    weight = load_head_weight(zoo, head)
    ranks = rank_rows(weight, fs.feats[rows], targets, ties="pessimistic")
    order = torch.argsort(owners)
    ranks = ranks[order]
    row.update(metrics=metrics_from_ranks(ranks, KS), metrics_source=f"st2si_cli.metrics on rank_rows ({where})",
               ranks=ranks.tolist())
    return row


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


def run_recbole(python: Path, model: str, data_path: Path, name: str, n_items: int, out: Path,
                epochs: int | None, max_minutes: float | None, seed: int, threads: int | None) -> dict[str, Any]:
    argv = [str(python), str(BENCH_DIR / "recbole_runner.py"), "--data-path", str(data_path), "--dataset", name,
            "--model", model, "--n-items", str(n_items), "--out", str(out), "--seed", str(seed),
            "--max-len", str(MAX_LEN)]
    if epochs is not None:
        argv += ["--epochs", str(epochs)]
    if max_minutes is not None:
        argv += ["--max-train-minutes", str(max_minutes)]
    if threads:
        argv += ["--threads", str(threads)]
    env = dict(os.environ)
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"  # RecBole's process only: its own checkpoint, this run
    env.pop("PYTHONPATH", None)
    out.mkdir(parents=True, exist_ok=True)
    log(f"Training RecBole {model} ({'epoch cap ' + str(epochs) if epochs else 'RecBole default epochs'}"
        f"{', budget ' + str(max_minutes) + ' min' if max_minutes else ''})")
    t0 = time.time()
    with open(out / "runner.log", "w") as logf:
        # cwd = out: RecBole writes log/ and log_tensorboard/ into the working directory.
        proc = subprocess.run(argv, cwd=out, env=env, stdout=logf, stderr=None)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = "\n".join((out / "runner.log").read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"RecBole {model} failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads((out / "result.json").read_text())
    result["wall_seconds"] = round(wall, 2)
    return result


def check_split(ds: Any, out: Path, model: str) -> dict[str, Any]:
    """RecBole's test and validation targets and inputs must be st2si's, user by user. Raises otherwise."""
    report: dict[str, Any] = {}
    for split, cut in (("test", 1), ("valid", 2)):
        users = np.load(out / f"{split}_users.npy")
        targets = np.load(out / f"{split}_targets.npy")
        histories = json.loads((out / f"{split}_histories.json").read_text())
        problems: list[str] = []
        if sorted(users.tolist()) != list(range(ds.n_users)):
            seen = set(users.tolist())
            problems.append(f"{len(users)} rows for {ds.n_users} users; missing {len(set(range(ds.n_users)) - seen)}, "
                            f"duplicated {len(users) - len(seen)}")
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
                    problems.append(f"user {ds.users[u]!r}: RecBole {split} input {h[-5:]}..., st2si {want_h[-5:]}...")
        if problems:
            raise SplitMismatch(f"RecBole {model}: the {split} split differs from st2si's "
                                f"({n_target} targets, {n_hist} histories differ):\n  " + "\n  ".join(problems))
        report[split] = {"users": int(len(users)), "targets_equal": True, "histories_equal": True,
                         "history_truncation": MAX_LEN}
    return report


def recbole_row(ds: Any, out: Path, result: dict[str, Any], model: str) -> dict[str, Any]:
    import torch

    from st2si_cli.metrics import metrics_from_ranks, rank_of_target

    split = check_split(ds, out, model)
    users = np.load(out / "test_users.npy")
    targets = np.load(out / "test_targets.npy")
    scores = np.load(out / "test_scores.npy", mmap_mode="r")
    if scores.shape != (len(users), ds.n_items):
        raise SystemExit(f"RecBole {model}: score matrix {scores.shape}, expected {(len(users), ds.n_items)}")
    ranks = torch.empty(len(users), dtype=torch.long)
    for r0 in range(0, len(users), 1024):
        block = torch.from_numpy(np.array(scores[r0 : r0 + 1024]))
        ranks[r0 : r0 + 1024] = rank_of_target(block, torch.from_numpy(targets[r0 : r0 + 1024]), ties="pessimistic")
    ranks = ranks[torch.from_numpy(np.argsort(users, kind="stable"))]  # rows in st2si user order
    metrics = metrics_from_ranks(ranks, KS)
    own = result.get("recbole_test", {})
    cross = {}
    for ours, theirs in (("NDCG@10", "ndcg@10"), ("Recall@10", "recall@10"), ("MRR@10", "mrr@10")):
        if theirs in own:
            cross[ours] = {"st2si_metrics": metrics[ours], "recbole_printed": own[theirs],
                           "abs_diff": abs(metrics[ours] - own[theirs])}
    worst = max((c["abs_diff"] for c in cross.values()), default=0.0)
    if worst > 2e-3:
        log(f"WARNING: RecBole {model}: its printed metrics differ from st2si's by up to {worst:.4f} "
            "(ties ranked differently?)")
    return {
        "model": f"RecBole {model}", "source": "recbole", "method": model, "metrics": metrics,
        "metrics_source": "st2si_cli.metrics.rank_of_target on RecBole's full score matrix",
        "recbole_printed_test": own, "cross_check": cross, "split_check": split,
        "train_seconds": result["timings"]["train_seconds"], "features_seconds": None,
        "epochs_run": result["epochs_run"], "epoch_cap": result["epoch_cap"], "best_epoch": result["best_epoch"],
        "stopped": result["stopped"], "n_params": result["n_params"], "model_config": result["model_config"],
        "config": result["config"], "versions": result["versions"], "wall_seconds": result["wall_seconds"],
        "torch_threads": result.get("torch_threads"), "anomaly_detection": result.get("anomaly_detection"),
        "history": [{"epoch": r["epoch"], "valid_NDCG@10": r.get("valid_NDCG@10"), "loss": r.get("loss"),
                     "seconds": round(r.get("train_seconds", 0) + r.get("valid_seconds", 0), 3)}
                    for r in result["history"]],
        "ranks": ranks.tolist(),
    }


# ---- the table ----------------------------------------------------------------------------------------------


def bootstrap_ci(ranks: list[int], n: int = 1000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of NDCG@10 over users."""
    r = np.asarray(ranks, dtype=np.float64)
    gain = np.where(r <= 10, 1.0 / np.log2(r + 1.0), 0.0)
    rng = np.random.default_rng(seed)
    means = gain[rng.integers(0, len(gain), size=(n, len(gain)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["model", "NDCG@10", "Recall@10", "MRR", "MRR@10", "n_users", "train s", "epochs", "NDCG@10 95% CI"]
    body = []
    for r in rows:
        m = r["metrics"]
        ci = r.get("ndcg_ci")
        epochs = f"{r.get('epochs_run')}" + (f" (best {r['best_epoch']})" if r.get("best_epoch") else "")
        body.append([r["model"], m.get("NDCG@10"), m.get("Recall@10"), m.get("MRR"), m.get("MRR@10"),
                     m.get("n_users"), None if r.get("train_seconds") is None else f"{float(r['train_seconds']):.1f}",
                     epochs, f"{ci[0]:.4f}-{ci[1]:.4f}" if ci else None])
    return format_table(headers, body)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default=None, help="zoo folder (default: $ST2SI_HOME, else the user data dir)")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--models", default="sasrec,gru4rec", help="RecBole models, comma-separated ('' for none)")
    ap.add_argument("--epochs", type=int, default=None, help="cap on RecBole epochs (default: RecBole's 300)")
    ap.add_argument("--max-train-minutes", type=float, default=None,
                    help="per RecBole model: stop after the epoch that passes this budget (best epoch is tested)")
    ap.add_argument("--recbole-venv", default=str(BENCH_DIR / ".venv-recbole"))
    ap.add_argument("--head", default=None, help="st2si ILP head (default: the domain's newest ILP head)")
    ap.add_argument("--full-head", default=None, help="full-tuned head (default: the domain's newest non-ILP head)")
    ap.add_argument("--compute-features", action="store_true",
                    help="run a forward pass where a head's features are not cached (may take long)")
    ap.add_argument("--seed", type=int, default=2020, help="RecBole seed")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for RecBole (default: one per core; 1 is several times faster on a busy machine)")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="results folder")
    ap.add_argument("--tag", default=None, help="added to the result file name (e.g. smoke)")
    ap.add_argument("--work", default=None, help="keep RecBole's files here (default: a temporary folder, removed)")
    args = ap.parse_args()

    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.zoo.store import Zoo

    t_start = time.time()
    prov = provenance()
    zoo = Zoo(args.zoo)
    dataset_art = zoo.get(args.domain, kind="dataset")
    ds = load_dataset(zoo, dataset_art.id)
    log(f"Dataset {args.domain}: {ds.n_users} users, {ds.n_items} items, "
        f"{sum(len(s) for s in ds.sequences)} interactions")

    rows: list[dict[str, Any]] = []
    heads = st2si_heads(zoo, args.domain, args.head, args.full_head)
    if not heads:
        log(f"No st2si head for {args.domain}: run `st2si adapt --domain {args.domain}` for the st2si row")
    for head in heads:
        rows.append(st2si_row(zoo, head, ds, dataset_art, args.compute_features))

    models = [RECBOLE_MODELS.get(m.strip().lower(), m.strip()) for m in args.models.split(",") if m.strip()]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="st2si-quality-"))
    try:
        if models:
            python = Path(args.recbole_venv) / "bin" / "python"
            if not python.exists():
                raise SystemExit(f"no RecBole environment at {args.recbole_venv}: run `bash bench/setup_recbole.sh`")
            name = recbole_name(args.domain)
            export_atomic(ds, work / "data", name)
            for model in models:
                out = work / model
                result = run_recbole(python, model, work / "data", name, ds.n_items, out, args.epochs,
                                     args.max_train_minutes, args.seed, args.threads)
                rows.append(recbole_row(ds, out, result, model))
                log(f"RecBole {model}: split identical to st2si's for all {ds.n_users} users (test and valid)")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    for r in rows:
        if r.get("ranks"):
            r["ndcg_ci"] = bootstrap_ci(r["ranks"])
    text = table(rows)
    record = {
        "part": "quality",
        "domain": args.domain,
        "dataset": {"id": dataset_art.id, "users": ds.n_users, "items": ds.n_items,
                    "interactions": sum(len(s) for s in ds.sequences)},
        "protocol": {"split": "leave-one-out (last = test, second to last = valid; valid item in the test input)",
                     "ranking": "full, all items", "ties": "pessimistic", "mask_history": False,
                     "metric_code": "st2si_cli.metrics", "recbole_max_len": MAX_LEN, "ci": "95% bootstrap, 1000"},
        "settings": {"models": models, "epoch_cap": args.epochs, "max_train_minutes": args.max_train_minutes,
                     "seed": args.seed, "recbole_threads": args.threads},
        "provenance": {**prov, "load_average_end": load_average(), "wall_seconds": round(time.time() - t_start, 1)},
        "rows": rows,
        "table": text,
    }
    path = write_json(result_path(Path(args.out), f"quality-{args.domain}", args.tag), record)
    print(f"\nQuality on {args.domain} ({ds.n_users} users, {ds.n_items} items; full ranking, pessimistic ties, "
          f"st2si_cli.metrics)\ncommand: {prov['command']}\n")
    print(text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
