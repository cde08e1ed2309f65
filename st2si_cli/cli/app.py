"""The `st2si` command: a thin Typer layer over the library, and its entry point `main`.

The command tree is assembled here and only here: each `*_cmd` module defines plain functions (options
from `options`, printing through `output`, progress through `reporting`) and never imports this module
or another command module, so the CLI's imports form no circle. Heavy libraries (torch, transformers,
deepspeed) are imported inside the command functions, so `st2si --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from st2si_cli import __version__
from st2si_cli.cli import (
    adapt_cmd,
    prepare_cmd,
    pretrain_cmd,
    pull_cmd,
    quickstart_cmd,
    recommend_cmd,
    zoo_cmd,
    zoo_tidy_cmd,
)
from st2si_cli.cli.options import state
from st2si_cli.cli.output import debug_enabled, err
from st2si_cli.errors import St2siError

app = typer.Typer(
    name="st2si",
    help="Turn a decoder-only language model into a sequential recommender (ST2SI).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"st2si {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    zoo: Path | None = typer.Option(
        None,
        "--zoo",
        help="Zoo folder (default: $ST2SI_HOME, else the platform's user data dir).",
        envvar=None,
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    state.zoo_path = zoo


app.command("adapt")(adapt_cmd.adapt_cmd)
app.command("eval")(adapt_cmd.eval_cmd)
app.command("fuse")(adapt_cmd.fuse_cmd)
app.command("prepare")(prepare_cmd.prepare)
app.command("pretrain")(pretrain_cmd.pretrain_cmd)
app.command("quickstart")(quickstart_cmd.quickstart_cmd)
app.command("recommend")(recommend_cmd.recommend_cmd)

zoo_app = typer.Typer(
    help="Look at and tidy the local zoo of artifacts (datasets, catalogs, backbones, heads, features, runs).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
zoo_app.command("path")(zoo_cmd.path_cmd)
zoo_app.command("ls")(zoo_cmd.ls_cmd)
zoo_app.command("info")(zoo_cmd.info_cmd)
zoo_app.command("rm")(zoo_tidy_cmd.rm_cmd)
zoo_app.command("verify")(zoo_tidy_cmd.verify_cmd)
zoo_app.command("prune")(zoo_tidy_cmd.prune_cmd)
zoo_app.command("pull")(pull_cmd.pull_cmd)
app.add_typer(zoo_app, name="zoo")


def _click_exception_type() -> type[Exception]:
    """Click's base exception class. Newer Typer vendors Click (`typer._click`), so `click.ClickException`
    would not match what it raises: find the class through one that Typer exports."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        # Without standalone mode, Click hands back the code of a `typer.Exit`/`ctx.exit()` (--help is 0).
        exit_code = app(standalone_mode=False)
    except St2siError as e:
        if debug_enabled():
            raise
        err.print(f"Error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("Aborted.", markup=False)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # a click usage error or a bug
        if isinstance(e, _click_exception_type()):
            e.show()
            sys.exit(e.exit_code)
        if debug_enabled():
            raise
        err.print(
            f"Error: {type(e).__name__}: {e} (set ST2SI_DEBUG=1 for a traceback)",
            markup=False,
            soft_wrap=True,
        )
        sys.exit(1)
    if isinstance(exit_code, int) and exit_code:
        sys.exit(exit_code)
