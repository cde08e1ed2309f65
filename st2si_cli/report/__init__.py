"""`st2si report`: one self-contained HTML page (or JSON) of a domain, its heads and their recommendations.

`data.build_report` gathers the content from the zoo (records plus one scoring pass per head),
`html.render` writes the page, `svg` draws its charts. No Typer here; no network anywhere.
"""

from __future__ import annotations

from st2si_cli.report.data import build_report
from st2si_cli.report.html import render

__all__ = ["build_report", "render"]
