"""Per-user ranks of any head on its domain's validation or test targets (the one scoring path of
`eval` and the benchmarks): ILP heads through `rank_rows`, sequence adapters and fusions through their own scorers."""

from __future__ import annotations

from typing import Any

from st2si_cli.adapter_head import load_adapter_head
from st2si_cli.fusion_head import fusion_ranks, load_fusion_head
from st2si_cli.heads import head_kind, load_head_weight
from st2si_cli.model.samples import VALID
from st2si_cli.scoring import rank_rows
from st2si_cli.train.adapter import adapter_ranks
from st2si_cli.zoo.store import Artifact, Zoo


def user_ranks(
    zoo: Zoo,
    head: Artifact,
    fs: Any,
    sequences: Any,
    role: int,
    *,
    ties: str = "pessimistic",
    mask_history: bool = False,
) -> Any:
    """Full-ranking rank of each user's VALID or TEST target under `head`, in user order ([n_users] long).

    `fs` is the feature set of the head's backbone and text settings on its dataset. With
    `mask_history`, items of the user's input history are not ranked (the target itself always is).
    """
    import torch

    cut = 2 if role == VALID else 1
    kind = head_kind(head)
    if kind in ("adapter", "fusion"):  # these score users in user order
        exclude = [list(seq[:-cut]) for seq in sequences] if mask_history else None
        if kind == "adapter":
            return adapter_ranks(
                load_adapter_head(zoo, head), fs, sequences, role, ties=ties, exclude=exclude
            )
        return fusion_ranks(load_fusion_head(zoo, head), fs, sequences, role, ties=ties, exclude=exclude)
    rows = fs.rows(role)
    owners = fs.owner[rows]
    if sorted(owners.tolist()) != list(range(len(sequences))):
        raise ValueError("the feature set does not hold exactly one row per user for this split")
    exclude = [list(sequences[int(u)][:-cut]) for u in owners] if mask_history else None
    ranks = rank_rows(
        load_head_weight(zoo, head), fs.feats[rows], fs.targets[rows], ties=ties, exclude=exclude
    )
    out = torch.empty_like(ranks)
    out[owners] = ranks
    return out
