"""Fusion heads: the ILP and the sequence adapter of one feature cache, their log-probabilities mixed.

    score(item) = w * log p_ILP(item) + (1 - w) * log p_adapter(item)

The weight w is chosen on validation NDCG@10 from a fixed grid (test is read once, after the choice).
The two parts read different evidence: the ILP the language model's last query feature through a
full-rank projection, the adapter the sequence of query features with item IDs and item text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from st2si_cli.errors import MismatchError
from st2si_cli.zoo.store import Artifact, Zoo

HEAD_KIND = "fusion"
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ADAPTER_PREFIX = "adapter."


@dataclass
class Fusion:
    ilp_weight: Any  # [N, d]
    adapter: Any  # SequenceAdapter, eval mode
    w: float  # weight of the ILP's log-probabilities

    def mix(self, ilp_scores: Any, adapter_scores: Any) -> Any:
        import torch

        return self.w * torch.log_softmax(ilp_scores.float(), 1) + (1 - self.w) * torch.log_softmax(
            adapter_scores.float(), 1
        )

    def history_scores(self, feats: list[Any], catalog_ids: list[list[int | None]]) -> Any:
        """Scores [B, N] of histories given as query features (newest window) and catalog IDs."""
        import torch

        from st2si_cli.adapter_head import adapter_history_scores

        last = torch.stack([f[-1].float() for f in feats])
        return self.mix(
            last @ self.ilp_weight.float().T, adapter_history_scores(self.adapter, feats, catalog_ids)
        )


def _split_scores(fusion: Fusion, fs: Any, sequences: Any, role: int) -> tuple[Any, Any, Any]:
    """(ILP scores, adapter scores, targets) of each user's VALID or TEST target, in user order."""
    import torch

    from st2si_cli.train.adapter import EVAL_BATCH
    from st2si_cli.train.adapter_data import collate, eval_windows, user_sequences

    rows = fs.rows(role)
    order = torch.argsort(fs.owner[rows])
    rows = rows[order]
    ilp = fs.feats[rows].float() @ fusion.ilp_weight.float().T
    windows = eval_windows(user_sequences(fs, sequences), role, fusion.adapter.cfg.max_len)
    parts = []
    with torch.no_grad():
        for b0 in range(0, len(windows), EVAL_BATCH):
            feats, ids, lengths, _ = collate(fs, windows[b0 : b0 + EVAL_BATCH], fusion.adapter.n_items)
            parts.append(fusion.adapter.score_last(feats, ids, lengths))
    return ilp, torch.cat(parts), fs.targets[rows]


def fusion_ranks(
    fusion: Fusion, fs: Any, sequences: Any, role: int, *, ties: str = "pessimistic", exclude: Any = None
) -> Any:
    from st2si_cli.metrics import rank_of_target

    ilp, adapter, targets = _split_scores(fusion, fs, sequences, role)
    return rank_of_target(fusion.mix(ilp, adapter), targets, ties=ties, exclude=exclude)


def fuse_heads(
    zoo: Zoo,
    ilp: Artifact,
    adapter: Artifact,
    *,
    name: str | None = None,
    weights: tuple[float, ...] = WEIGHTS,
) -> Artifact:
    """Store the fusion of an ILP head and an adapter head of the same cache, w chosen on validation."""
    import time

    from st2si_cli.adapter_head import load_adapter_head
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.features import load_feature_set
    from st2si_cli.heads import (
        HeadOrigin,
        head_kind,
        head_text_config,
        load_head_tensors,
        load_head_weight,
        store_head,
    )
    from st2si_cli.metrics import metrics_from_ranks, rank_of_target
    from st2si_cli.model.samples import TEST, VALID

    t0 = time.time()
    if head_kind(ilp) not in ("ilp", "ilp-text") or head_kind(adapter) != "adapter":
        raise MismatchError(
            f"fuse needs an ILP head and an adapter head, not {head_kind(ilp)} and {head_kind(adapter)}"
        )
    for key in ("backbone", "dataset", "catalog_hash", "text"):
        if ilp.meta.get(key) != adapter.meta.get(key):
            raise MismatchError(f"heads {ilp.name} and {adapter.name} differ in {key}: they cannot be fused")
    feats_ref = adapter.meta.get("inputs", {}).get("features") or ilp.meta.get("inputs", {}).get("features")
    fs = load_feature_set(zoo, zoo.get(feats_ref, kind="features"))
    dataset = zoo.get(ilp.meta["dataset"], kind="dataset")
    ds = load_dataset(zoo, dataset.id)
    fusion = Fusion(load_head_weight(zoo, ilp).float(), load_adapter_head(zoo, adapter), 0.0)
    ilp_s, ad_s, targets = _split_scores(fusion, fs, ds.sequences, VALID)
    trials = []
    for w in weights:
        fusion.w = w
        trials.append(
            {
                "w": w,
                "valid_ndcg10": metrics_from_ranks(rank_of_target(fusion.mix(ilp_s, ad_s), targets))[
                    "NDCG@10"
                ],
            }
        )
    best = max(trials, key=lambda t: t["valid_ndcg10"])  # first of equals: the grid's order
    fusion.w = best["w"]
    metrics = {
        "valid": metrics_from_ranks(rank_of_target(fusion.mix(ilp_s, ad_s), targets)),
        "test": metrics_from_ranks(fusion_ranks(fusion, fs, ds.sequences, TEST)),
        "alignment": {},
    }
    tensors = {"ilp.weight": fusion.ilp_weight.contiguous()}
    tensors.update({ADAPTER_PREFIX + k: v for k, v in load_head_tensors(zoo, adapter).items()})
    meta = {
        "method": "fusion",
        "head": HEAD_KIND,
        "dtype": ilp.meta.get("dtype"),
        "inputs": {"features": feats_ref, "ilp_head": ilp.id, "adapter_head": adapter.id},
        "train": {"w": fusion.w, "ilp": ilp.meta.get("train"), "adapter": adapter.meta.get("train")},
        "d_feat": int(adapter.meta["d_feat"]),
        "sweep": {
            "selection": "best validation NDCG@10 (test never seen)",
            "grid": {"w": list(weights)},
            "chosen": {"w": fusion.w},
            "trials": trials,
        },
        "metrics": metrics,
        "protocol": {"ties": "pessimistic", "mask_history": False, "ranking": "full"},
        "best_epoch": None,
        "history": [],
        "timings": {"training_seconds": round(time.time() - t0, 2)},
    }
    backbone = zoo.get(ilp.meta["backbone"], kind="backbone")
    origin = HeadOrigin(ilp.domain or dataset.name, backbone, dataset, head_text_config(ilp), name)
    config = {"kind": "st2si-fusion-head", "n_items": ds.n_items, "hidden": int(fusion.ilp_weight.shape[1])}
    return store_head(zoo, tensors, origin, config, meta)


def load_fusion_head(zoo: Zoo, head: Artifact) -> Fusion:
    from st2si_cli.heads import load_head_tensors
    from st2si_cli.train.adapter import load_adapter

    tensors = load_head_tensors(zoo, head)
    adapter_tensors = {
        k[len(ADAPTER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(ADAPTER_PREFIX)
    }
    adapter = load_adapter(
        adapter_tensors, head.meta["train"]["adapter"], int(head.meta["d_feat"]), int(head.meta["n_items"])
    )
    return Fusion(tensors["ilp.weight"], adapter, float(head.meta["train"]["w"]))
