"""What the commands share: the root `--zoo` value, fixed choices (Enums), defaults and option factories.

Command modules import this, `output` and `reporting`, never each other; `app` imports the command
modules and registers them. Nothing heavy is imported here: `st2si --help` builds every option from it.
Each factory returns a fresh `typer.Option`, so one declaration serves several commands. The choices
mirror what the library accepts; commands hand the library `choice.value`, a plain string.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from st2si_cli import DEFAULT_BACKBONE


# ---- the root `--zoo` option ---------------------------------------------------------------------------
class State:
    zoo_path: Path | None = None


state = State()


def open_zoo():
    from st2si_cli.zoo.store import Zoo

    if state.zoo_path is not None and state.zoo_path.exists() and not state.zoo_path.is_dir():
        raise typer.BadParameter(f"{state.zoo_path} is not a folder", param_hint="'--zoo'")
    return Zoo(state.zoo_path)


# ---- fixed choices -------------------------------------------------------------------------------------
class Ties(StrEnum):
    """How a target tied with other items ranks (`st2si_cli.metrics.TIE_RULES`)."""

    pessimistic = "pessimistic"
    optimistic = "optimistic"


class Split(StrEnum):
    valid = "valid"
    test = "test"


class Dtype(StrEnum):
    """Backbone dtypes (`st2si_cli.backbones.resolve_dtype`)."""

    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class QueryToken(StrEnum):
    """`TextConfig.query`: the tokenizer's '.' or an added [Q] token."""

    dot = "dot"
    new = "new"


class Positions(StrEnum):
    """`TextConfig.positions`."""

    all = "all"
    newest = "newest"


class HeadKind(StrEnum):
    """Heads `adapt` trains: ILP (random or text init) or sequence adapter."""

    ilp = "ilp"
    ilp_text = "ilp-text"
    adapter = "adapter"


class Schedule(StrEnum):
    """`HeadConfig.schedule`."""

    constant = "constant"
    cosine = "cosine"


class Sampling(StrEnum):
    """`st2si_cli.train.config.SAMPLINGS`."""

    all = "all"
    crop = "crop"


class Precision(StrEnum):
    """`st2si_cli.train.distributed.processes.PRECISIONS`."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


def check_protocol(value: str) -> str:
    """`full` or `candidates-N`: kept a string, since N is any count of at least 2."""
    prefix, _, n = value.partition("-")
    if value == "full" or (prefix == "candidates" and n.isdigit() and int(n) >= 2):
        return value
    raise typer.BadParameter(f"{value!r} is not full or candidates-N (N >= 2)")


def check_device(value: str) -> str:
    """cpu, cuda, cuda:N or mps (torch device strings), checked before any work."""
    prefix, colon, n = value.partition(":")
    if value in ("cpu", "cuda", "mps") or (prefix == "cuda" and colon and n.isdigit()):
        return value
    raise typer.BadParameter(f"{value!r} is not cpu, cuda, cuda:N or mps")


def check_device_or_auto(value: str) -> str:
    return value if value == "auto" else check_device(value)


def check_positive(value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


def check_attributes(zoo: Any, domains: list[str], attributes: tuple[str, ...]) -> None:
    """Refuse (usage error) attributes that no item of the domains' catalogs has, before any work."""
    from st2si_cli.data.prepare import load_dataset

    if not attributes:
        raise typer.BadParameter("no attribute given", param_hint="'--attributes'")
    for domain in domains:
        fields: set[str] = set()
        for item in load_dataset(zoo, domain).items:
            fields.update(k for k, v in item.items() if k != "id" and v not in (None, ""))
        unknown = [a for a in attributes if a not in fields]
        if unknown:
            raise typer.BadParameter(
                f"{', '.join(unknown)} not in the catalog of {domain} (it has: {', '.join(sorted(fields))})",
                param_hint="'--attributes'",
            )


# ---- options that several commands declare -------------------------------------------------------------
def backbone_option(help: str) -> Any:
    return typer.Option(DEFAULT_BACKBONE, "--backbone", help=help)


def head_ref_option() -> Any:
    return typer.Option(None, "--head", help="Head name or ID (default: the domain's newest).")


def dtype_option(help: str | None = None) -> Any:
    return typer.Option(Dtype.auto, "--dtype", help=help)


def device_option(default: str = "cpu", help: str | None = None) -> Any:
    check = check_device_or_auto if default == "auto" else check_device
    return typer.Option(default, "--device", callback=check, help=help or "cpu, cuda, cuda:N or mps.")


def query_token_option(help: str = "dot: the tokenizer's '.'; new: an added [Q] token.") -> Any:
    return typer.Option(QueryToken.dot, "--query-token", help=help)


def attributes_option(help: str) -> Any:
    return typer.Option("title", "--attributes", help=help)


def no_multi_query_option(help: str) -> Any:
    return typer.Option(False, "--no-multi-query", help=help)


def no_alignment_option() -> Any:
    return typer.Option(False, "--no-alignment", help="Leave out the ID-alignment samples.")


def no_clean_option() -> Any:
    return typer.Option(False, "--no-clean", help="Keep HTML entities and whitespace as in the data.")


def json_option(help: str | None = None) -> Any:
    return typer.Option(False, "--json", help=help)


def attribute_list(attributes: str) -> tuple[str, ...]:
    """`--attributes title,brand` -> ("title", "brand")."""
    return tuple(a.strip() for a in attributes.split(",") if a.strip())
