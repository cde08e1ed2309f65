"""Backbones into the zoo: tiny random models, local folders, the hub path offline."""

from __future__ import annotations

import torch
from helpers import run_cli

from st2si_cli.backbones.load import load_backbone
from st2si_cli.backbones.pull import pull, write_tiny_model
from st2si_cli.zoo.store import Zoo


def test_local_folder_imports_as_safetensors_and_loads_as_base_model(tmp_path):
    folder = tmp_path / "my-llama"
    write_tiny_model(folder, family="llama", hidden=32, layers=1, seed=5)
    zoo = Zoo(tmp_path / "zoo")
    art = pull(zoo, str(folder), name="mine")
    assert art.name == "mine" and art.meta["family"] == "llama"
    assert any(f.endswith(".safetensors") for f in art.files) and "tokenizer.json" in art.files
    bb = load_backbone(zoo, "mine", dtype="fp32")
    ids = torch.tensor([bb.tokenizer("Heat.")["input_ids"]])
    assert bb.hidden_states(ids).shape == (1, ids.shape[1], 32)


def test_same_tiny_model_gives_same_artifact(tmp_path):
    zoo = Zoo(tmp_path / "zoo")
    assert pull(zoo, "tiny-opt").id == pull(zoo, "tiny-opt", name="again").id


def test_hub_pull_offline_is_one_line_error_and_leaves_zoo_clean(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = run_cli(tmp_path / "zoo", "zoo", "pull", "facebook/opt-125m", env=env, inherit_env=False)
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert len(lines) == 1 and "facebook/opt-125m" in lines[0]
    assert Zoo(tmp_path / "zoo").ls() == []


def test_unknown_backbone_reference_is_a_clear_error(tmp_path):
    r = run_cli(tmp_path / "zoo", "zoo", "pull", "no-such-thing")
    assert r.returncode != 0 and r.stderr.splitlines()[-1].startswith("Error: unknown backbone")
