"""`st2si recommend`: JSON lines in, JSON lines out."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from st2si_cli.cli.options import device_option, head_ref_option, open_zoo
from st2si_cli.cli.output import print_jsonl
from st2si_cli.errors import InputError


def recommend_cmd(
    domain: str = typer.Option(..., "--domain"),
    user_history: str = typer.Option(..., "--user-history", help="JSON-lines file, or - for stdin."),
    k: int = typer.Option(10, "-k", "--top-k", help="Items per user."),
    exclude_history: bool = typer.Option(
        False, "--exclude-history", help="Never recommend an item already in the history."
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Write an error object for a bad line and go on."
    ),
    head: str | None = head_ref_option(),
    device: str = device_option(),
) -> None:
    """Top-k items for each history (item IDs or item texts), one JSON object per input line."""
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.recommend import parse_requests, recommend

    zoo = open_zoo()
    ds = load_dataset(zoo, zoo.get(domain, kind="dataset").id)
    if user_history == "-":
        source, lines = "<stdin>", sys.stdin.read().splitlines()
    else:
        path = Path(user_history)
        if not path.is_file():
            raise InputError(path, "no such file")
        try:
            lines = path.read_text("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InputError(path, f"not UTF-8 text (byte {e.start})") from None
        source = str(path)
    requests = parse_requests(lines, source, ds.items, skip_bad=skip_bad)
    for row in recommend(
        zoo, domain, requests, k=k, exclude_history=exclude_history, head_ref=head, device=device
    ):
        print_jsonl(row)
