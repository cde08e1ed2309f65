"""Processes and engines for full tuning: one process, plain torch DDP, or DeepSpeed (ZeRO 0-3).

    launcher env (RANK, WORLD_SIZE, LOCAL_RANK)  ->  DistInfo (rank, world, device, backend)
    ST2SI module + torch AdamW + LR schedule     ->  Engine: micro_step / step / save / load / consolidate

Without launcher variables the run is one process; with WORLD_SIZE > 1 and no `--deepspeed` it is plain
torch DDP (gloo on CPU, nccl on GPU); with `--deepspeed zero0..3` or a JSON config it is DeepSpeed,
given a torch AdamW object (DeepSpeed's own AdamW would JIT-compile FusedAdam for minutes). DeepSpeed
is imported only here and only when asked for, never at module import time.

Gradients are sums over query positions divided by the global step's position count, so 2 ranks with
batch b give the same update as 1 process with batch 2b (see `loss_scale`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.errors import St2siError

ZERO_PRESETS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---- processes --------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # "gloo" / "nccl" while a process group runs
    deepspeed: bool = False
    owned: bool = False  # this code started the process group (and tears it down)
    env_set: list[str] = field(default_factory=list)  # launcher variables set here for a one-process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's / the deepspeed launcher's variables."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_device(device: str, local_rank: int = 0) -> str:
    """'auto' -> cuda:LOCAL_RANK where a GPU is visible, else cpu; 'cuda' -> cuda:LOCAL_RANK."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise St2siError(f"device {device}: no CUDA GPU is visible")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """'auto' -> bf16 on GPUs that have it, else fp16 (with a loss scaler); fp32 on CPU."""
    import torch

    if precision not in PRECISIONS:
        raise St2siError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: str, precision: str) -> Any:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def init_processes(device: str = "auto", use_deepspeed: bool = False) -> DistInfo:
    """Join the launcher's process group (if any). DeepSpeed in one process gets a one-rank group."""
    import torch
    import torch.distributed as dist

    rank, world, local = launch_env()
    env_set: list[str] = []
    if use_deepspeed and world == 1 and "MASTER_PORT" not in os.environ:
        # DeepSpeed wants a process group even for one process; without these it looks for MPI.
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(free_port())}.items():
            if k not in os.environ:
                os.environ[k] = v
                env_set.append(k)
    dev = resolve_device(device, local)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    info = DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, deepspeed=use_deepspeed,
                    env_set=env_set)
    if world == 1 and not use_deepspeed:
        return info
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if use_deepspeed:
        if not dev.startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed = import_deepspeed()
        owned = not dist.is_initialized()
        with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed print()s while building its comm op
            deepspeed.init_distributed(dist_backend=backend, verbose=False)
    else:
        owned = not dist.is_initialized()
        if owned:
            dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    info.backend = backend
    info.owned = owned
    return info


def shutdown(info: DistInfo) -> None:
    """Tear down a process group this code started (so a test process can start another)."""
    import torch.distributed as dist

    if info.owned and dist.is_initialized():
        dist.destroy_process_group()
    if info.deepspeed and info.owned and "deepspeed" in sys.modules:
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb = None  # DeepSpeed's handles on the destroyed group, so a later run can start afresh
        for name, value in _DS_GROUP_DEFAULTS.items():
            setattr(ds_groups, name, dict(value) if isinstance(value, dict) else value)
    info.backend = None
    info.owned = False
    for k in info.env_set:
        os.environ.pop(k, None)
    info.env_set = []


@contextlib.contextmanager
def processes(device: str = "auto", use_deepspeed: bool = False) -> Iterator[DistInfo]:
    info = init_processes(device, use_deepspeed)
    try:
        yield info
    finally:
        shutdown(info)


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.local_rank])
        else:
            dist.barrier()


def all_sum(info: DistInfo, values: list[float]) -> list[float]:
    """Element-wise sum of a few floats over ranks (float64)."""
    import torch
    import torch.distributed as dist

    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


_DS_GROUP_DEFAULTS: dict[str, Any] = {}  # deepspeed.utils.groups' cached groups as first imported


def import_deepspeed() -> Any:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
            import deepspeed.utils.groups as ds_groups
    except ImportError:
        raise St2siError("DeepSpeed training needs the deepspeed package: pip install 'st2si[deepspeed]'") from None
    if not _DS_GROUP_DEFAULTS:
        _DS_GROUP_DEFAULTS.update({k: (dict(v) if isinstance(v, dict) else v) for k, v in vars(ds_groups).items()
                                   if not k.startswith("__") and (v is None or isinstance(v, dict))})
    import logging
    import warnings

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated")
    return deepspeed


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ---- DeepSpeed configuration ------------------------------------------------------------------------


def deepspeed_config(
    spec: str,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float,
    precision: str,
) -> dict[str, Any]:
    """A DeepSpeed config from a preset (zero0..zero3) or a JSON file, filled from the training settings.

    Batch sizes, clipping and precision come from the arguments; a JSON file may leave them out or
    set them to "auto", and must agree with them where it sets them.
    """
    if spec in ZERO_PRESETS:
        cfg: dict[str, Any] = {"zero_optimization": {"stage": ZERO_PRESETS[spec]}}
    else:
        path = Path(spec)
        if not path.is_file():
            raise St2siError(f"DeepSpeed config {spec!r}: not one of {', '.join(ZERO_PRESETS)} nor a JSON file")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise St2siError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    wanted: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for k, v in wanted.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
        elif cfg[k] != v:
            raise St2siError(f"DeepSpeed config sets {k}={cfg[k]}, but the training settings give {v}")
    for section, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        sub = cfg.setdefault(section, {})
        if sub.get("enabled", "auto") == "auto":
            sub["enabled"] = on
        elif bool(sub["enabled"]) != on:
            raise St2siError(f"DeepSpeed config has {section}.enabled={sub['enabled']}, but precision is {precision}")
    cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if "optimizer" in cfg and not _cuda():
        # DeepSpeed's Adam on CPU would compile FusedAdam/CPUAdam for minutes: use torch's.
        cfg["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def zero_stage(cfg: dict[str, Any] | None) -> int:
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0)) if cfg else -1


# ---- engines -------------------------------------------------------------------------------------------


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
    def train(self) -> None: self.module.train()
    def eval(self) -> None: self.module.eval()
    def save(self, folder: Path, info: DistInfo) -> None: ...
    def load(self, folder: Path) -> None: ...
    def consolidated_state_dict(self, checkpoint: Path | None) -> dict[str, Any] | None: ...

    def gathered(self, params: list[Any]) -> Any:
        return contextlib.nullcontext()


def _cpu_fp32(sd: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().to("cpu", copy=True).float() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in sd.items()}


def _write_safetensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def torch_save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PlainEngine(Engine):
    """One process or torch DDP; torch AdamW, LambdaLR, optional autocast and GradScaler (fp16)."""

    def __init__(self, module: Any, optimizer: Any, scheduler: Any, info: DistInfo, precision: str,
                 max_grad_norm: float):
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
        _write_safetensors(_cpu_fp32(self.module.state_dict()), folder / "model.safetensors")
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None}
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


__all__ = [
    "DistInfo",
    "Engine",
    "DeepSpeedEngine",
    "PlainEngine",
    "ZERO_PRESETS",
    "all_gather_objects",
    "all_sum",
    "autocast",
    "barrier",
    "deepspeed_config",
    "free_port",
    "init_processes",
    "launch_env",
    "loss_scale",
    "processes",
    "resolve_device",
    "resolve_precision",
    "shutdown",
    "torch_save_atomic",
]
