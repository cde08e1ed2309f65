"""Processes and engines for full tuning: one process, plain torch DDP, or DeepSpeed (ZeRO 0-3).

`processes`: the launcher's process group and the collectives; `deepspeed_settings`: DeepSpeed's config;
`engines`: the training backends the loop drives. This face names what the rest of the package uses.
"""

from st2si_cli.pretrain.distributed.deepspeed_settings import ZERO_PRESETS, deepspeed_config, zero_stage
from st2si_cli.pretrain.distributed.engines import (
    DeepSpeedEngine,
    Engine,
    PlainEngine,
    loss_scale,
    torch_save_atomic,
)
from st2si_cli.pretrain.distributed.processes import (
    DistInfo,
    all_gather_objects,
    all_sum,
    autocast,
    barrier,
    free_port,
    init_processes,
    launch_env,
    processes,
    resolve_device,
    resolve_precision,
    shutdown,
)

__all__ = [
    "DeepSpeedEngine",
    "DistInfo",
    "Engine",
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
    "zero_stage",
]
