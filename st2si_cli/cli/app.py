"""The `st2si` command: a thin Typer layer over the library, and its entry point `main`.

The command tree is assembled here and only here: each `*_cmd` module defines plain functions (options
from `options`, printing through `output`, progress through `reporting`) and never imports this module
or another command module, so the CLI's imports form no circle. Heavy libraries (torch, transformers,
deepspeed) are imported inside the command functions, so `st2si --help` stays fast.
"""

from __future__ import annotations

import sys

import typer

from st2si_cli import __version__
from st2si_cli.cli import (
    adapt_cmd,
    fuse_cmd,
    items_cmd,
    prepare_cmd,
    pretrain_cmd,
    pull_cmd,
    quickstart_cmd,
    recommend_cmd,
    report_cmd,
    zoo_cmd,
    zoo_tidy_cmd,
)
from st2si_cli.cli.options import state, zoo_option_value
from st2si_cli.cli.output import debug_enabled, err
from st2si_cli.errors import St2siError

HELP = """Turn a decoder-only language model into a sequential recommender (ST2SI).

\b
Example, end to end:
  st2si prepare --source movielens-100k --domain ml-100k
  st2si adapt --domain ml-100k --backbone smollm2-135m
  st2si eval --domain ml-100k --json
  echo '{"user": "a", "history": ["1", "50"]}' | st2si recommend --domain ml-100k --user-history -

\b
Stdout carries only results (tables, JSON); messages, prompts and progress go to stderr.
Usage errors exit 2; other errors print one line "Error: ..." and exit non-zero.
--zoo may come before or after the command.

\b
Environment variables:
  ST2SI_HOME         the zoo folder when --zoo is not given
  ST2SI_DEBUG=1      show tracebacks instead of one-line errors
  ST2SI_NO_PROGRESS  no progress bars (they are drawn only when stderr is a terminal)
  ST2SI_OP_BUILD_WAIT_S  seconds to wait for another process's DeepSpeed op build (default 300)
  ST2SI_NO_FAST_LOAD=1   recommend loads the backbone through transformers (the packed fast path off)
"""

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="st2si",
    help=HELP,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"st2si {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    zoo: str | None = typer.Option(
        None,
        "--zoo",
        metavar="PATH",
        help="Zoo folder (default: $ST2SI_HOME, else the platform's user data dir).",
        envvar=None,
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    state.zoo_path = zoo_option_value(zoo)


def _example(*lines: str) -> str:
    """An epilog that Click prints as written (the \\b keeps its lines from being rewrapped)."""
    return "\b\nExample" + ("s" if len(lines) > 1 else "") + ":\n" + "\n".join(f"  {x}" for x in lines)


app.command("adapt")(adapt_cmd.adapt_cmd)
app.command("eval")(adapt_cmd.eval_cmd)
app.command("fuse")(fuse_cmd.fuse_cmd)
app.command(
    "prepare",
    epilog=_example(
        "st2si prepare --source movielens-100k --domain ml-100k",
        "st2si prepare data/shop/ --domain shop --json   # items.csv + interactions.csv",
    ),
)(prepare_cmd.prepare)
app.command("pretrain")(pretrain_cmd.pretrain_cmd)
app.command("quickstart")(quickstart_cmd.quickstart_cmd)
app.command("recommend")(recommend_cmd.recommend_cmd)
app.command("report")(report_cmd.report_cmd)

zoo_app = typer.Typer(
    help="Look at and tidy the local zoo of artifacts (datasets, catalogs, backbones, heads, features, runs).",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
    epilog=_example("st2si zoo ls --domain ml-100k", "st2si zoo info ml-100k/smollm2-135m --json"),
)
zoo_app.command("path", epilog=_example("st2si zoo path", "st2si --zoo /data/zoo zoo path --json"))(
    zoo_cmd.path_cmd
)
zoo_app.command(
    "ls",
    epilog=_example("st2si zoo ls --kind head", "st2si zoo ls --domain ml-100k   # and its default head"),
)(zoo_cmd.ls_cmd)
zoo_app.command(
    "default",
    epilog=_example(
        "st2si zoo default ml-100k   # which head answers, and why",
        "st2si zoo default ml-100k ml-100k/fusion   # pin it; --clear unpins",
    ),
)(zoo_cmd.default_cmd)
zoo_app.command("info", epilog=_example("st2si zoo info ml-100k", "st2si zoo info 3f2a9c --json"))(
    zoo_cmd.info_cmd
)
zoo_app.command(
    "rm", epilog=_example("st2si zoo rm ml-100k/old-head --dry-run", "st2si zoo rm 3f2a9c --yes")
)(zoo_tidy_cmd.rm_cmd)
zoo_app.command("verify", epilog=_example("st2si zoo verify", "st2si zoo verify --json"))(
    zoo_tidy_cmd.verify_cmd
)
zoo_app.command("prune", epilog=_example("st2si zoo prune --dry-run", "st2si zoo prune --yes"))(
    zoo_tidy_cmd.prune_cmd
)
zoo_app.command(
    "pull",
    epilog=_example("st2si zoo pull smollm2-135m", "st2si zoo pull ./my-hf-model --name mine --json"),
)(pull_cmd.pull_cmd)
app.add_typer(zoo_app, name="zoo")
app.add_typer(items_cmd.app, name="items")


def _click_exception_type() -> type[Exception]:
    """Click's base exception class. Newer Typer vendors Click (`typer._click`), so `click.ClickException`
    would not match what it raises: find the class through one that Typer exports."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def hoist_zoo(argv: list[str]) -> list[str]:
    """Move `--zoo PATH` / `--zoo=PATH` given after the command to the front, where the root option
    reads it (`st2si recommend ... --zoo Z` = `st2si --zoo Z recommend ...`). Stops at `--`."""
    out: list[str] = []
    front: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            out += argv[i:]
            break
        if a == "--zoo" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 2
            continue
        if a.startswith("--zoo="):
            front.append(a)
        else:
            out.append(a)
        i += 1
    return front + out


def _one_line(e: BaseException) -> str:
    """The message of an error that no command turned into a St2siError: the file it concerns where the
    exception names one, one line always (C++ backtraces and multi-line library texts cut to the first)."""
    import json

    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    first = lines[0] if lines else ""
    hint = " (set ST2SI_DEBUG=1 for a traceback)"
    if isinstance(e, OSError) and e.filename is not None:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{where}: {e.strerror or type(e).__name__}"
    if isinstance(e, json.JSONDecodeError):
        return (
            f"a file is not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); if it is in the zoo, "
            f"run `st2si zoo verify --repair`{hint}"
        )
    if isinstance(e, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); if it is in "
            f"the zoo, run `st2si zoo verify --repair`{hint}"
        )
    if isinstance(e, RecursionError):
        return f"input nested too deeply to read{hint}"
    if isinstance(e, MemoryError):
        return f"out of memory{hint}"
    return f"{type(e).__name__}: {first}{hint}"


def run(argv: list[str]) -> int:
    """Run the command line `argv` (without the program name); the exit status. Errors print one line."""
    try:
        # Without standalone mode, Click hands back the code of a `typer.Exit`/`ctx.exit()` (--help is 0).
        exit_code = app(args=hoist_zoo(argv), prog_name="st2si", standalone_mode=False)
    except St2siError as e:
        if debug_enabled():
            raise
        err.print(f"Error: {e}", markup=False, soft_wrap=True)
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("Aborted.", markup=False)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a click usage error or a bug
        if isinstance(e, _click_exception_type()):
            e.show()
            return e.exit_code
        if debug_enabled():
            raise
        err.print(f"Error: {_one_line(e)}", markup=False, soft_wrap=True)
        return 1
    return exit_code if isinstance(exit_code, int) else 0


def main() -> None:
    code = run(sys.argv[1:])
    if code:
        sys.exit(code)
