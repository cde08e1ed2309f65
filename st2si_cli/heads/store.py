"""Head artifacts in the zoo, of every kind: store tensors with everything they depend on, load them,
and refuse a head used with another backbone or catalog. `head_meta` is the one shape of what a head
records about its training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from st2si_cli import __version__
from st2si_cli.errors import MismatchError
from st2si_cli.model.text import TextConfig
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo

if TYPE_CHECKING:
    from st2si_cli.metrics import RankingProtocol


def head_name(domain: str, backbone_name: str | None) -> str:
    return f"{domain}/{backbone_name or 'backbone'}"


@dataclass
class HeadOrigin:
    """What a head is for and was trained from: recorded in its config and checked on every use."""

    domain: str
    backbone: Artifact
    dataset: Artifact
    text: TextConfig
    name: str | None = None  # the head's name in the zoo (default DOMAIN/BACKBONE)


def store_head(
    zoo: Zoo, tensors: dict[str, Any], origin: HeadOrigin, config: dict[str, Any], meta: dict[str, Any]
) -> Artifact:
    """Store any head's tensors (safetensors, no pickle) with config.json and the zoo record.

    `config` holds the head's own fields (kind, n_items, hidden, ...); the origin's are added here.
    """
    import torch
    from safetensors.torch import save

    config = {
        "domain": origin.domain,
        "text": origin.text.to_dict(),
        "backbone": origin.backbone.id,
        "dataset": origin.dataset.id,
        "catalog_hash": origin.dataset.meta.get("catalog_hash"),
        **config,
    }
    blob = save({k: v.detach().contiguous() for k, v in tensors.items()})
    full_meta = {
        **meta,
        **config,
        "inputs": {"backbone": origin.backbone.id, "dataset": origin.dataset.id, **meta.get("inputs", {})},
        "backbone_name": origin.backbone.name,
        "versions": {"st2si": __version__, "torch": torch.__version__},
    }
    files = {"head.safetensors": blob, "config.json": json.dumps(config, indent=2, sort_keys=True).encode()}
    return zoo.put(
        "head",
        files,
        full_meta,
        name=origin.name or head_name(origin.domain, origin.backbone.name),
        domain=origin.domain,
        identity={"meta": settled(full_meta)},
    )


def settled(value: Any) -> Any:
    """`value` without what changes from run to run of the same work (timings), so an identical rerun
    (same inputs, settings and weights) is the same artifact instead of a new one."""
    if isinstance(value, dict):
        return {
            k: settled(v)
            for k, v in value.items()
            if k not in ("timings", "seconds", "tokens_per_s") and not k.endswith("_seconds")
        }
    if isinstance(value, list):
        return [settled(v) for v in value]
    return value


def load_head_tensors(zoo: Zoo, art: Artifact) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(zoo.file(art, "head.safetensors")))


def stored_module_args(zoo: Zoo, head: Artifact) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """(tensors, training settings, feature width, items) a head's module (an adapter, a fusion) is
    rebuilt from."""
    meta = HeadMeta.of(head)
    return load_head_tensors(zoo, head), meta.train or {}, int(meta.d_feat or 0), int(meta.n_items or 0)


def load_head_weight(zoo: Zoo, art: Artifact) -> Any:
    """The ILP weight [N, d] of an ILP head (a MismatchError for heads of other kinds)."""
    tensors = load_head_tensors(zoo, art)
    if "weight" not in tensors:
        raise MismatchError(f"head {art.name or art.short_id} is a {head_kind(art)} head, not an ILP")
    return tensors["weight"]


def head_text_config(art: Artifact) -> TextConfig:
    return TextConfig.from_dict(art.meta["text"])


def check_compatible(
    head: Artifact, *, backbone: Artifact | None = None, dataset: Artifact | None = None
) -> None:
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


def head_meta(
    method: str,
    *,
    kind: str | None,
    train: dict[str, Any] | None,
    metrics: dict[str, Any],
    best_epoch: int | None,
    history: list[Any],
    timings: dict[str, Any],
    protocol: RankingProtocol | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What every head records about its training (`HeadMeta` reads it back): how it was trained
    (`method`), its kind (None: the ILP of a pretrain, which records none), the settings, validation and
    test metrics under `protocol` (full ranking, pessimistic ties, no masking by default), the epoch
    kept and the history. `extra` adds the rest (dtype, inputs, d_feat, sweep, ...); a None is left out."""
    from st2si_cli.metrics import RankingProtocol

    meta: dict[str, Any] = {
        "method": method,
        "train": train,
        "metrics": metrics,
        "protocol": (protocol or RankingProtocol()).record(),
        "best_epoch": best_epoch,
        "history": history,
        "timings": timings,
    }
    if kind is not None:
        meta["head"] = kind
    meta.update({k: v for k, v in extra.items() if v is not None})
    return meta


def head_kind(art: Artifact) -> str:
    """ "ilp" (the paper's, random init), "ilp-text", "adapter", or the pretrain method's ILP ("ilp")."""
    return HeadMeta.of(art).kind
