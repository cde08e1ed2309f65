"""`st2si report`: one self-contained HTML page of a domain's heads, curves and recommendations."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import typer

from st2si_cli.cli.options import json_option, open_zoo, seed_option
from st2si_cli.cli.output import err, print_jsonl


def report_cmd(
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    out_path: Path | None = typer.Option(
        None, "--out", "-o", help="HTML file to write (default report.html; with --json, none)."
    ),
    user: list[str] | None = typer.Option(
        None,
        "--user",
        metavar="USER",
        help="A user to show (as named in the source data); repeat it for several.",
    ),
    users: int = typer.Option(
        3, "--users", min=1, max=100, help="Users drawn with --seed when no --user is given."
    ),
    seed: int = seed_option(),
    k: int = typer.Option(
        10, "-k", "--k", min=1, max=1000, help="Length of the top-k lists and of the metrics."
    ),
    json_out: bool = json_option("Print the report's content as one JSON object."),
) -> None:
    """Write one HTML page of a domain: its data, every head side by side (accuracy and beyond-accuracy
    metrics, training time, the default head and why), training curves, a few users' recommendations
    and the commands that made each head. Self-contained (inline SVG, no network); read-only on the zoo:
    built from the heads' records and one scoring pass of their cached features, nothing retrained.

    \b
    Examples:
      st2si report --domain ml-100k --out report-ml-100k.html
      st2si report --domain ml-100k --user 196 --user 22 -k 5 --json
    """
    from st2si_cli.report import build_report, render

    zoo = open_zoo(create=False)
    report = build_report(zoo, domain, users=user or (), seed=seed, k=k, n_users=users)
    if json_out:
        print_jsonl(report)
        if out_path is None:
            return
    path = out_path or Path("report.html")
    args = ["st2si", "report", "--domain", domain, "--out", str(path)]
    for u in user or ():
        args += ["--user", u]
    if not user and (users != 3 or seed):
        args += ["--users", str(users), "--seed", str(seed)]
    if k != 10:
        args += ["-k", str(k)]
    report["command"] = shlex.join(args)
    page = render(report)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    err.print(
        f"Wrote {path} ({len(report['heads'])} heads, {len(report['users'])} users, {len(page) / 1024:.0f} KiB) "
        f"in {report['seconds']:.1f} s",
        markup=False,
        soft_wrap=True,
    )
