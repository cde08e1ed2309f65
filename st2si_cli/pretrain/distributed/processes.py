"""Processes for full tuning: one process, torch DDP or DeepSpeed's process group, and the few collectives.

    launcher env (RANK, WORLD_SIZE, LOCAL_RANK)  ->  DistInfo (rank, world, device, backend)

Without launcher variables the run is one process; with WORLD_SIZE > 1 and no `--deepspeed` it is plain
torch DDP (gloo on CPU, nccl on GPU); with DeepSpeed, DeepSpeed's own process group (a one-rank group
for one process). DeepSpeed is imported only here and only when asked for, never at module import time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from st2si_cli.errors import St2siError
from st2si_cli.pretrain.distributed.op_lock import check_deepspeed_op_locks, stderr_line

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
        for k, v in {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            if k not in os.environ:
                os.environ[k] = v
                env_set.append(k)
    dev = resolve_device(device, local)
    if dev.startswith("cuda"):
        torch.cuda.set_device(torch.device(dev))
    info = DistInfo(
        rank=rank, world_size=world, local_rank=local, device=dev, deepspeed=use_deepspeed, env_set=env_set
    )
    if world == 1 and not use_deepspeed:
        return info
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if use_deepspeed:
        if not dev.startswith("cuda"):
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        try:
            deepspeed = import_deepspeed()
            # DeepSpeed may JIT-build an op here, behind a lock file it waits on forever if a killed
            # build left it: look at the lock first (a line on stderr, a bounded wait, a clear error).
            check_deepspeed_op_locks(notify=stderr_line if local == 0 else None)
        except BaseException:
            _restore_env(env_set)
            raise
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
    _restore_env(info.env_set)
    info.env_set = []


def _restore_env(names: list[str]) -> None:
    """Drop the launcher variables set here for a one-process group, so a later run starts afresh."""
    for k in names:
        os.environ.pop(k, None)


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
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not cuda_available() else "cuda")
    try:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed
            import deepspeed.utils.groups as ds_groups
    except ImportError:
        raise St2siError(
            "DeepSpeed training needs the deepspeed package: pip install 'st2si[deepspeed]'"
        ) from None
    if not _DS_GROUP_DEFAULTS:
        _DS_GROUP_DEFAULTS.update(
            {
                k: (dict(v) if isinstance(v, dict) else v)
                for k, v in vars(ds_groups).items()
                if not k.startswith("__") and (v is None or isinstance(v, dict))
            }
        )
    import logging
    import warnings

    deepspeed.utils.logger.setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated")
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated")
    return deepspeed


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
