"""Output discipline: results on stdout (human tables or JSON), messages and progress on stderr."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

# Piped output gets a wide console: tables should not wrap names mid-word inside `| less` or a log.
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def safe_text(value: Any) -> str:
    """`value` as text fit for a terminal: control characters (escape sequences, line breaks, bidirectional
    overrides) shown as visible escapes such as `\\x1b`, so that names and titles from data cannot move the
    cursor, recolour or retitle the terminal. Every table cell and message that shows user data goes
    through it; print the result with markup off (or as a rich `Text`)."""
    from st2si_cli.names import escape_controls

    return escape_controls(value if isinstance(value, str) else str(value))


def debug_enabled() -> bool:
    return os.environ.get("ST2SI_DEBUG", "") not in ("", "0")


def print_json(obj: Any) -> None:
    """One JSON document on stdout (plain print: no rich markup, no wrapping)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def print_jsonl(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def progress_enabled() -> bool:
    """Progress bars only for a person watching: stderr is a terminal and ST2SI_NO_PROGRESS is unset."""
    if os.environ.get("ST2SI_NO_PROGRESS"):
        return False
    return err.is_terminal


def make_progress(transient: bool = True):
    """A rich Progress with ETA on stderr, disabled when nobody is watching."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=not progress_enabled(),
    )


def metrics_table(title: str, rows: dict[str, dict[str, float]]):
    """A rich Table: one row per split (or domain), one column per metric; counts (n_*) left out."""
    from rich.table import Table
    from rich.text import Text

    keys: list[str] = []
    for m in rows.values():
        keys += [k for k in m if k not in keys and k != "n_users" and not k.startswith("n_")]
    table = Table(title=Text(safe_text(title)))
    table.add_column("")
    for k in keys:
        table.add_column(Text(safe_text(k)), justify="right")
    for name, m in rows.items():
        table.add_row(
            Text(safe_text(name)),
            *(f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, "")) for k in keys),
        )
    return table
