"""The benchmarks, a package run from the repository root: `python -m bench.quality ...` (see README.md).

Benchmarks use st2si only through what `st2si_cli` exports (`from st2si_cli import ...`) and drive the
command line through `st2si_cli.cli.app.run` or a child process.
"""
