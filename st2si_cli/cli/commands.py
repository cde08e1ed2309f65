"""Imports every command module so that each registers itself on the app."""

from st2si_cli.cli import adapt_cmd, prepare_cmd, pull_cmd, quickstart_cmd, recommend_cmd, zoo_cmd  # noqa: F401
