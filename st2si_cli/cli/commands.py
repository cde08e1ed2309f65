"""Imports every command module so that each registers itself on the app."""

from st2si_cli.cli import (  # noqa: F401
    adapt_cmd,
    prepare_cmd,
    pretrain_cmd,
    pull_cmd,
    quickstart_cmd,
    recommend_cmd,
    zoo_cmd,
)
