"""The paper's head: an item linear projection (ILP) [N, d] over the last query feature.

Two kinds share it: "ilp" (random init, as the paper) and "ilp-text" (each row starts from its item's
alignment feature). They differ in how rows for new items are placed: by ridge regression from the
item's text feature, or by the text init's own map (`placement.py`). A pretrain stores ILP heads too.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from st2si_cli.heads.base import PLAIN, HeadKind, How, Placing, Trained, budget_cut
from st2si_cli.heads.store import HeadOrigin, head_meta, load_head_weight, store_head
from st2si_cli.progress import Reporter
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo

CONFIG_KIND = "st2si-ilp-head"


class IlpKind(HeadKind):
    config_kind = CONFIG_KIND
    reads_every_query = False

    def __init__(self, name: str, init: str, own_map: str) -> None:
        self.name = name
        self.init = init  # HeadConfig.init of this kind: random | text
        self.own_map = own_map  # how rows for new items are placed by default: ridge | text

    def default_config(self) -> Any:
        from st2si_cli.train.head import HeadConfig

        return HeadConfig(init=self.init)

    def accepts(self, cfg: Any) -> bool:
        from st2si_cli.train.head import HeadConfig

        return (cfg is None and self.init == "random") or (
            isinstance(cfg, HeadConfig) and cfg.init == self.init
        )

    def train(self, fs: Any, ds: Any, cfg: Any, *, reporter: Reporter, how: How = PLAIN) -> Trained:
        from st2si_cli.model.samples import TEST, VALID
        from st2si_cli.train.head import alignment_accuracy, evaluate_split, steps_per_epoch, train_head
        from st2si_cli.train.sweep import ILP_GRID, ILP_SWEEP_BASE, train_maybe_swept

        cfg = cfg or self.default_config()

        def train(c: Any) -> Any:
            reporter.training_start(steps_per_epoch(fs, c), c.max_epochs)
            init = how.start["weight"] if how.start is not None and how.sweep_trials is None else None
            return train_head(
                fs,
                ds.n_items,
                c,
                on_epoch=reporter.epoch,
                on_step=reporter.training_step,
                init=init,
                deadline=how.deadline,
            )

        cfg, result, seconds, sweep_meta = train_maybe_swept(
            cfg, train, ILP_GRID, ILP_SWEEP_BASE, how.sweep_trials, reporter.message, deadline=how.deadline
        )
        metrics = {
            "valid": evaluate_split(result.weight, fs, VALID, ties=cfg.ties),
            "test": evaluate_split(result.weight, fs, TEST, ties=cfg.ties),
            "alignment": alignment_accuracy(result.weight, fs),
        }
        meta = head_meta(
            "ilp",
            kind=self.name,
            train=cfg.to_dict(),
            metrics=metrics,
            best_epoch=result.best_epoch,
            history=result.history,
            timings={"training_seconds": round(seconds, 2)},
            sweep=sweep_meta,
            cut_by_budget=budget_cut(result, sweep_meta),
        )
        return Trained(*ilp_tensors(result.weight), meta)

    def load(self, zoo: Zoo, head: Artifact) -> Any:
        return load_head_weight(zoo, head)

    def ranks(
        self, scorer: Any, fs: Any, sequences: Any, role: int, *, ties: str, exclude: Any = None
    ) -> Any:
        import torch

        from st2si_cli.model.scoring import rank_rows

        rows = fs.rows(role)
        owners = fs.owner[rows]
        if sorted(owners.tolist()) != list(range(len(sequences))):
            raise ValueError("the feature set does not hold exactly one row per user for this split")
        by_row = [exclude[int(u)] for u in owners] if exclude is not None else None
        ranks = rank_rows(scorer, fs.feats[rows], fs.targets[rows], ties=ties, exclude=by_row)
        out = torch.empty_like(ranks)
        out[owners] = ranks
        return out

    def score_batches(
        self, scorer: Any, fs: Any, sequences: Any, role: int, batch: int
    ) -> Iterator[tuple[Any, Any]]:
        yield from ilp_score_batches(scorer, fs, user_rows(fs, role, len(sequences)), batch)

    def top_k(
        self, scorer: Any, feats: list[Any], catalog_ids: list[list[int | None]], k: int, exclude: Any
    ) -> tuple[Any, Any]:
        import torch

        from st2si_cli.model.scoring import top_k

        # chunked over the catalog: bounded memory for any catalog size
        return top_k(scorer, torch.stack([f[-1] for f in feats]), k, exclude=exclude)

    def extend(
        self, zoo: Zoo, head: Artifact, tensors: dict[str, Any], placing: Placing
    ) -> tuple[dict, dict]:
        from st2si_cli.heads.placement import ilp_rows, set_rows

        rows, info = ilp_rows(tensors["weight"], self.own_map, placing)
        return {"weight": set_rows(tensors["weight"], rows, placing.n_items)}, info

    def ilp_weight(self, zoo: Zoo, head: Artifact) -> Any:
        return load_head_weight(zoo, head)


ILP = IlpKind("ilp", init="random", own_map="ridge")
ILP_TEXT = IlpKind("ilp-text", init="text", own_map="text")
ILP_KINDS = {kind.name: kind for kind in (ILP, ILP_TEXT)}


def ilp_tensors(weight: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, config) of an ILP head with `weight` [N, d]."""
    import torch

    config = {"kind": CONFIG_KIND, "n_items": int(weight.shape[0]), "hidden": int(weight.shape[1])}
    return {"weight": weight.detach().to(torch.float32)}, config


def save_ilp_head(zoo: Zoo, weight: Any, origin: HeadOrigin, meta: dict[str, Any]) -> Artifact:
    """Store an ILP `weight` [N, d] as safetensors with a self-describing config (a pretrain's heads)."""
    tensors, config = ilp_tensors(weight)
    return store_head(zoo, tensors, origin, config, meta)


def is_ilp_head(head: Artifact) -> bool:
    """Whether `head` is an ILP head of any origin (adapt, pretrain), which a pretrain may start from."""
    meta = HeadMeta.of(head)
    return meta.config_kind == CONFIG_KIND and meta.kind in ILP_KINDS


def user_rows(fs: Any, role: int, n_users: int) -> Any:
    """The feature rows of the VALID or TEST targets, in user order (one per user)."""
    import torch

    rows = fs.rows(role)
    owners = fs.owner[rows]
    if sorted(owners.tolist()) != list(range(n_users)):
        raise ValueError("the feature set does not hold exactly one row per user for this split")
    return rows[torch.argsort(owners)]


def ilp_score_batches(weight: Any, fs: Any, rows: Any, batch: int) -> Iterator[tuple[Any, Any]]:
    """(scores, targets) of the ILP `weight` over `rows` of the feature set, `batch` rows at a time."""
    w = weight.float()
    for b0 in range(0, len(rows), batch):
        r = rows[b0 : b0 + batch]
        yield fs.feats[r].float() @ w.T, fs.targets[r]
