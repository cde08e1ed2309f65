"""Engines: what the training loop drives, the same for one process, torch DDP and DeepSpeed (ZeRO 0-3).

    ST2SI module + torch AdamW + LR schedule  ->  Engine: micro_step / step / save / load / consolidate

DeepSpeed gets a torch AdamW object (DeepSpeed's own AdamW would JIT-compile FusedAdam for minutes).
Gradients are sums over query positions divided by the global step's position count, so 2 ranks with
batch b give the same update as 1 process with batch 2b (see `loss_scale`).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path
from typing import Any

from st2si_cli.errors import St2siError
from st2si_cli.pretrain.distributed.deepspeed_settings import zero_stage
from st2si_cli.pretrain.distributed.processes import DistInfo, autocast, import_deepspeed
from st2si_cli.zoo.artifact import write_safetensors_atomic


def loss_scale(n_global: int, info: DistInfo, grad_accum: int, deepspeed: bool) -> float:
    """Factor turning a micro-batch's summed loss into its share of the global step's mean.

    DDP and DeepSpeed average gradients over ranks (so multiply by world size); DeepSpeed also divides
    each micro-batch's loss by the accumulation steps (so multiply those back).
    """
    return info.world_size * (grad_accum if deepspeed else 1) / max(n_global, 1)


class Engine:
    """What the loop needs from a training backend."""

    module: Any  # the unwrapped ST2SI module
    deepspeed: bool = False
    zero_stage: int = -1

    def micro_step(self, batch: tuple[Any, ...], scale: float, boundary: bool) -> float: ...
    def step(self) -> None: ...
    def lr(self) -> float: ...
    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def save(self, folder: Path, info: DistInfo) -> None: ...
    def load(self, folder: Path) -> None: ...
    def consolidated_state_dict(self, checkpoint: Path | None) -> dict[str, Any] | None: ...

    def gathered(self, params: list[Any]) -> Any:
        return contextlib.nullcontext()


def _cpu_fp32(sd: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.detach().to("cpu", copy=True).float() if v.is_floating_point() else v.detach().cpu().clone()
        for k, v in sd.items()
    }


def torch_save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PlainEngine(Engine):
    """One process or torch DDP; torch AdamW, LambdaLR, optional autocast and GradScaler (fp16)."""

    def __init__(
        self,
        module: Any,
        optimizer: Any,
        scheduler: Any,
        info: DistInfo,
        precision: str,
        max_grad_norm: float,
    ):
        import torch

        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.info = info
        self.precision = precision
        self.max_grad_norm = max_grad_norm
        self.scaler = torch.amp.GradScaler(info.device.split(":")[0]) if precision == "fp16" else None
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [torch.device(info.device).index] if info.device.startswith("cuda") else None
            self.wrapped = DDP(module, device_ids=ids)
        else:
            self.wrapped = module

    def micro_step(self, batch: tuple[Any, ...], scale: float, boundary: bool) -> float:
        sync = boundary or not self.info.distributed
        ctx = contextlib.nullcontext() if sync else self.wrapped.no_sync()
        with ctx:
            with autocast(self.info.device, self.precision):
                _, loss = self.wrapped(*batch)
            scaled = loss * scale
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return float(loss.detach())

    def step(self) -> None:
        import torch

        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
        skipped = False
        if self.scaler is not None:
            before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < before  # inf/NaN gradients: no update (as DeepSpeed does)
        else:
            self.optimizer.step()
        if not skipped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, folder: Path, info: DistInfo) -> None:
        """Rank 0 writes the model (safetensors) and optimizer/scheduler/scaler state (torch.save)."""
        if not info.is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors_atomic(_cpu_fp32(self.module.state_dict()), folder / "model.safetensors")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }
        torch_save_atomic(state, folder / "trainer.pt")

    def load(self, folder: Path) -> None:
        import torch
        from safetensors.torch import load_file

        sd = load_file(str(folder / "model.safetensors"))
        with torch.no_grad():
            self.module.load_state_dict({k: v.to(self.info.device) for k, v in sd.items()})
        state = torch.load(folder / "trainer.pt", map_location=self.info.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def consolidated_state_dict(self, checkpoint: Path | None = None) -> dict[str, Any] | None:
        return _cpu_fp32(self.module.state_dict()) if self.info.is_main else None


class DeepSpeedEngine(Engine):
    """A DeepSpeed engine around the module; checkpoints in DeepSpeed's own layout (ZeRO shards per rank)."""

    deepspeed = True

    def __init__(self, module: Any, optimizer: Any, schedule: Any, info: DistInfo, config: dict[str, Any]):
        deepspeed = import_deepspeed()
        import torch

        self.info = info
        self.config = config
        self.zero_stage = zero_stage(config)
        if self.zero_stage == 3:
            # The ILP weight is used by the top module's forward (chunked CE), not through ilp.forward.
            deepspeed.zero.register_external_parameter(module, module.ilp.weight)
            module.split_by_length = False  # ZeRO-3 gathers weights per forward: same count on every rank
        kwargs: dict[str, Any] = {"model": module, "config": config, "dist_init_required": False}
        if "optimizer" in config:  # the user's JSON names DeepSpeed's optimizer
            kwargs["model_parameters"] = [p for p in module.parameters() if p.requires_grad]
        else:
            kwargs["optimizer"] = optimizer
        if "scheduler" not in config:
            kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        with contextlib.redirect_stdout(sys.stderr):
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(**kwargs)
        self.module = self.engine.module

    def micro_step(self, batch: tuple[Any, ...], scale: float, boundary: bool) -> float:
        _, loss = self.engine(*batch)
        self.engine.backward(loss * scale)
        self.engine.step()  # steps the optimizer and scheduler only at accumulation boundaries
        return float(loss.detach())

    def step(self) -> None:
        pass  # done by engine.step() on the boundary micro-step

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def train(self) -> None:
        self.engine.train()

    def eval(self) -> None:
        self.engine.eval()

    def gathered(self, params: list[Any]) -> Any:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def save(self, folder: Path, info: DistInfo) -> None:
        """Every rank writes its part (collective)."""
        with contextlib.redirect_stdout(sys.stderr):
            self.engine.save_checkpoint(str(folder.parent), tag=folder.name, save_latest=False)

    def load(self, folder: Path) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            path, _ = self.engine.load_checkpoint(str(folder.parent), tag=folder.name)
        if path is None:
            raise St2siError(f"could not load the DeepSpeed checkpoint {folder}")

    def consolidated_state_dict(self, checkpoint: Path | None) -> dict[str, Any] | None:
        """fp32 weights on rank 0: from the ZeRO shards of `checkpoint` (stages 1-3), else the module."""
        if self.zero_stage >= 1:
            if checkpoint is None:
                raise ValueError("ZeRO weights are consolidated from a checkpoint")
            if not self.info.is_main:
                return None
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
            return _cpu_fp32(sd)
        return _cpu_fp32(self.module.state_dict()) if self.info.is_main else None
