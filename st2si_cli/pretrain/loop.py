"""The full-tuning loop: optimizer and LR schedule, global steps split over ranks and micro-steps,
validation and early stopping, checkpoints.

Validation points: each epoch end; every `valid_every` optimizer steps within an epoch when set; and,
when the ILP starts from trained heads (`init_heads`), the starting weights before the first step, so a
run that never beats where it started keeps the start. Early stopping counts validation points, and
the best point's weights are the result."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.st2si import ST2SI
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.checkpoint import RunState, save_checkpoint
from st2si_cli.pretrain.config import RunSetup
from st2si_cli.pretrain.corpus import (
    Corpus,
    epoch_order,
    epoch_samples,
    split_even,
    steps_per_epoch,
    valid_view,
)
from st2si_cli.pretrain.evaluation import validate
from st2si_cli.pretrain.tuning import param_groups
from st2si_cli.train.early_stopping import exhausted, observe


def learning_rate_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR: linear warm-up, then cosine to 0 at `total_steps`.

    Warm-up is clipped to a tenth of the run, so a short run still spends most of its steps decaying.
    """
    warmup = min(warmup_steps, total_steps // 10)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


@dataclass
class TrainData:
    """What the loop trains and validates on: each epoch's samples, the engine's input for a few of them,
    the validation samples and, where they do not come from the module's forward, their features."""

    samples: Callable[[int], list[Sample]]  # epoch -> that epoch's training samples
    batch: Callable[[list[Sample], list[int]], tuple[Any, ...]]  # (samples, indices) -> the module's input
    valid: list[Sample]
    valid_features: Callable[[Sequence[int]], torch.Tensor] | None = None  # indices into valid -> [P, d]


def full_data(run: RunSetup, corpus: Corpus, pad_id: int) -> TrainData:
    """Full tuning's data: samples collated into token batches, validation through the whole module."""

    def batch(samples: list[Sample], ids: list[int]) -> tuple[Any, ...]:
        return collate([samples[i] for i in ids], pad_id, run.info.device)

    return TrainData(
        samples=lambda epoch: epoch_samples(corpus, run.cfg, epoch),
        batch=batch,
        valid=[v for s in corpus.eval_samples if (v := valid_view(s)) is not None],
    )


def make_engine(module: ST2SI, run: RunSetup, total_steps: int) -> dist.Engine:
    """Torch AdamW (over the trainable parameters) and the warm-up + cosine schedule, in the run's engine."""
    cfg = run.cfg
    schedule = learning_rate_schedule(total_steps, cfg.warmup_steps)
    groups = param_groups(module, cfg.lr, cfg.head_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if run.ds_config is not None:
        return dist.DeepSpeedEngine(module, optimizer, schedule, run.info, run.ds_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return dist.PlainEngine(module, optimizer, scheduler, run.info, run.precision, cfg.max_grad_norm)


def new_totals() -> dict[str, Any]:
    """This rank's sums over the epoch so far (saved with each checkpoint, so a resumed epoch keeps them)."""
    return {"loss_sum": 0.0, "loss_count": 0, "tokens": 0}


def train_epochs(
    engine: dist.Engine,
    run: RunSetup,
    corpus: Corpus,
    state: RunState,
    totals: dict[str, Any],
    data: TrainData,
) -> None:
    """Epochs from `state` on until early stopping or the last epoch; a checkpoint after each."""
    steps = steps_per_epoch(corpus, run.cfg, run.info.world_size)
    per_step = run.cfg.batch_size * run.cfg.grad_accum * run.info.world_size
    run.reporter.training_start(steps, run.cfg.epochs)
    if state.step:
        run.reporter.training_step(state.step)  # a resumed epoch's bar starts where it stopped
    points = _Points(engine, run, state, totals, data)
    if run.cfg.init_heads and state.global_step == 0 and not state.history:
        points.start()
    engine.train()
    while not state.stopped:
        epoch = state.epoch
        e0 = mark = time.time()
        valid_in_epoch = 0.0
        samples = data.samples(epoch)
        order = epoch_order(len(samples), run.cfg.seed, epoch)
        for k in range(state.step, steps):
            loss = _global_step(
                engine, run, (samples, data.batch), order[k * per_step : (k + 1) * per_step], totals
            )
            state.step = k + 1
            state.global_step += 1
            run.reporter.training_step(1)
            every = run.cfg.valid_every
            if every and state.global_step % every == 0 and state.step < steps:
                state.seconds["train"] += time.time() - mark
                valid_in_epoch += points.within_epoch()
                mark = time.time()
            elif run.cfg.save_every and state.global_step % run.cfg.save_every == 0 and state.step < steps:
                state.seconds["train"] += time.time() - mark
                mark = time.time()
                save_checkpoint(run.stage, engine, state, run.info, totals, improved=False)
            if run.on_step is not None:
                run.on_step(
                    {
                        "epoch": epoch,
                        "step": state.step,
                        "global_step": state.global_step,
                        "loss": loss,
                        "lr": engine.lr(),
                        "module": engine.module,
                    }
                )
            if state.stopped:  # early stopping at a validation point within the epoch
                break
        if state.stopped:
            break
        state.seconds["train"] += time.time() - mark
        points.epoch_end(time.time() - e0 - valid_in_epoch)


def _global_step(
    engine: dist.Engine,
    run: RunSetup,
    source: tuple[list[Sample], Callable[[list[Sample], list[int]], tuple[Any, ...]]],
    batch: list[int],
    totals: dict[str, Any],
) -> float:
    """One optimizer step: its global batch (sample indices) split into a disjoint slice per (micro-step, rank)."""
    cfg, info = run.cfg, run.info
    samples, make_batch = source
    parts = info.world_size * cfg.grad_accum
    n_global = sum(len(samples[i].targets) for i in batch)
    chunks = split_even(batch, parts)
    scale = dist.loss_scale(n_global, info, cfg.grad_accum, engine.deepspeed)
    loss = 0.0
    for m in range(cfg.grad_accum):
        mine = chunks[m * info.world_size + info.rank]
        real = bool(mine)
        mine = mine or batch[:1]  # an empty slice still joins the collective, with zero weight
        tensors = make_batch(samples, mine)
        n_local = sum(len(samples[i].targets) for i in mine)
        loss = engine.micro_step(tensors, scale * n_local if real else 0.0, boundary=m == cfg.grad_accum - 1)
        if real:
            totals["loss_sum"] += loss * n_local
            totals["loss_count"] += n_local
            totals["tokens"] += sum(len(samples[i].tokens) for i in mine)
    engine.step()
    return loss


@dataclass
class _Points:
    """Validation points of one run: each validates, updates the best point and early stopping, and is
    kept (history record, checkpoint with the best weights if improved, report)."""

    engine: dist.Engine
    run: RunSetup
    state: RunState
    totals: dict[str, Any]  # this rank's sums over the epoch so far
    data: TrainData

    def _validate(self) -> tuple[dict[str, Any], bool, float]:
        """(the point's record, whether it is the best so far, validation seconds)."""
        engine, run, state, totals = self.engine, self.run, self.state, self.totals
        loss_sum, loss_count, tokens = dist.all_sum(
            run.info, [totals["loss_sum"], totals["loss_count"], totals["tokens"]]
        )
        v0 = time.time()
        valid = validate(engine, run, self.data.valid, self.data.valid_features)
        seconds = time.time() - v0
        state.seconds["valid"] += seconds
        improved = observe(state, valid, state.epoch)
        if improved:
            state.best_step = state.global_step
        record = {
            "epoch": state.epoch,
            "step": state.step,  # optimizer steps done within the epoch
            "loss": loss_sum / loss_count if loss_count else None,  # the epoch's training loss so far
            "steps": state.global_step,
            "lr": engine.lr(),
            "tokens": int(tokens),
            **{f"valid_{k}": v for k, v in valid.items() if k != "n_users"},
            "valid_seconds": round(seconds, 3),
        }
        return record, improved, seconds

    def _keep(self, record: dict[str, Any], improved: bool) -> None:
        state = self.state
        state.history.append(record)
        save_checkpoint(self.run.stage, self.engine, state, self.run.info, self.totals, improved=improved)
        self.run.reporter.epoch({**record, "best_epoch": state.best_epoch, "improved": improved})

    def start(self) -> None:
        """The starting weights (trained ILP heads) as point 0 of epoch 0: kept if nothing beats them."""
        self.state.epoch = 0
        record, improved, _ = self._validate()
        self.state.epoch = 1
        record.update(end=False, seconds=record["valid_seconds"])
        self._keep(record, improved)

    def within_epoch(self) -> float:
        """A point every `valid_every` steps: it may stop the run (patience, or the time budget, so that a
        long epoch need not run to its end past --max-minutes); its validation seconds."""
        record, improved, seconds = self._validate()
        record.update(end=False, seconds=record["valid_seconds"])
        self.state.stopped_by = _stop_reason(self.run, self.state, None)
        self.state.stopped = self.state.stopped_by is not None
        self._keep(record, improved)
        self.engine.train()
        return seconds

    def epoch_end(self, train_seconds: float) -> None:
        """The epoch's point: early stopping, the epoch cap or the clock may stop the run."""
        state, epoch = self.state, self.state.epoch
        record, improved, valid_seconds = self._validate()
        record.update(
            end=True,
            train_seconds=round(train_seconds, 3),
            seconds=round(train_seconds + valid_seconds, 3),
        )
        state.epoch, state.step = epoch + 1, 0
        state.stopped_by = _stop_reason(self.run, state, epoch)
        state.stopped = state.stopped_by is not None
        self.totals.update(new_totals())
        self._keep(record, improved)


def epoch_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epoch-end records of a run's history (validation points within epochs left out)."""
    return [r for r in history if r.get("end", True)]


def _stop_reason(run: RunSetup, state: RunState, epoch: int | None) -> str | None:
    """Why training ends at this validation point, or None: after `epoch`, or within an epoch (None),
    where the epoch cap does not apply."""
    if exhausted(state, run.cfg.patience):
        return "patience"
    if epoch is not None and epoch >= run.cfg.epochs:
        return "epochs"
    if _over_time(run, state):
        return "time"
    return None


def _over_time(run: RunSetup, state: RunState) -> bool:
    """Whether training and validation have used up --max-minutes, decided on the summed clocks of all
    ranks, so that every rank stops at the same point."""
    if run.cfg.max_minutes <= 0:
        return False
    spent = state.seconds["train"] + state.seconds["valid"]
    return dist.all_sum(run.info, [float(spent >= run.cfg.max_minutes * 60)])[0] > 0


__all__ = [
    "TrainData",
    "epoch_records",
    "full_data",
    "learning_rate_schedule",
    "make_engine",
    "new_totals",
    "train_epochs",
]
