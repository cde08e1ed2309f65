"""What `st2si_cli` exports on purpose (its lazy export table), and the benchmarks' use of it: they import
st2si only through those names, each other as the `bench` package, and every one is in bench/README.md."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from helpers import REPO, cli_env

import st2si_cli

BENCH = REPO / "bench"
# Outside the export table, a benchmark may drive the command line itself.
CLI_ENTRY = {"st2si_cli.cli.app": {"run", "main"}}


def _python_files() -> list[Path]:
    return sorted([*BENCH.glob("*.py"), *(REPO / ".ci").glob("*.py")])


def test_every_exported_name_resolves_to_what_the_table_names():
    assert st2si_cli.__all__ == ["DEFAULT_BACKBONE", "__version__", *sorted(st2si_cli._EXPORTS)]
    for name, target in st2si_cli._EXPORTS.items():
        module, _, attr = target.partition(":")
        value = getattr(st2si_cli, name)
        assert not isinstance(value, types.ModuleType), name
        assert value is getattr(sys.modules[module], attr), name
        assert name in dir(st2si_cli)


def test_no_exported_name_is_also_a_module_of_the_package():
    # importing st2si_cli/<name>.py would set the package's attribute <name> to that module
    modules = {m.name for m in pkgutil.iter_modules(st2si_cli.__path__)}
    assert not set(st2si_cli.__all__) & modules


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        st2si_cli.no_such_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from st2si_cli import no_such_name")


def test_importing_the_package_imports_nothing_else():
    probe = (
        "import sys, st2si_cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('st2si_cli', 'torch', 'transformers', 'typer', 'rich', 'numpy')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['st2si_cli']"


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_benchmarks_import_st2si_only_through_the_exports(path: Path):
    bench_modules = {p.stem for p in BENCH.glob("*.py")}
    text = path.read_text()
    assert "sys.path" not in text, "bench is a package, run as `python -m bench.<name>`"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name.split(".")[0] != "st2si_cli" or alias.name == "st2si_cli", alias.name
                assert alias.name not in bench_modules, f"import bench.{alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {alias.name for alias in node.names}
            if node.module == "st2si_cli":
                assert names <= set(st2si_cli.__all__), names - set(st2si_cli.__all__)
            elif node.module.split(".")[0] == "st2si_cli":
                assert names <= CLI_ENTRY.get(node.module, set()), f"from {node.module} import {names}"
            assert node.module not in bench_modules, f"from {node.module} import ...: use bench.{node.module}"


def test_bench_files_are_short_and_listed_in_its_readme():
    readme = (BENCH / "README.md").read_text()
    for path in sorted([*BENCH.glob("*.py"), *BENCH.glob("*.sh")]):
        assert len(path.read_text().splitlines()) <= 400, path.name
        if path.name != "__init__.py":
            assert f"`{path.name}`" in readme, f"{path.name} is not in bench/README.md"
