"""The backbone in and out of full tuning: loaded trainable (fp32 master weights), stored in its own format."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from st2si_cli.zoo.store import Artifact, Zoo


def load_trainable(zoo: Zoo, art: Artifact, query: str) -> tuple[nn.Module, Any]:
    """The backbone's base model in fp32 (master weights) and its tokenizer, with [Q] added if asked."""
    from transformers import AutoModel, AutoTokenizer

    from st2si_cli.backbones.hf import quiet_transformers
    from st2si_cli.backbones.load import add_query_token

    quiet_transformers()
    folder = zoo.view(art)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    model = AutoModel.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
    )
    if query == "new":
        add_query_token(model, tokenizer)
    return model, tokenizer


def store_backbone(
    zoo: Zoo,
    art: Artifact,
    backbone_state: dict[str, Tensor],
    tokenizer: Any,
    query: str,
    name: str,
    meta: dict[str, Any],
) -> Artifact:
    """The tuned weights in the source backbone's own format (a causal LM folder; an untied LM head is kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from st2si_cli.backbones.load import add_query_token
    from st2si_cli.backbones.pull import save_backbone_folder

    folder = zoo.view(art)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    if query == "new":
        add_query_token(model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False))
    model.base_model.load_state_dict(backbone_state, strict=True)
    model.tie_weights()
    return save_backbone_folder(model, tokenizer, zoo, name, meta)


__all__ = ["load_trainable", "store_backbone"]
