"""ILP heads in the zoo: store with everything they depend on, load, and refuse mismatches."""

from __future__ import annotations

import json
from typing import Any

from st2si_cli import __version__
from st2si_cli.errors import MismatchError, ZooError
from st2si_cli.text import TextConfig
from st2si_cli.zoo.store import Artifact, Zoo


def head_name(domain: str, backbone_name: str | None) -> str:
    return f"{domain}/{backbone_name or 'backbone'}"


def save_head(
    zoo: Zoo,
    weight: Any,
    *,
    domain: str,
    backbone: Artifact,
    dataset: Artifact,
    text: TextConfig,
    meta: dict[str, Any],
    name: str | None = None,
) -> Artifact:
    """Store `weight` [N, d] as safetensors with a self-describing config."""
    import torch
    from safetensors.torch import save

    config = {
        "kind": "st2si-ilp-head",
        "domain": domain,
        "n_items": int(weight.shape[0]),
        "hidden": int(weight.shape[1]),
        "text": text.to_dict(),
        "backbone": backbone.id,
        "dataset": dataset.id,
        "catalog_hash": dataset.meta.get("catalog_hash"),
    }
    blob = save({"weight": weight.detach().to(torch.float32).contiguous()})
    full_meta = {
        **meta,
        **config,
        "inputs": {"backbone": backbone.id, "dataset": dataset.id, **meta.get("inputs", {})},
        "backbone_name": backbone.name,
        "versions": {"st2si": __version__, "torch": torch.__version__},
    }
    files = {"head.safetensors": blob, "config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    return zoo.put(
        "head", files, full_meta, name=name or head_name(domain, backbone.name), domain=domain,
        identity={"meta": full_meta},
    )


def find_head(zoo: Zoo, domain: str, ref: str | None = None) -> Artifact:
    """`ref` if given, else the domain's newest head."""
    if ref:
        return zoo.get(ref, kind="head")
    art = zoo.newest("head", domain)
    if art is None:
        raise ZooError(f"no head for domain {domain!r}: run `st2si adapt --domain {domain}` first")
    return art


def load_head_weight(zoo: Zoo, art: Artifact) -> Any:
    from safetensors.torch import load_file

    return load_file(str(zoo.file(art, "head.safetensors")))["weight"]


def head_text_config(art: Artifact) -> TextConfig:
    return TextConfig.from_dict(art.meta["text"])


def check_compatible(head: Artifact, *, backbone: Artifact | None = None, dataset: Artifact | None = None) -> None:
    """Refuse a head used with another backbone or another catalog than it was trained on."""
    label = head.name or head.short_id
    if backbone is not None and head.meta.get("backbone") != backbone.id:
        raise MismatchError(
            f"head {label} was trained on backbone {head.meta.get('backbone', '?')[:12]}"
            f" ({head.meta.get('backbone_name')}), not {backbone.id[:12]} ({backbone.name})"
        )
    if dataset is not None and head.meta.get("catalog_hash") != dataset.meta.get("catalog_hash"):
        raise MismatchError(
            f"head {label} was trained on catalog {str(head.meta.get('catalog_hash'))[:12]}, but dataset "
            f"{dataset.name or dataset.short_id} has catalog {str(dataset.meta.get('catalog_hash'))[:12]}"
        )
