"""Errors that the CLI turns into one line on stderr and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class St2siError(Exception):
    """An error meant for the user: its message is printed as `Error: <message>`."""

    exit_code = 1


class InputError(St2siError):
    """Bad input data; names the file and, where known, the line."""

    exit_code = 2

    def __init__(self, path: str | Path | None, message: str, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = message
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ZooError(St2siError):
    """A missing or inconsistent zoo artifact."""


class MismatchError(St2siError):
    """A head used with a backbone or catalog it was not trained for."""
