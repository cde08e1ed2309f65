"""What the commands share: the root `--zoo` value, fixed choices (Enums), defaults and option factories.

Command modules import this, `output` and `reporting`, never each other; `app` imports the command
modules and registers them. Nothing heavy is imported here: `st2si --help` builds every option from it.
Each factory returns a fresh `typer.Option`, so one declaration serves several commands. The choices
mirror what the library accepts; commands hand the library `choice.value`, a plain string.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from st2si_cli import DEFAULT_BACKBONE

# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------


# ---- the root `--zoo` option ---------------------------------------------------------------------------
class State:
    zoo_path: Path | None = None


state = State()


def open_zoo(*, create: bool = True):
    """The zoo of `--zoo`. Writing commands (`create=True`) make it where there is none; reading ones
    and the tidying commands create nothing (a missing zoo reads as empty, a read-only one is read)."""
    from st2si_cli.zoo.store import Zoo

    if state.zoo_path is not None and state.zoo_path.exists() and not state.zoo_path.is_dir():
        raise typer.BadParameter(f"{state.zoo_path} is not a folder", param_hint="'--zoo'")
    return Zoo(state.zoo_path, create=create)


def zoo_option_value(value: str | None) -> Path | None:
    """`--zoo ""` is a usage error (it would mean the current folder, silently)."""
    if value is None:
        return None
    if not value.strip():
        raise typer.BadParameter(
            "an empty path; give a folder (use . for the current one)", param_hint="'--zoo'"
        )
    return Path(value)


# ---- fixed choices -------------------------------------------------------------------------------------
class Ties(StrEnum):
    """How a target tied with other items ranks (`st2si_cli.metrics.TIE_RULES`)."""

    pessimistic = "pessimistic"
    optimistic = "optimistic"


class Split(StrEnum):
    valid = "valid"
    test = "test"


class Dtype(StrEnum):
    """Backbone dtypes (`st2si_cli.backbones.load.resolve_dtype`)."""

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
    """Heads `adapt` trains: ILP (random or text init), sequence adapter, or ID-only SASRec."""

    ilp = "ilp"
    ilp_text = "ilp-text"
    adapter = "adapter"
    sasrec = "sasrec"


class Schedule(StrEnum):
    """`HeadConfig.schedule`."""

    constant = "constant"
    cosine = "cosine"


class Sampling(StrEnum):
    """`st2si_cli.pretrain.config.SAMPLINGS`."""

    all = "all"
    crop = "crop"


class Precision(StrEnum):
    """`st2si_cli.pretrain.distributed.processes.PRECISIONS`."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Placement(StrEnum):
    """`st2si_cli.items.PLACEMENTS`: how `items add` gives new items their rows."""

    auto = "auto"
    ridge = "ridge"
    text = "text"
    neighbour = "neighbour"


class CacheDtype(StrEnum):
    """`st2si_cli.pretrain.config.CACHE_DTYPES`."""

    bf16 = "bf16"
    fp32 = "fp32"


# ---- validators (Click callbacks): a bad value is a usage error, before any work ------------------------
MAX_CANDIDATES = 1_000_000  # candidates-N: far beyond any catalog that fits a score matrix
SEED_MAX = 2**32 - 1  # pretrain seeds its epoch shuffles with seed * 1_000_003 + epoch (torch: < 2**64)


def check_protocol(value: str) -> str:
    """`full` or `candidates-N`: kept a string, since N is any count from 2 to MAX_CANDIDATES (the
    catalog's size bounds it further once the dataset is known: `check_candidates`)."""
    prefix, _, n = value.partition("-")
    if value == "full" or (prefix == "candidates" and n.isdigit() and 2 <= int(n) <= MAX_CANDIDATES):
        return value
    if prefix == "candidates" and n.isdigit() and int(n) > MAX_CANDIDATES:
        raise typer.BadParameter(
            f"{value!r}: N is at most {MAX_CANDIDATES:,} (and at most the catalog's size)"
        )
    raise typer.BadParameter(f"{value!r} is not full or candidates-N (N >= 2)")


def check_candidates(zoo: Any, domain: str, protocol: str) -> None:
    """Refuse (usage error) candidates-N with N above the domain's catalog size, before any work."""
    from st2si_cli.zoo.meta import DatasetMeta

    prefix, _, n = protocol.partition("-")
    if prefix != "candidates":
        return
    art = zoo.find(domain, kind="dataset")
    items = DatasetMeta.of(art).catalog.items if art is not None else None
    if items and int(n) > items:
        raise typer.BadParameter(
            f"{protocol!r}: the catalog of {domain} has {items} items, so N is at most {items}",
            param_hint="'--protocol'",
        )


def check_device(value: str) -> str:
    """cpu, cuda, cuda:N or mps (torch device strings), checked before any work, and available here."""
    prefix, colon, n = value.partition(":")
    if not (value in ("cpu", "cuda", "mps") or (prefix == "cuda" and colon and n.isdigit())):
        raise typer.BadParameter(f"{value!r} is not cpu, cuda, cuda:N or mps")
    why = None
    if value != "cpu":  # imports torch: only for a GPU, which the command then uses anyway
        from st2si_cli.backbones.load import device_problem

        why = device_problem(value)
    if why is not None:
        raise typer.BadParameter(why)
    return value


def check_device_or_auto(value: str) -> str:
    return value if value == "auto" else check_device(value)


def check_positive(value: float | None) -> float | None:
    """A finite number above 0 (learning rates): inf and nan are refused too."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number above 0")
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value} is not above 0")
    return value


def check_finite(value: float | None) -> float | None:
    """A finite number (the option's min/max bound it further): inf and nan are refused."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def check_attributes(zoo: Any, domains: list[str], attributes: tuple[str, ...]) -> None:
    """Refuse (usage error) attributes that no item of the domains' catalogs has, before any work."""
    from st2si_cli.adapt import read_dataset

    if not attributes:
        raise typer.BadParameter("no attribute given", param_hint="'--attributes'")
    for domain in domains:
        fields: set[str] = set()
        for item in read_dataset(zoo, domain).items:
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


def seed_option() -> Any:
    return typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Random seed (0 to 2**32-1).")


def json_option(help: str | None = None) -> Any:
    return typer.Option(False, "--json", help=help)


def attribute_list(attributes: str) -> tuple[str, ...]:
    """`--attributes title,brand` -> ("title", "brand")."""
    return tuple(a.strip() for a in attributes.split(",") if a.strip())


def check_new_name(value: str | None) -> str | None:
    """A name for something the command creates (`st2si_cli.names`): a usage error if it cannot be one."""
    from st2si_cli.names import check_name

    if value is None:
        return value
    try:
        return check_name(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
