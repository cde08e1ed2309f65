"""Train and test one RecBole model on an exported dataset; write every test user's full score vector.

Runs with the python of RecBole's own environment (bench/setup_recbole.sh), never st2si's: it imports
only recbole, torch and numpy. bench/quality.py exports the data, calls this, then checks the split
and computes the metrics with st2si's own metric code. Stand-alone use:

    bench/.venv-recbole/bin/python bench/recbole_runner.py --data-path WORK/data --dataset st2si_ml100k \
        --model SASRec --n-items 1682 --epochs 2 --out WORK/SASRec

The atomic file is `<data-path>/<dataset>/<dataset>.inter` with header
`user_id:token item_id:token timestamp:float`, where the item token is st2si's item index (0..n-1), the
user token st2si's user index, and the timestamp the position in the user's sequence.

Outputs in --out:
  result.json           RecBole's own test metrics, best validation result, per-epoch history, timings
  test_scores.npy       float32 [U, n_items]: scores of every st2si item (column = st2si item index)
  test_users.npy        int64 [U]: st2si user index of each row
  test_targets.npy      int64 [U]: the test target RecBole used (st2si item index)
  test_histories.json   per row, the input item list RecBole fed the model (st2si item indices)
  valid_users.npy, valid_targets.npy, valid_histories.json: the same for the validation split

The two work-arounds RecBole 1.2.1 needs with torch >= 2.6: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 (its
own checkpoint pickles its Config; set here before torch loads) and anomaly detection switched off
after importing its sequential models (sine.py switches it on globally; epochs run ~5x slower).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # work-around 1 (before torch is imported)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--model", required=True, help="RecBole model name, e.g. SASRec, GRU4Rec")
    ap.add_argument("--n-items", type=int, required=True, help="st2si catalog size (score matrix width)")
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--stopping-step", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2020)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--train-batch-size", type=int, default=256)
    ap.add_argument("--learning-rate", type=float, default=0.001)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = cores)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.argv = sys.argv[:1]  # RecBole's Config also parses the command line (`--key=value` would override)

    import importlib

    import numpy as np
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_logger, init_seed

    importlib.import_module("recbole.model.sequential_recommender")  # runs sine.py: set_detect_anomaly(True)
    torch.autograd.set_detect_anomaly(False)  # work-around 2
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config_dict = {
        "data_path": args.data_path,
        "checkpoint_dir": str(out / "saved"),
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "USER_ID_FIELD": "user_id",
        "ITEM_ID_FIELD": "item_id",
        "TIME_FIELD": "timestamp",
        "MAX_ITEM_LIST_LENGTH": args.max_len,
        "user_inter_num_interval": "[0,inf)",
        "item_inter_num_interval": "[0,inf)",
        "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "group_by": "user", "order": "TO", "mode": "full"},
        "metrics": ["Recall", "NDCG", "MRR"],
        "topk": [10],
        "valid_metric": "NDCG@10",
        "use_gpu": False,
        "epochs": args.epochs,
        "stopping_step": args.stopping_step,
        "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "reproducibility": True,
        "show_progress": False,
        "save_dataset": False,
        "save_dataloaders": False,
        "metric_decimal_place": 6,
    }
    config = Config(model=args.model, dataset=args.dataset, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    for h in list(logging.getLogger().handlers):  # keep RecBole's log file, drop its console echo
        if type(h) is logging.StreamHandler:
            logging.getLogger().removeHandler(h)
    torch.autograd.set_detect_anomaly(False)

    t_data = time.time()
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    data_seconds = time.time() - t_data
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"[{args.model}] {dataset.user_num - 1} users, {dataset.item_num - 1} items, "
        f"{len(train_data.dataset)} training prefixes, {n_params:,} parameters"
    )

    history: list[dict] = []
    # Resumable: after every validated epoch the whole training state goes to resume.pt (this process's
    # own file, like RecBole's checkpoint); a rerun with the same --out continues from the next epoch.
    resume_path = out / "resume.pt"
    resumed_from = None
    spent = 0.0
    if resume_path.exists():
        import random

        state = torch.load(resume_path, map_location="cpu", weights_only=False)
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.start_epoch = state["epoch"] + 1
        trainer.cur_step = state["cur_step"]
        trainer.best_valid_score = state["best_valid_score"]
        trainer.best_valid_result = state["best_valid_result"]
        trainer.saved_model_file = state["saved_model_file"]
        train_data.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        history[:] = state["history"]
        spent = state["train_seconds"]
        resumed_from = state["epoch"] + 1
        say(f"[{args.model}] resuming after epoch {resumed_from} (best valid {trainer.best_valid_score:.4f})")
    orig_train, orig_valid = trainer._train_epoch, trainer._valid_epoch
    t_fit = time.time() - spent

    def train_epoch(train_data, epoch_idx, *a, **kw):
        t0 = time.time()
        loss = orig_train(train_data, epoch_idx, *a, **kw)
        loss = float(sum(loss)) if isinstance(loss, tuple) else float(loss)
        history.append({"epoch": epoch_idx + 1, "loss": loss, "train_seconds": round(time.time() - t0, 3)})
        return loss

    def valid_epoch(valid_data, *a, **kw):
        t0 = time.time()
        score, result = orig_valid(valid_data, *a, **kw)
        rec = history[-1]
        rec["valid_seconds"] = round(time.time() - t0, 3)
        rec.update({f"valid_{k}": float(v) for k, v in result.items()})
        rec["valid_NDCG@10"] = float(result.get("ndcg@10", score))
        rec["elapsed_seconds"] = round(time.time() - t_fit, 3)
        say(
            f"[{args.model}] epoch {rec['epoch']}: loss {rec['loss']:.4f}, valid NDCG@10 {rec['valid_NDCG@10']:.4f} "
            f"({rec['train_seconds']:.1f} s train, {rec['valid_seconds']:.1f} s valid)"
        )
        return score, result

    trainer._train_epoch, trainer._valid_epoch = train_epoch, valid_epoch

    def save_state(epoch_idx, valid_score):
        import random

        state = {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "epoch": epoch_idx,
            "cur_step": trainer.cur_step,
            "best_valid_score": trainer.best_valid_score,
            "best_valid_result": trainer.best_valid_result,
            "saved_model_file": trainer.saved_model_file,
            "generator": train_data.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
            "history": history,
            "train_seconds": time.time() - t_fit,
        }
        tmp = resume_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, resume_path)

    if trainer.start_epoch < args.epochs and not (history and trainer.cur_step >= args.stopping_step):
        trainer.fit(train_data, valid_data, saved=True, show_progress=False, callback_fn=save_state)
    best_valid_score, best_valid_result = trainer.best_valid_score, trainer.best_valid_result
    train_seconds = time.time() - t_fit
    early_stopped = len(history) < args.epochs
    stopped = (
        f"early stopping ({args.stopping_step} epochs without a better valid NDCG@10)"
        if early_stopped
        else f"epoch cap ({args.epochs}) reached before early stopping: not converged"
    )
    best_epoch = (
        max(history, key=lambda r: (r.get("valid_NDCG@10", -1), -r["epoch"]))["epoch"] if history else None
    )

    t_eval = time.time()
    test_result = trainer.evaluate(
        test_data, load_best_model=True, show_progress=False
    )  # RecBole's own numbers
    eval_seconds = time.time() - t_eval

    # Every test user's full score vector, from the same eval function RecBole's evaluator used.
    tokens = dataset.field2id_token["item_id"]  # RecBole internal item ID -> token (0 is [PAD])
    user_tokens = dataset.field2id_token["user_id"]
    st2si_of = np.full(len(tokens), -1, dtype=np.int64)
    for rid in range(1, len(tokens)):
        st2si_of[rid] = int(tokens[rid])
    if (st2si_of[1:] < 0).any() or st2si_of[1:].max() >= args.n_items:
        raise SystemExit("item tokens are not st2si item indices in [0, n_items)")

    def dump(loader, prefix: str, with_scores: bool) -> int:
        users, targets, histories, rows = [], [], [], []
        trainer.model.eval()
        with torch.no_grad():
            for batched in loader:
                interaction, scores, _, positive_i = trainer._full_sort_batch_eval(batched)
                uids = interaction["user_id"].cpu().numpy()
                seqs = interaction["item_id_list"].cpu().numpy()
                lens = interaction["item_length"].cpu().numpy()
                users += [int(user_tokens[u]) for u in uids]
                targets += [int(st2si_of[i]) for i in positive_i.cpu().numpy()]
                histories += [[int(st2si_of[i]) for i in s[:n]] for s, n in zip(seqs, lens)]
                if with_scores:
                    s = scores.float().cpu().numpy()
                    block = np.full((s.shape[0], args.n_items), -np.inf, dtype=np.float32)
                    block[:, st2si_of[1:]] = s[:, 1:]
                    rows.append(block)
        np.save(out / f"{prefix}_users.npy", np.asarray(users, dtype=np.int64))
        np.save(out / f"{prefix}_targets.npy", np.asarray(targets, dtype=np.int64))
        (out / f"{prefix}_histories.json").write_text(json.dumps(histories))
        if with_scores:
            np.save(
                out / f"{prefix}_scores.npy",
                np.concatenate(rows) if rows else np.zeros((0, args.n_items), np.float32),
            )
        return len(users)

    n_test = dump(test_data, "test", with_scores=True)
    dump(valid_data, "valid", with_scores=False)
    missing = int(args.n_items - (len(tokens) - 1))

    result = {
        "model": args.model,
        "dataset": args.dataset,
        "recbole_test": {k: float(v) for k, v in (test_result or {}).items()},
        "recbole_best_valid": {k: float(v) for k, v in (best_valid_result or {}).items()},
        "best_valid_score": float(best_valid_score),
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "epoch_cap": args.epochs,
        "stopped": stopped,
        "early_stopped": early_stopped,
        "resumed_from_epoch": resumed_from,
        "history": history,
        "n_params": n_params,
        "n_test_users": n_test,
        "catalog_items_unseen_by_recbole": missing,
        "timings": {
            "data_seconds": round(data_seconds, 2),
            "train_seconds": round(train_seconds, 2),
            "test_seconds": round(eval_seconds, 2),
        },
        "config": {
            k: config[k]
            for k in (
                "MAX_ITEM_LIST_LENGTH",
                "epochs",
                "stopping_step",
                "train_batch_size",
                "eval_batch_size",
                "learning_rate",
                "seed",
                "loss_type",
                "valid_metric",
            )
            if k in config
        },
        "model_config": {
            k: config[k]
            for k in (
                "n_layers",
                "n_heads",
                "hidden_size",
                "inner_size",
                "embedding_size",
                "num_layers",
                "hidden_dropout_prob",
                "attn_dropout_prob",
                "dropout_prob",
            )
            if config[k] is not None
        },
        "versions": {
            "recbole": __import__("recbole").__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "torch_threads": torch.get_num_threads(),
        "anomaly_detection": torch.is_anomaly_enabled(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    say(f"[{args.model}] {stopped}; best epoch {best_epoch}; RecBole test {result['recbole_test']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
