"""`st2si recommend`: JSON lines in, JSON lines out, as a stream."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path

import typer

from st2si_cli.cli.options import Dtype, device_option, head_ref_option, open_zoo
from st2si_cli.cli.output import err, print_jsonl, safe_text
from st2si_cli.errors import InputError

HELP = """Top-k items for each history, one JSON object per input line, answered as lines arrive.

\b
Input (JSON Lines; a file, a FIFO, or - for stdin):
  {"user": "u1", "history": ["42", 17, {"id": "9"}, {"title": "Toy Story (1995)"}]}
  history entries, oldest first: a catalog item ID (string or number), {"id": ID}, or an
  object with a "title" (and other attributes) for any item, in the catalog or not.
\b
Output (JSON Lines, one per non-blank input line, in input order):
  {"user": "u1", "items": [{"id": "50", "title": "...", "score": 3.1}, ...],
   "head": "NAME", "head_id": "SHA256", "backbone_id": "SHA256"}
  with --exclude-history, "unresolved": [{"position": 3, "title": "..."}] lists text items
  the catalog does not hold (they cannot be excluded); with --skip-bad a bad line gives
  {"user": ..., "line": N, "error": "...", "head": ..., ...}.
\b
Streaming: lines are read and answered in batches (--batch-lines), each flushed at once, so
answers come before the input ends; the model loads once per call. --shard I/N (I from 0)
answers only part I of N contiguous parts of the non-blank lines: the outputs of parts
0..N-1 concatenated equal the unsharded output (for array jobs).
\b
Example:
  echo '{"user": "a", "history": ["1", {"title": "Star Wars (1977)"}]}' \\
    | st2si recommend --domain ml-100k --user-history - -k 5 --exclude-history
"""


def recommend_cmd(
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    user_history: str = typer.Option(..., "--user-history", help="JSON-lines file or FIFO, or - for stdin."),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="Items per user."),
    exclude_history: bool = typer.Option(
        False,
        "--exclude-history",
        help="Never recommend an item already in the history (by ID, or by title for text items).",
    ),
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Write an error object for a bad line and go on."
    ),
    head: str | None = head_ref_option(),
    dtype: Dtype | None = typer.Option(None, "--dtype", help="Backbone dtype (default: the head's)."),
    device: str = device_option(),
    batch_lines: int = typer.Option(64, "--batch-lines", min=1, help="Most input lines answered together."),
    shard: str | None = typer.Option(
        None, "--shard", help="I/N: answer only part I (0-based) of N of the input lines."
    ),
) -> None:
    from st2si_cli.data.line_stream import Shard, count_nonblank, line_batches
    from st2si_cli.recommend import Recommender, RecommendOptions

    part = None
    if shard is not None:
        try:
            part = Shard.parse(shard)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="'--shard'") from None
    if user_history == "-":
        source, stream = "<stdin>", sys.stdin
    else:
        path = Path(user_history)
        if not path.exists():
            raise InputError(path, "no such file")
        if path.is_dir():
            raise InputError(path, "a folder, not a file")
        source, stream = str(path), None
    opts = RecommendOptions(
        k=k,
        exclude_history=exclude_history,
        head_ref=head,
        dtype=dtype.value if dtype else None,
        device=device,
        max_batch=batch_lines,
    )
    rec = Recommender(open_zoo(create=False), domain, opts)
    regular = stream is None and Path(source).is_file()
    if regular and not skip_bad:  # a file can be checked whole first: a bad line then costs no work
        with open(source, "rb") as f:
            for batch in line_batches(f, 4096):
                rec.parse(batch, source)
    if head is None:
        err.print(safe_text(rec.choice.describe()), markup=False, soft_wrap=True)
    rec.preload()  # the model loads while the first lines are on their way
    try:
        with open(source, "rb") if stream is None else nullcontext(stream) as f:
            batches = line_batches(f, batch_lines)
            kept = None
            if part is not None:
                if regular:
                    with open(source, "rb") as g:
                        total = count_nonblank(line_batches(g, 4096))
                else:  # a stream must be read whole to be split into contiguous parts
                    batches = list(batches)
                    total = count_nonblank(batches)
                kept = Shard(part[0], part[1], total)
            for batch in batches:
                lines = kept.keep(batch) if kept else batch
                for row in rec.answer(rec.parse(lines, source, skip_bad=skip_bad)):
                    print_jsonl(row)
    finally:
        rec.close()


recommend_cmd.__doc__ = HELP
