"""Plain helpers shared by the test modules: synthetic datasets, tiny zoos, and the two ways the tests run
the CLI: as a process (`run_cli`), and in this process (`run_cli_here`, same arguments and result). Fixtures live in conftest.py; this module holds what is called with
arguments, from fixtures of any scope as well as from tests. Import it as `from helpers import ...`
(tests/ is on sys.path for the tests, and for scripts run from tests/ such as pretrain_worker.py).
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from st2si_cli.backbones.pull import pull
from st2si_cli.data.dataset import RawInteraction, build_dataset
from st2si_cli.data.prepare import store_dataset
from st2si_cli.zoo.store import Zoo

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"  # real datasets beside the repository, read where they lie

WORDS = "red blue green small large wooden steel glass paper cotton lamp chair table mug pen book clock fan".split()


# ---- data and zoos -----------------------------------------------------------------------------------


def synthetic_dataset(n_users: int = 40, n_items: int = 25, seed: int = 0):
    rng = random.Random(seed)
    items = {str(i): {"title": " ".join(rng.sample(WORDS, 3)) + f" {i}"} for i in range(n_items)}
    rows, order = [], 0
    for u in range(n_users):
        # Users drift through the catalog so the next item is learnable.
        pos = rng.randrange(n_items)
        for t in range(rng.randint(4, 12)):
            pos = (pos + rng.choice([1, 1, 2])) % n_items
            rows.append(RawInteraction(user=f"u{u}", item=str(pos), timestamp=float(t), order=order))
            order += 1
    return build_dataset(items, rows, source="synthetic")


def quick_head(zoo: Zoo, domain: str = "toy", **kwargs: Any) -> Any:
    """One ILP head trained for one epoch on fp32 tiny-opt features (and its feature cache) in `zoo`."""
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.train.head import HeadConfig

    return adapt(
        zoo,
        domain,
        backbone="tiny-opt",
        head_cfg=HeadConfig(max_epochs=1),
        feature_opts=FeatureOptions(dtype="fp32"),
        **kwargs,
    )


def quick_adapter(zoo: Zoo, domain: str = "toy", *, name: str, max_epochs: int = 2) -> Any:
    """A small sequence adapter head on the same fp32 tiny-opt features as `quick_head`."""
    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.model.adapter import AdapterConfig

    cfg = AdapterConfig(hidden=16, layers=1, heads=2, max_len=8, batch_size=16, max_epochs=max_epochs)
    return adapt(
        zoo, domain, backbone="tiny-opt", head_cfg=cfg, feature_opts=FeatureOptions(dtype="fp32"), name=name
    )


def write_generic_source(folder: str | Path, n_users: int = 10, seed: int = 0) -> Path:
    """A generic-format source folder (items.csv + interactions.csv) holding a synthetic dataset."""
    ds = synthetic_dataset(n_users=n_users, seed=seed)
    folder = Path(folder)
    folder.mkdir(parents=True)
    items = ["item_id,title", *(f"{i},{it['title']}" for i, it in enumerate(ds.items))]
    rows = ["user_id,item_id,timestamp"]
    for u, seq in enumerate(ds.sequences):
        rows += [f"u{u},{item},{t}" for t, item in enumerate(seq)]
    (folder / "items.csv").write_text("\n".join(items) + "\n")
    (folder / "interactions.csv").write_text("\n".join(rows) + "\n")
    return folder


def build_zoo(root: str | Path, datasets: Mapping[str, Any], backbones: Sequence[str] = ("tiny-opt",)) -> Zoo:
    """A zoo at `root` holding each dataset under its domain name and the given backbones pulled."""
    zoo = Zoo(root)
    for domain, ds in datasets.items():
        store_dataset(zoo, ds, domain=domain, fmt="synthetic", source="synthetic")
    for ref in backbones:
        pull(zoo, ref)
    return zoo


def toy_zoo_with_llama(root: str | Path) -> Zoo:
    """A zoo with the synthetic "toy" dataset, tiny-opt (2 layers) and tiny-llama4 (4 layers, rotary)."""
    from st2si_cli.backbones.pull import build_tiny

    zoo = build_zoo(root, {"toy": synthetic_dataset()})
    build_tiny(zoo, "tiny-llama4", "llama", layers=4)
    return zoo


# ---- the command line, run as a process ---------------------------------------------------------------

# Run after `prelude` by `run_cli(..., prelude=...)`: the CLI's entry point with the given arguments.
_RUN_MAIN = "\nimport sys\nsys.argv = {argv!r}\nfrom st2si_cli.cli.app import main\nmain()\n"


def cli_env(env: Mapping[str, str] | None = None, *, inherit: bool = True) -> dict[str, str]:
    """The CLI's environment: the tests' own (where conftest.py points ST2SI_HOME at a temporary folder),
    without ST2SI_DEBUG (it changes the one-line errors), with progress bars off, then `env` on top.
    inherit=False starts from an empty environment instead of the tests' own."""
    base = {k: v for k, v in os.environ.items() if k != "ST2SI_DEBUG"} if inherit else {}
    return {**base, "ST2SI_NO_PROGRESS": "1", **(env or {})}


def cli_command(zoo: Any, *args: Any, launcher: Sequence[str] | None = None) -> list[str]:
    """`python -m st2si_cli [--zoo ROOT] ARGS...`; `zoo` is a Zoo, a path, or None for no --zoo.
    With `launcher` (e.g. the deepspeed launcher and its options), `LAUNCHER... --module st2si_cli ...`."""
    root = zoo.root if isinstance(zoo, Zoo) else zoo  # (a Path has a .root too: "/")
    head = [*launcher, "--module", "st2si_cli"] if launcher else [sys.executable, "-m", "st2si_cli"]
    return [*head, *(["--zoo", str(root)] if root is not None else []), *map(str, args)]


def run_cli(
    zoo: Any,
    *args: Any,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    inherit_env: bool = True,
    timeout: float = 300,
    launcher: Sequence[str] | None = None,
    prelude: str | None = None,
) -> subprocess.CompletedProcess:
    """Run the CLI as a batch job would: in the repository, stdin `input` or else not a terminal (empty),
    stdout and stderr captured as text. `zoo`: a Zoo, a path, or None (no --zoo). `env` goes on top of
    `cli_env`'s environment. `prelude`: Python code the child runs before the CLI's entry point (an
    import probe, say); `launcher`: see `cli_command`."""
    cmd = cli_command(zoo, *args, launcher=launcher)
    if prelude is not None:
        assert launcher is None, "a prelude runs in this Python, not under a launcher"
        cmd = [sys.executable, "-c", prelude + _RUN_MAIN.format(argv=["st2si", *cmd[3:]])]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=cli_env(env, inherit=inherit_env),
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_here(
    zoo: Any, *args: Any, input: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`run_cli` in this process, through the CLI's own `run` (the one-line errors and exit codes of
    `main`): stdin `input` or else empty (not a terminal), stdout and stderr captured as text, and for
    the call the environment `run_cli` gives its child. For tests of what a command does; a test of the
    process itself (FIFOs, launchers, concurrency, signals, terminals, import cost) uses `run_cli`."""
    from st2si_cli.cli.app import run

    argv = cli_command(zoo, *args)[3:]  # without `python -m st2si_cli`
    saved_env, saved_streams = dict(os.environ), (sys.stdin, sys.stdout, sys.stderr)
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(cli_env(env))
        sys.stdin, sys.stdout, sys.stderr = io.StringIO(input or ""), out, err
        code = run(argv)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved_streams
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["st2si", *argv], code, out.getvalue(), err.getvalue())
