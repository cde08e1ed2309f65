"""The head kinds, by the "head" string a head's meta records: the one place that dispatches on kind.

To add a kind: write its module in this package (a `HeadKind` subclass: train, load, ranks, top_k,
extend), then add its instance to `REGISTRY`. Nothing heavy is imported here.
"""

from __future__ import annotations

from typing import Any

from st2si_cli.errors import MismatchError
from st2si_cli.heads.adapter import ADAPTER, SASREC
from st2si_cli.heads.base import HeadKind
from st2si_cli.heads.fusion import FUSION
from st2si_cli.heads.ilp import ILP, ILP_TEXT
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo

REGISTRY: tuple[HeadKind, ...] = (ILP, ILP_TEXT, ADAPTER, SASREC, FUSION)
DEFAULT = ILP  # what `adapt` trains without --head: the paper's ILP
KINDS = tuple(kind.name for kind in REGISTRY)
_BY_NAME = {kind.name: kind for kind in REGISTRY}


def get_kind(name: str) -> HeadKind:
    """The kind called `name` (ilp, ilp-text, adapter, sasrec, fusion)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise MismatchError(f"no head kind {name!r}: the kinds are {', '.join(KINDS)}") from None


def kind_of(head: Artifact) -> HeadKind:
    """The kind of a stored head (a head without a "head" string is the ILP of a pretrain)."""
    return get_kind(HeadMeta.of(head).kind)


def kind_for_config(cfg: Any) -> HeadKind:
    """The kind that training settings given to `adapt` train (None: the paper's ILP)."""
    for kind in REGISTRY:
        if kind.accepts(cfg):
            return kind
    raise MismatchError(f"no head kind trains with {type(cfg).__name__} settings")


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
    """Full-ranking rank of each user's VALID or TEST target under `head`, in user order ([n_users] long):
    the one scoring path of `eval` and the benchmarks.

    `fs` is the feature set of the head's backbone and text settings on its dataset. With
    `mask_history`, items of the user's input history are not ranked (the target itself always is).
    """
    from st2si_cli.model.samples import VALID

    cut = 2 if role == VALID else 1
    exclude = [list(seq[:-cut]) for seq in sequences] if mask_history else None
    kind = kind_of(head)
    return kind.ranks(kind.load(zoo, head), fs, sequences, role, ties=ties, exclude=exclude)
