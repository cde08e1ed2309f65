"""ILP heads a tuning run starts from (`st2si pretrain --init-head NAME`), instead of random rows.

Top-K (or full) tuning then begins where `st2si adapt` ended: the backbone unchanged, each domain's
slice of the union ILP set to that domain's trained ILP head. Tuning then moves the top layers and
the rows together (linear probing, then fine-tuning). A head qualifies only if it is an ILP head
(`adapt --head ilp` or `ilp-text`) trained on the run's own backbone, for one of the run's domains,
over the same catalog.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from st2si_cli.errors import St2siError
from st2si_cli.heads.ilp import is_ilp_head
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo


def resolve_init_heads(
    zoo: Zoo, refs: Sequence[str], backbone: Artifact, datasets: Sequence[Artifact]
) -> tuple[str, ...]:
    """The heads' IDs, in the order of the run's domains; a one-line error for any head that does not fit."""
    by_domain: dict[str, str] = {}
    names = [d.name or d.short_id for d in datasets]
    for ref in refs:
        art = zoo.get(ref, kind="head")
        meta = HeadMeta.of(art)
        if not is_ilp_head(art):
            raise St2siError(f"--init-head {ref}: a {meta.kind} head; only an ILP head can start a run")
        if meta.backbone != backbone.id:
            raise St2siError(
                f"--init-head {ref}: trained on backbone {meta.backbone_name or meta.backbone}, "
                f"not on {backbone.name or backbone.short_id}"
            )
        k = domain_of(meta, datasets)
        if k is None:
            raise St2siError(f"--init-head {ref}: its dataset is none of {', '.join(names)}")
        if meta.catalog_hash != DatasetMeta.of(datasets[k]).catalog_hash:
            raise St2siError(f"--init-head {ref}: its catalog is not {names[k]}'s")
        if names[k] in by_domain:
            raise St2siError(f"--init-head: two heads for {names[k]}")
        by_domain[names[k]] = art.id
    return tuple(by_domain[n] for n in names if n in by_domain)


def domain_of(meta: HeadMeta, datasets: Sequence[Artifact]) -> int | None:
    """The index of the head's dataset among the run's datasets (None: not one of them)."""
    return next((i for i, d in enumerate(datasets) if meta.dataset == d.id), None)


def load_init_heads(
    zoo: Zoo, head_ids: Sequence[str], offsets: Sequence[int], datasets: Sequence[Artifact], ilp: nn.Linear
) -> None:
    """Each head's rows into its domain's slice of the union ILP (in place)."""
    from st2si_cli.heads.store import load_head_tensors

    for head_id in head_ids:
        art = zoo.get(head_id, kind="head")
        k = domain_of(HeadMeta.of(art), datasets)
        assert k is not None  # resolve_init_heads checked it
        weight = load_head_tensors(zoo, art)["weight"]
        rows = ilp.weight[offsets[k] : offsets[k] + weight.shape[0]]
        if rows.shape != weight.shape:
            raise St2siError(
                f"--init-head {art.name or art.short_id}: shape {tuple(weight.shape)}, not {tuple(rows.shape)}"
            )
        with torch.no_grad():
            rows.copy_(weight.to(rows.dtype))


__all__ = ["load_init_heads", "resolve_init_heads"]
