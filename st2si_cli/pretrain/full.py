"""Full tuning (`st2si pretrain`): every backbone parameter and the ILP, multi-query input, ID alignment.

    datasets (one item space over their union) + backbone               corpus.py, weights.py
        -> training samples: histories (every TRAIN query, or one random crop per user) + alignment
        -> AdamW, cosine schedule with warm-up, early stopping on validation NDCG@10   loop.py, evaluation.py
        -> a new backbone, one head per domain, and a "run" record in the zoo          result.py

One process, torch DDP or DeepSpeed (`distributed/`). Each global step takes `batch_size x grad_accum x
world_size` samples from one seeded shuffle that does not depend on the world size; each rank gets a
disjoint slice, and the loss is the mean over all query positions of the global step, so 2 ranks with
batch b train exactly like 1 process with batch 2b (up to float summation order).

Resumable (`checkpoint.py`): checkpoints every `save_every` steps and at each epoch end go to
`zoo.staging_dir("run-<key>")` (key = hash of the config and inputs); `state.json` there names the last
complete one and is replaced atomically. Artifacts are put into the zoo only at the very end, by rank 0.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch

from st2si_cli import DEFAULT_BACKBONE
from st2si_cli.errors import St2siError
from st2si_cli.model.layers import n_layers
from st2si_cli.model.st2si import ST2SI, length_split_pays
from st2si_cli.model.text import TextConfig
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.checkpoint import RunState, load_rank_state, set_rng_state
from st2si_cli.pretrain.config import PretrainConfig, RunSetup, check_config, run_key
from st2si_cli.pretrain.corpus import Corpus, build_corpus, steps_per_epoch
from st2si_cli.pretrain.loop import full_data, make_engine, new_totals, train_epochs
from st2si_cli.pretrain.result import PretrainResult, store_result
from st2si_cli.pretrain.top import check_tune_layers, top_module_and_data
from st2si_cli.pretrain.tuning import add_dropout, add_lora
from st2si_cli.pretrain.warm_start import load_init_heads, resolve_init_heads
from st2si_cli.pretrain.weights import load_trainable
from st2si_cli.progress import Reporter
from st2si_cli.zoo.locks import FileLock
from st2si_cli.zoo.store import Zoo


def pretrain(
    zoo: Zoo,
    domains: Sequence[str],
    *,
    backbone: str = DEFAULT_BACKBONE,
    text: TextConfig | None = None,
    cfg: PretrainConfig | None = None,
    out: str | None = None,
    device: str = "auto",
    deepspeed: str | None = None,
    resume: bool = False,
    restart: bool = False,
    reporter: Reporter | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Full tuning on one or more domains; stores a backbone, a head per domain and a run (rank 0).

    `deepspeed`: None (one process, or torch DDP under torchrun), a preset zero0..zero3, or a JSON file.
    `on_step(info)` runs after every optimizer step (and its checkpoint); raising from it stops the run
    the way a kill would (tests use this).
    """
    text = text or TextConfig()
    cfg = cfg or PretrainConfig()
    check_config(cfg, domains)
    with dist.processes(device, use_deepspeed=deepspeed is not None) as info:
        t_start = time.time()
        run = _setup(zoo, list(domains), backbone, text, cfg, info)
        run.deepspeed, run.out, run.on_step = deepspeed, out, on_step
        run.reporter = reporter if (reporter is not None and info.is_main) else Reporter()
        run.ds_config = _deepspeed_config(run) if deepspeed is not None else None
        run.cfg = cfg = replace(
            cfg,
            tune_layers=check_tune_layers(run),  # K = L is full tuning
            init_heads=resolve_init_heads(zoo, cfg.init_heads, run.backbone, run.datasets),
        )
        run.key = run_key(
            run.backbone, run.datasets, text, cfg, info.world_size, run.ds_config, run.precision
        )
        run.stage = zoo.root / "tmp" / f"run-{run.key[:16]}"
        claim = _claim_stage(run)
        try:
            state = _open_state(run, resume, restart)
            model, tokenizer = load_trainable(zoo, run.backbone, text.query)
            corpus = build_corpus(zoo, run.datasets, tokenizer, text)
            if not state.stopped:
                _train(run, corpus, model, state)
            if not info.is_main:
                return PretrainResult(None, None, {}, {}, state.history)
            return store_result(run, corpus, tokenizer, state, time.time() - t_start)
        finally:
            if claim is not None:
                if not run.stage.exists():  # the run is stored and its staging folder gone: so is its lock
                    claim.path.unlink(missing_ok=True)
                claim.release()


def _claim_stage(run: RunSetup) -> FileLock | None:
    """Rank 0 claims the staging folder `run-<key>` with its lock file, as a feature cache is claimed:
    a second run with the same settings, or a prune, cannot touch it while this run lives. A folder
    another live run holds stops every rank with one line, before anything is read or written."""
    lock = None
    if run.info.is_main:
        lock = run.zoo.claim(run.stage.name)
        if not lock.acquire(blocking=False):
            lock = None
    held = dist.all_gather_objects(run.info, lock is not None or not run.info.is_main)
    if not all(held):
        if lock is not None:
            lock.release()
        raise St2siError(
            f"another pretrain with the same settings is running (it holds {run.stage}.lock): "
            "wait for it to end; its result is then in the zoo, or rerun with --resume"
        )
    return lock


def _setup(
    zoo: Zoo, domains: list[str], backbone: str, text: TextConfig, cfg: PretrainConfig, info: dist.DistInfo
) -> RunSetup:
    """The run's inputs (rank 0 builds a missing known backbone; the others wait, then read it)."""
    from st2si_cli.backbones.pull import ensure_backbone

    if info.is_main:
        ensure_backbone(zoo, backbone)
    dist.barrier(info)
    source = zoo.get(backbone, kind="backbone")
    datasets = [zoo.get(d, kind="dataset") for d in domains]
    zoo.hold(source, *datasets)  # `zoo rm` refuses them while this run lives
    return RunSetup(
        zoo=zoo,
        backbone=source,
        datasets=datasets,
        text=text,
        cfg=cfg,
        info=info,
        precision=dist.resolve_precision(cfg.precision, info.device),
    )


def _deepspeed_config(run: RunSetup) -> dict[str, Any]:
    cfg = run.cfg
    return dist.deepspeed_config(
        run.deepspeed,
        micro_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        world_size=run.info.world_size,
        max_grad_norm=cfg.max_grad_norm,
        precision=run.precision,
    )


def _open_state(run: RunSetup, resume: bool, restart: bool) -> RunState:
    """The staged run's state to resume, or a fresh one (an old checkpoint needs --resume or --restart)."""
    info, stage = run.info, run.stage
    if info.is_main:
        run.zoo.staging_dir(stage.name)
    dist.barrier(info)
    state = RunState.read(stage)
    if state is not None and not resume:
        if not restart:
            raise St2siError(
                f"an interrupted run with these settings has a checkpoint (epoch {state.epoch}, step {state.step}): "
                "add --resume to continue it, or --restart to start over"
            )
        state = None
    dist.barrier(info)  # everyone has read the state before rank 0 may clear it
    if state is None:
        if info.is_main:
            for old in [stage / "checkpoints", *stage.glob("best-*"), stage / "state.json"]:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        state = RunState(key=run.key, world_size=info.world_size)
    elif resume:
        run.reporter.message(
            f"Resuming run {run.key[:12]} at epoch {state.epoch}, step {state.step}"
            + (" (training done: final evaluation)" if state.stopped else "")
        )
    dist.barrier(info)
    return state


def _train(run: RunSetup, corpus: Corpus, model: torch.nn.Module, state: RunState) -> None:
    """The ST2SI module in its engine, restored from the last checkpoint if any, trained to the end."""
    cfg, info = run.cfg, run.info
    total_steps = steps_per_epoch(corpus, cfg, info.world_size) * cfg.epochs
    torch.manual_seed(cfg.seed)
    if cfg.tune_layers:
        module, data = top_module_and_data(run, corpus, model)
    else:
        module = ST2SI(
            model,
            corpus.n_items,
            pad_id=corpus.pad_id,
            seed=cfg.seed,
            split_by_length=length_split_pays(info.device),
        )
        module.to(info.device)
        data = full_data(run, corpus, corpus.pad_id)
    first = n_layers(model) - cfg.tune_layers if cfg.tune_layers else 0
    if cfg.lora:  # before the checkpoint is loaded: it holds the LoRA weights under peft's names
        add_lora(model, cfg.lora, first)
        module.to(info.device)
    add_dropout(model, cfg.dropout, first)
    if cfg.init_heads:
        load_init_heads(run.zoo, cfg.init_heads, corpus.offsets, run.datasets, module.ilp)
    engine = make_engine(module, run, total_steps)
    totals = new_totals()
    if state.checkpoint is not None:
        engine.load(run.stage / "checkpoints" / state.checkpoint)
        rank_state = load_rank_state(run.stage, state, info)
        set_rng_state(rank_state["rng"])
        totals = {k: rank_state[k] for k in totals}
    train_epochs(engine, run, corpus, state, totals, data)
    del engine, module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


__all__ = ["pretrain"]
