"""The sequence-adapter head (`st2si_cli.model.adapter`): a SASRec over the language model's query
features at every position of a history, with item IDs, scoring items by their text features and IDs.

It trains on the same feature cache as the ILP (`st2si_cli.train.adapter`), so the backbone never runs
in its loop. New items need no map: their text features are appended, their ID embedding is the
unknown ID's (or, with neighbour placement, their nearest trained item's).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from st2si_cli.heads.base import PLAIN, HeadKind, How, Placing, Trained, batched_top_k, budget_cut
from st2si_cli.heads.store import head_meta, stored_module_args
from st2si_cli.progress import Reporter
from st2si_cli.zoo.store import Artifact, Zoo


class AdapterKind(HeadKind):
    """The sequence adapter (`use_text=True`), or with its text path off an ID-only SASRec ("sasrec")."""

    config_kind = "st2si-adapter-head"
    reads_every_query = True

    def __init__(self, name: str = "adapter", *, use_text: bool = True) -> None:
        self.name = name
        self.use_text = use_text

    def default_config(self) -> Any:
        from st2si_cli.model.adapter import AdapterConfig

        return AdapterConfig(use_text=self.use_text)

    def accepts(self, cfg: Any) -> bool:
        from st2si_cli.model.adapter import AdapterConfig

        return isinstance(cfg, AdapterConfig) and bool(cfg.use_text) == self.use_text

    def train(self, fs: Any, ds: Any, cfg: Any, *, reporter: Reporter, how: How = PLAIN) -> Trained:
        """An adapter trained with early stopping on validation NDCG@10 (the best of a sweep of
        `ADAPTER_GRID` with `how.sweep_trials`)."""
        from st2si_cli.model.adapter import load_adapter
        from st2si_cli.model.samples import TEST, VALID
        from st2si_cli.train.adapter import evaluate_adapter, train_adapter
        from st2si_cli.train.sweep import ADAPTER_GRID, ADAPTER_SWEEP_BASE, train_maybe_swept

        cfg = cfg or self.default_config()
        if bool(cfg.use_text) != self.use_text:
            raise ValueError(f"a {self.name} head trains with use_text={self.use_text}")

        def train(c: Any) -> Any:
            init = how.start if how.sweep_trials is None else None
            return train_adapter(
                fs,
                ds.sequences,
                ds.n_items,
                c,
                on_epoch=reporter.epoch,
                deadline=how.deadline,
                init_state=init,
            )

        cfg, result, seconds, sweep_meta = train_maybe_swept(
            cfg,
            train,
            ADAPTER_GRID,
            ADAPTER_SWEEP_BASE,
            how.sweep_trials,
            reporter.message,
            deadline=how.deadline,
        )
        d_feat = int(fs.feats.shape[1])
        model = load_adapter(result.state_dict, cfg.to_dict(), d_feat, ds.n_items)
        metrics = {
            split: evaluate_adapter(model, fs, ds.sequences, role, ties=cfg.ties)
            for split, role in (("valid", VALID), ("test", TEST))
        }
        meta = head_meta(
            "adapter",
            kind=self.name,
            train=cfg.to_dict(),
            metrics={**metrics, "alignment": {}},
            best_epoch=result.best_epoch,
            history=result.history,
            timings={"training_seconds": round(seconds, 2)},
            d_feat=d_feat,
            sweep=sweep_meta,
            cut_by_budget=budget_cut(result, sweep_meta),
        )
        config = {
            "kind": self.config_kind,
            "n_items": ds.n_items,
            "hidden": int(cfg.hidden),
            "adapter": cfg.to_dict(),
            "d_feat": d_feat,
        }
        return Trained(result.state_dict, config, meta)

    def load(self, zoo: Zoo, head: Artifact) -> Any:
        from st2si_cli.model.adapter import load_adapter

        return load_adapter(*stored_module_args(zoo, head))

    def ranks(
        self, scorer: Any, fs: Any, sequences: Any, role: int, *, ties: str, exclude: Any = None
    ) -> Any:
        from st2si_cli.train.adapter import adapter_ranks

        return adapter_ranks(scorer, fs, sequences, role, ties=ties, exclude=exclude)

    def score_batches(
        self, scorer: Any, fs: Any, sequences: Any, role: int, batch: int
    ) -> Iterator[tuple[Any, Any]]:
        from st2si_cli.train.adapter_data import eval_windows, user_sequences

        scorer.eval()
        windows = eval_windows(user_sequences(fs, sequences), role, scorer.cfg.max_len)
        for b0 in range(0, len(windows), batch):
            yield adapter_last_scores(scorer, fs, windows[b0 : b0 + batch])

    def top_k(
        self, scorer: Any, feats: list[Any], catalog_ids: list[list[int | None]], k: int, exclude: Any
    ) -> tuple[Any, Any]:
        return batched_top_k(scorer.score_histories, feats, catalog_ids, k, exclude)

    def extend(
        self, zoo: Zoo, head: Artifact, tensors: dict[str, Any], placing: Placing
    ) -> tuple[dict, dict]:
        from st2si_cli.heads.placement import extend_adapter

        new = extend_adapter(tensors, placing.text, placing.n_items, placing.id_from)
        return new, {"method": "adapter item text" + (" + neighbour ID embedding" if placing.id_from else "")}

    def id_only(self, train: Any) -> bool:
        return not self.use_text or (train or {}).get("use_text") is False


ADAPTER = AdapterKind()
# SASRec on item IDs inside the tool: the adapter with its text path off, the reference the LM heads are
# shown against. It trains on the same feature cache's layout (rows, targets, roles) and reads no feature.
SASREC = AdapterKind("sasrec", use_text=False)


def adapter_last_scores(adapter: Any, fs: Any, windows: Any) -> tuple[Any, Any]:
    """(scores [b, N], targets [b]) of the adapter at the last position of each window."""
    import torch

    from st2si_cli.train.adapter_data import collate

    feats, ids, lengths, targets = collate(fs, windows, adapter.n_items, feats=adapter.cfg.use_text)
    with torch.no_grad():
        scores = adapter.score_last(feats, ids, lengths)
    return scores, targets[torch.arange(len(lengths)), lengths - 1]
