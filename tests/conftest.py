"""Shared fixtures. Plain functions shared by the tests (datasets, zoo builders, `run_cli`) are in
helpers.py. A module that needs other data overrides `zoo` (and `backbone`) with its own fixture."""

from __future__ import annotations

import pytest
import torch
from helpers import build_zoo, synthetic_dataset

from st2si_cli.backbones.load import load_backbone


@pytest.fixture(scope="session", autouse=True)
def _st2si_home_for_the_session(tmp_path_factory):
    """ST2SI_HOME in a temporary folder for fixtures wider than one test too (set up before `st2si_home`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ST2SI_HOME", str(tmp_path_factory.mktemp("st2si-home")))
        yield


@pytest.fixture(autouse=True)
def st2si_home(tmp_path, monkeypatch):
    """Every test, and every CLI process it starts, sees ST2SI_HOME in its own temporary folder (not
    created here): nothing that falls back on the default zoo can touch the user's real one."""
    home = tmp_path / "st2si-home"
    monkeypatch.setenv("ST2SI_HOME", str(home))
    return home


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def zoo(tmp_path):
    """A fresh zoo per test: the synthetic dataset as domain "toy", `tiny-opt` and `tiny-llama` pulled."""
    return build_zoo(tmp_path / "toy-zoo", {"toy": synthetic_dataset()}, backbones=("tiny-opt", "tiny-llama"))


@pytest.fixture
def backbone(zoo):
    """`tiny-opt` of `zoo`, loaded in fp32."""
    return load_backbone(zoo, "tiny-opt", dtype="fp32")
