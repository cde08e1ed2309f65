"""The st2si side of the quality benchmark: which heads to score, the paper-faithful ILP, and one row per
head (validation and test metrics, history unmasked and masked, from the head's cached features)."""

from __future__ import annotations

from typing import Any

from bench.common import log
from bench.quality_stats import KS, metric_key, rank_key


def st2si_heads(zoo: Any, domain: str, refs: list[str]) -> list[Any]:
    """The heads named, else every head of the domain (newest first)."""
    if refs:
        return [zoo.get(r, kind="head") for r in refs]
    return zoo.ls(kind="head", domain=domain)


def is_paper_ilp(head: Any) -> bool:
    """The paper-faithful ILP: random init, constant learning rate, frozen backbone, no sweep, and the
    paper's item text (titles as they are, '.' as the query token)."""
    train = head.meta.get("train") or {}
    text = head.meta.get("text") or {}
    return (
        text.get("attributes", ["title"]) == ["title"]
        and not text.get("trim_periods", False)
        and text.get("query", "dot") == "dot"
        and head.meta.get("method") == "ilp"
        and head.meta.get("head", "ilp") == "ilp"
        and "sweep" not in head.meta
        and train.get("schedule", "constant") == "constant"
        and train.get("init", "random") == "random"
        and train.get("dropout", 0.0) == 0.0
    )


def head_features(zoo: Any, head: Any, dataset_art: Any, compute_on: str | None) -> Any | None:
    """The FeatureSet a head scores from: its own cache, the same key recomputed on device `compute_on`,
    or None (`compute_on` None: never compute)."""
    from st2si_cli import (
        FeatureOptions,
        cache_key,
        cache_name,
        dtype_name,
        get_features,
        head_text_config,
        load_feature_set,
        resolve_dtype,
    )

    ref = head.meta.get("inputs", {}).get("features")
    art = zoo.find(ref, kind="features") if ref else None
    if art is None:
        key = cache_key(
            head.meta["backbone"],
            dataset_art.id,
            head_text_config(head),
            dtype_name(resolve_dtype(head.meta.get("dtype") or "auto")),
            True,
        )
        art = zoo.find(cache_name(key), kind="features")
    if art is not None:
        return load_feature_set(zoo, art)
    if compute_on is None:
        return None
    log(f"Computing features for head {head.name} (one forward pass over the dataset)")
    _, fs, _ = get_features(
        zoo,
        head.meta["backbone"],
        dataset_art,
        head_text_config(head),
        FeatureOptions(dtype=head.meta.get("dtype") or "auto", device=compute_on),
    )
    return fs


def st2si_row(
    zoo: Any, head: Any, ds: Any, dataset_art: Any, compute_on: str | None
) -> dict[str, Any] | None:
    from st2si_cli import TEST, VALID, check_compatible, head_kind, metrics_from_ranks, user_ranks

    check_compatible(head, dataset=dataset_art)
    fs = head_features(zoo, head, dataset_art, compute_on)
    if fs is None:
        log(
            f"head {head.name}: no cached features for its backbone and text settings; skipped "
            "(rerun with --compute-features)"
        )
        return None
    kind = head_kind(head)
    method = head.meta.get("method", "ilp")
    label = f"st2si {kind}" + (" (fully tuned backbone)" if method == "full" else "")
    timings = head.meta.get("timings", {})
    row: dict[str, Any] = {
        "model": f"{label} [{head.name}]",
        "source": "st2si",
        "head": head.name,
        "head_id": head.id,
        "kind": kind,
        "method": method,
        "paper_ilp": is_paper_ilp(head),
        "backbone": head.meta.get("backbone_name"),
        "best_epoch": head.meta.get("best_epoch"),
        "epochs_run": len(head.meta.get("history", [])),
        "train": head.meta.get("train"),
        "sweep": (head.meta.get("sweep") or {}).get("chosen"),
        "text": head.meta.get("text"),
        "train_seconds": timings.get("training_seconds"),
        "features_seconds": (timings.get("features_cached") or {}).get("seconds"),
        "history": [
            {
                "epoch": r["epoch"],
                "valid_NDCG@10": r.get("valid_NDCG@10"),
                "loss": r.get("loss"),
                "seconds": r.get("seconds"),
            }
            for r in head.meta.get("history", [])
        ],
        "metrics_source": "st2si_cli.metrics on st2si_cli.heads.registry.user_ranks (cached features)",
    }
    valid = user_ranks(zoo, head, fs, ds.sequences, VALID)
    row["valid_metrics"] = metrics_from_ranks(valid, KS)
    for masked in (False, True):
        ranks = user_ranks(zoo, head, fs, ds.sequences, TEST, mask_history=masked)
        row[rank_key(masked)] = ranks.tolist()
        row[metric_key(masked)] = metrics_from_ranks(ranks, KS)
    return row
