"""The command that makes a head again, from what its record says (the report's "Reproduce" section)."""

from __future__ import annotations

import shlex
from typing import Any

from st2si_cli.zoo.meta import HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

DTYPE_FLAGS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def name_of(zoo: Zoo, ref: str | None) -> str:
    if not ref:
        return "?"
    art = zoo.find(ref)
    return (art.name or art.short_id) if art is not None else ref[:12]


def _flag(name: str, value: Any) -> list[str]:
    return [name, str(value)]


def reproduce(zoo: Zoo, head: Artifact) -> list[str]:
    """Shell commands that make the head again (with the same settings; a sweep is run again)."""
    from st2si_cli.model.text import TextConfig

    hm = HeadMeta.of(head)
    domain = hm.domain or head.domain or "DOMAIN"
    name = head.name or head.short_id
    lines: list[str] = []
    if hm.catalog.parent_head:  # extended to a grown catalog by `st2si items`
        parent = zoo.find(hm.catalog.parent_head)
        lines += reproduce(zoo, parent) if parent is not None else [f"# head {hm.catalog.parent_head[:12]}"]
        method = hm.catalog.placement.get("method")
        lines.append(
            f"st2si items add --domain {shlex.quote(domain)} NEW-ITEMS.jsonl"
            + (f" --placement {shlex.quote(str(method))}" if method else "")
        )
        return lines
    from st2si_cli.heads.registry import kind_of

    kind = kind_of(head)
    stage = (head.meta.get("recipe") or {}).get("stage")
    if stage:  # a stage of the recipe: the recipe makes it (and reuses it when it is there)
        backbone = hm.backbone_name or name_of(zoo, hm.backbone)
        return [
            shlex.join(["st2si", "adapt", "--domain", domain, "--backbone", backbone])
            + f"   # the recipe; this head is its stage {stage}"
        ]
    special = kind.command(zoo, head, lambda ref: name_of(zoo, ref))
    if special is not None:
        return special
    backbone = hm.backbone_name or name_of(zoo, hm.backbone)
    if hm.method in ("full", "top-layers"):
        run = Inputs.of(head).first("run")
        return [
            shlex.join(["st2si", "pretrain", "--domain", domain])
            + f"   # a tuned backbone{f' (run {run[:12]})' if run else ''}: its settings are in `st2si zoo info`"
        ]
    cmd = ["st2si", "adapt", "--domain", domain, "--backbone", backbone, "--head", kind.name]
    train = dict(hm.train or {})
    library: list[str] = []
    swept: set[str] = set()
    if hm.sweep:  # the grid's settings are the sweep's choice; the others are given as flags
        cmd += ["--sweep", "--sweep-trials", str(len(hm.sweep.get("trials") or []))]
        swept = set(hm.sweep.get("grid") or {}) | {"schedule"}
    defaults = kind.default_config().to_dict()
    flags = {
        "lr": "--lr",
        "weight_decay": "--weight-decay",
        "batch_size": "--batch-size",
        "max_epochs": "--epochs",
        "patience": "--patience",
        "dropout": "--dropout",
        "hidden": "--hidden",
        "schedule": "--schedule",
        "warmup": "--warmup",
        "seed": "--seed",
    }
    for key, value in train.items():
        if key in ("ties", "init") or key in swept or defaults.get(key) == value:
            continue
        if key in flags:
            cmd += _flag(flags[key], value)
        elif key == "multi_query" and value is False:
            cmd.append("--no-multi-query")
        elif key == "alignment" and value is False:
            cmd.append("--no-alignment")
        else:
            library.append(f"{key}={value}")
    text = TextConfig.from_dict(hm.text) if hm.text else TextConfig()
    base = TextConfig()
    if text.attributes != base.attributes:
        cmd += ["--attributes", ",".join(text.attributes)]
    if text.max_items != base.max_items:
        cmd += _flag("--max-items", text.max_items)
    if text.max_tokens != base.max_tokens:
        cmd += _flag("--max-tokens", text.max_tokens)
    if text.window_stride != max(1, text.max_items // 2):
        cmd += _flag("--stride", text.window_stride)
    if text.positions != base.positions:
        cmd += ["--positions", text.positions]
    if text.query != base.query:
        cmd += ["--query-token", text.query]
    if not text.clean:
        cmd.append("--no-clean")
    if text.trim_periods:
        cmd.append("--trim-periods")
    if text.max_attr_tokens != base.max_attr_tokens:
        library.append(f"max_attr_tokens={text.max_attr_tokens}")
    if hm.dtype in DTYPE_FLAGS:
        cmd += ["--dtype", DTYPE_FLAGS[hm.dtype]]
    line = shlex.join([*cmd, "--name", name])
    if library:
        line += "   # library settings with no flag: " + ", ".join(library)
    return [line]
