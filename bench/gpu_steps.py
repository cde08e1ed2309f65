"""The steps of `bench/gpu_real.py` read from `--steps`: which exist, the pretrain variants' names
(`BASE+MOD+...`, see gpu_real's module text), their checks before anything runs, and the seconds the
steps after one need at least."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

STEPS = ("full", "quality", "ilp", "trim", "attrs", "top2")
ADAPT_STEPS = ("ilp", "trim", "attrs")
# Seconds a step needs at least, besides its training budget (loading, feature pass, final evaluation).
OVERHEAD = {"ilp": 60, "full": 90, "trim": 60, "attrs": 60, "quality": 60}
TOP_OVERHEAD = 90
# A variant's seconds besides its --max-minutes: start, loading, the final evaluation and storing (30-45 s
# around SmolLM2-135M's full tuning on amazon-scientific on an H200), and part of the overshoot past it.
VARIANT_OVERHEAD = 60
# The `quality` step's seconds per tuned backbone: loading it and one feature pass (13.5 s on an H200).
QUALITY_PER_BACKBONE = 20

_BASE = re.compile(r"(full)|top(\d+)|lora(\d+)")
_MOD = re.compile(r"(dropout|lora|headlr|lr)(.+)|(init)")
VARIANT_SYNTAX = (
    "BASE[+MOD...]: BASE is full, topK or loraR; MOD is dropoutP, loraR, headlrX, lrX or init "
    "(e.g. full+dropout0.1+init, lora8+init, full+headlr1e-3)"
)


@dataclass(frozen=True)
class Variant:
    """A `pretrain` step, read from its name (`full`, `topK`, or `BASE+MOD+...`: see the module doc)."""

    step: str
    tune_layers: int = 0  # 0: every layer
    lora: int = 0
    dropout: float = 0.0
    head_lr: float | None = None
    lr: float | None = None  # None: the script's --lr
    init: bool = False  # start the ILP from the `ilp` step's head

    @property
    def plain(self) -> bool:
        """`full` or `topK` as they always were: their time is --full-share / --top-share of what is left."""
        return re.fullmatch(r"full|top\d+", self.step) is not None

    @property
    def name(self) -> str:
        """The backbone (and head) it stores: gpu-full, gpu-top2, gpu-full-dropout0.1-init, ..."""
        return "gpu-" + self.step.replace("+", "-")

    def record(self, init_head: str | None) -> dict[str, Any]:
        return {
            "tune_layers": self.tune_layers,
            "lora": self.lora,
            "dropout": self.dropout,
            "head_lr": self.head_lr,
            "lr": self.lr,
            "init_head": init_head,
        }


def _number(step: str, key: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"step {step!r}: {key}{text} is not {key} followed by a number") from None
    if not math.isfinite(value) or value <= 0 or (key == "dropout" and value > 0.9):
        top = "at most 0.9" if key == "dropout" else "finite"
        raise ValueError(f"step {step!r}: {key} {text} is out of range (above 0, {top})")
    return value


def parse_variant(step: str) -> Variant | None:
    """The pretrain variant a step names, None for a step that is no pretrain (ilp, quality, ...);
    ValueError for a pretrain step it cannot read."""
    base, *mods = step.split("+")
    m = _BASE.fullmatch(base)
    if m is None:
        if mods:
            raise ValueError(
                f"step {step!r}: {base!r} is not full, topK or loraR; a variant is {VARIANT_SYNTAX}"
            )
        return None
    opts: dict[str, Any] = {"tune_layers": int(m[2]) if m[2] else 0, "lora": int(m[3]) if m[3] else 0}
    if (m[2] and opts["tune_layers"] < 1) or (m[3] and opts["lora"] < 1):
        raise ValueError(f"step {step!r}: {base} needs a number from 1")
    seen = {"lora"} if m[3] else set()
    for mod in mods:
        mm = _MOD.fullmatch(mod)
        if mm is None:
            raise ValueError(f"step {step!r}: unknown modifier {mod!r}; a variant is {VARIANT_SYNTAX}")
        key = mm[1] or mm[3]
        if key in seen:
            raise ValueError(f"step {step!r}: {key} is given twice")
        seen.add(key)
        if key == "init":
            opts["init"] = True
        elif key == "lora":
            opts["lora"] = int(_number(step, key, mm[2], int))
        else:
            opts[{"dropout": "dropout", "headlr": "head_lr", "lr": "lr"}[key]] = _number(
                step, key, mm[2], float
            )
    return Variant(step, **opts)


def plan_steps(text: str) -> list[str]:
    """The steps of --steps, checked before anything runs: each known, none twice, `+init` after `ilp`."""
    steps = [s.strip() for s in text.split(",") if s.strip()]
    for i, step in enumerate(steps):
        if steps.index(step) != i:
            raise ValueError(f"step {step!r} is given twice (its runs would share one name)")
        variant = parse_variant(step)
        if variant is None and step not in (*ADAPT_STEPS, "quality"):
            raise ValueError(
                f"unknown step {step!r}: the steps are full, topK, ilp, trim, attrs, quality and the "
                f"pretrain variants {VARIANT_SYNTAX}"
            )
        if variant is not None and variant.init and "ilp" not in steps[:i]:
            raise ValueError(f"step {step!r} starts from the ilp step's head: put ilp before it")
    return steps


def reserved_after(steps: list[str], index: int) -> float:
    """Seconds the steps after steps[index] other than pretrain need at least: the ILP steps' and
    `quality`'s minimum, and for `quality` one feature pass per tuned backbone before it."""
    seconds = 0.0
    for j in range(index + 1, len(steps)):
        if steps[j] in ADAPT_STEPS:
            seconds += OVERHEAD[steps[j]]
        elif steps[j] == "quality":
            tuned = sum(parse_variant(s) is not None for s in steps[:j])
            seconds += OVERHEAD["quality"] + QUALITY_PER_BACKBONE * tuned
    return seconds
