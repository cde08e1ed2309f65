"""DeepSpeed's configuration: a ZeRO preset or the user's JSON file, filled from the training settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from st2si_cli.errors import St2siError
from st2si_cli.pretrain.distributed.processes import cuda_available

ZERO_PRESETS = {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}


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
            raise St2siError(
                f"DeepSpeed config {spec!r}: not one of {', '.join(ZERO_PRESETS)} nor a JSON file"
            )
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
            raise St2siError(
                f"DeepSpeed config has {section}.enabled={sub['enabled']}, but precision is {precision}"
            )
    cfg.setdefault("zero_optimization", {}).setdefault("stage", 0)
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if "optimizer" in cfg and not cuda_available():
        # DeepSpeed's Adam on CPU would compile FusedAdam/CPUAdam for minutes: use torch's.
        cfg["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    return cfg


def zero_stage(cfg: dict[str, Any] | None) -> int:
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0)) if cfg else -1
