"""Checkpoints and run state: where a run is (`state.json`), each rank's RNG and loss sums, the best weights.

A checkpoint folder holds the engine's state (its own layout) and one `rank-<r>.pt` per rank; `state.json`
names the last complete one and is replaced atomically, so a kill at any point resumes from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from st2si_cli.pretrain import distributed as dist
from st2si_cli.zoo.artifact import write_safetensors_atomic


@dataclass
class RunState:
    """Where a run is; `state.json` in the staging folder, replaced atomically after each checkpoint."""

    key: str
    epoch: int = 1  # the epoch to run next (or in progress)
    step: int = 0  # optimizer steps already done within it
    global_step: int = 0
    stopped: bool = False  # training is over: only the final evaluation and storing remain
    stopped_by: str | None = (
        None  # why: "patience" (early stopping), "epochs" (the last epoch) or "time" (--max-minutes)
    )
    checkpoint: str | None = None  # folder under checkpoints/ holding the state at (epoch, step)
    best: dict[str, float] | None = None
    best_epoch: int = 0  # the epoch of the best validation point (0: the starting weights)
    best_step: int = 0  # its global step
    since_best: int = 0  # validation points since the best one
    best_file: str | None = None  # best-<global step>.safetensors: the best point's consolidated weights
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "valid": 0.0})
    world_size: int = 1

    def write(self, stage: Path) -> None:
        tmp = stage / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, stage / "state.json")

    @classmethod
    def read(cls, stage: Path) -> RunState | None:
        path = stage / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(
    stage: Path,
    engine: dist.Engine,
    state: RunState,
    info: dist.DistInfo,
    rank_extra: dict[str, Any],
    improved: bool,
) -> None:
    """All ranks: engine state, each rank's RNG and loss sums, the best weights if improved; then the pointer."""
    tag = f"step-{state.global_step:08d}"
    folder = stage / "checkpoints" / tag
    if info.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed attempt
        folder.mkdir(parents=True)
    dist.barrier(info)
    engine.save(folder, info)
    dist.torch_save_atomic({"rng": rng_state(), **rank_extra}, folder / f"rank-{info.rank}.pt")
    if improved:
        best = f"best-{state.best_step:08d}.safetensors"
        sd = engine.consolidated_state_dict(folder)
        if info.is_main:
            write_safetensors_atomic(sd, stage / best)
        state.best_file = best
    dist.barrier(info)
    state.checkpoint = tag
    if info.is_main:
        state.write(stage)
        for old in (stage / "checkpoints").iterdir():
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        for old in stage.glob("best-*.safetensors"):
            if old.name != state.best_file:
                old.unlink(missing_ok=True)
    dist.barrier(info)


def load_rank_state(stage: Path, state: RunState, info: dist.DistInfo) -> dict[str, Any]:
    folder = stage / "checkpoints" / state.checkpoint
    path = folder / f"rank-{info.rank}.pt"
    return torch.load(path, weights_only=True)
