"""Fusion heads: the ILP and sequence adapters of one feature cache, their log-probabilities mixed.

    score(item) = w * log p_ILP(item) + (1 - w) * mean_k log p_adapter_k(item)

The weight w is chosen on validation NDCG@10 from a fixed grid (test is read once, after the choice).
The parts read different evidence: the ILP the language model's last query feature through a
full-rank projection, the adapter the sequence of query features with item IDs and item text. Several
adapters (e.g. trained from different seeds) are averaged as an ensemble before the mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from st2si_cli.errors import MismatchError
from st2si_cli.zoo.meta import Inputs
from st2si_cli.zoo.store import Artifact, Zoo

HEAD_KIND = "fusion"
WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
ADAPTER_PREFIX = "adapter."  # the first adapter's tensors; adapter{k}. for the k-th (k >= 1)


def adapter_prefix(k: int) -> str:
    return ADAPTER_PREFIX if k == 0 else f"adapter{k}."


@dataclass
class Fusion:
    ilp_weight: Any  # [N, d]
    adapters: list[Any]  # SequenceAdapters, eval mode
    w: float  # weight of the ILP's log-probabilities

    def mix(self, ilp_scores: Any, adapter_scores: list[Any]) -> Any:
        import torch

        adapters = torch.stack([torch.log_softmax(a.float(), 1) for a in adapter_scores]).mean(0)
        return self.w * torch.log_softmax(ilp_scores.float(), 1) + (1 - self.w) * adapters

    def history_scores(self, feats: list[Any], catalog_ids: list[list[int | None]]) -> Any:
        """Scores [B, N] of histories given as query features (newest window) and catalog IDs."""
        import torch

        from st2si_cli.adapter_head import adapter_history_scores

        last = torch.stack([f[-1].float() for f in feats])
        return self.mix(
            last @ self.ilp_weight.float().T,
            [adapter_history_scores(a, feats, catalog_ids) for a in self.adapters],
        )


def _split_scores(fusion: Fusion, fs: Any, sequences: Any, role: int) -> tuple[Any, list[Any], Any]:
    """(ILP scores, each adapter's scores, targets) of each user's VALID or TEST target, in user order."""
    import torch

    from st2si_cli.train.adapter import EVAL_BATCH
    from st2si_cli.train.adapter_data import collate, eval_windows, user_sequences

    rows = fs.rows(role)
    order = torch.argsort(fs.owner[rows])
    rows = rows[order]
    ilp = fs.feats[rows].float() @ fusion.ilp_weight.float().T
    users = user_sequences(fs, sequences)
    scores = []
    for adapter in fusion.adapters:
        windows = eval_windows(users, role, adapter.cfg.max_len)
        parts = []
        with torch.no_grad():
            for b0 in range(0, len(windows), EVAL_BATCH):
                feats, ids, lengths, _ = collate(fs, windows[b0 : b0 + EVAL_BATCH], adapter.n_items)
                parts.append(adapter.score_last(feats, ids, lengths))
        scores.append(torch.cat(parts))
    return ilp, scores, fs.targets[rows]


def fusion_ranks(
    fusion: Fusion, fs: Any, sequences: Any, role: int, *, ties: str = "pessimistic", exclude: Any = None
) -> Any:
    from st2si_cli.metrics import rank_of_target

    ilp, adapter, targets = _split_scores(fusion, fs, sequences, role)
    return rank_of_target(fusion.mix(ilp, adapter), targets, ties=ties, exclude=exclude)


def fuse_heads(
    zoo: Zoo,
    ilp: Artifact,
    adapters: list[Artifact],
    *,
    name: str | None = None,
    weights: tuple[float, ...] = WEIGHTS,
) -> Artifact:
    """Store the fusion of an ILP head and adapter heads of the same cache, w chosen on validation."""
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
    if not adapters:
        raise MismatchError("fuse needs at least one adapter head")
    if head_kind(ilp) not in ("ilp", "ilp-text"):
        raise MismatchError(f"fuse needs an ILP head first, not a {head_kind(ilp)} head ({ilp.name})")
    for adapter in adapters:
        if head_kind(adapter) != "adapter":
            raise MismatchError(f"fuse mixes adapter heads with the ILP, not a {head_kind(adapter)} head")
        for key in ("backbone", "dataset", "catalog_hash", "text"):
            if ilp.meta.get(key) != adapter.meta.get(key):
                raise MismatchError(
                    f"heads {ilp.name} and {adapter.name} differ in {key}: they cannot be fused"
                )
    feats_refs = {Inputs.of(head).first("features") for head in (*adapters, ilp)} - {None}
    if len(feats_refs) != 1:
        raise MismatchError("the heads to fuse were trained on different feature caches")
    feats_ref = feats_refs.pop()
    fs = load_feature_set(zoo, zoo.get(feats_ref, kind="features"))
    dataset = zoo.get(ilp.meta["dataset"], kind="dataset")
    ds = load_dataset(zoo, dataset.id)
    fusion = Fusion(load_head_weight(zoo, ilp).float(), [load_adapter_head(zoo, a) for a in adapters], 0.0)
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
    for k, adapter in enumerate(adapters):
        tensors.update({adapter_prefix(k) + n: v for n, v in load_head_tensors(zoo, adapter).items()})
    inputs: dict[str, Any] = {"features": feats_ref, "ilp_head": ilp.id, "adapter_head": adapters[0].id}
    train: dict[str, Any] = {
        "w": fusion.w,
        "ilp": ilp.meta.get("train"),
        "adapter": adapters[0].meta.get("train"),
    }
    if len(adapters) > 1:  # written only for ensembles, so a one-adapter fusion keeps its old identity
        inputs["adapter_heads"] = [a.id for a in adapters]
        train["adapters"] = [a.meta.get("train") for a in adapters]
    meta = {
        "method": "fusion",
        "head": HEAD_KIND,
        "dtype": ilp.meta.get("dtype"),
        "inputs": inputs,
        "train": train,
        "d_feat": int(adapters[0].meta["d_feat"]),
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
    train = head.meta["train"]
    configs = train.get("adapters") or [train["adapter"]]
    adapters = []
    for k, cfg in enumerate(configs):
        prefix = adapter_prefix(k)
        part = {n[len(prefix) :]: v for n, v in tensors.items() if n.startswith(prefix)}
        adapters.append(load_adapter(part, cfg, int(head.meta["d_feat"]), int(head.meta["n_items"])))
    return Fusion(tensors["ilp.weight"], adapters, float(train["w"]))
