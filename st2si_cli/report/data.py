"""The content of a domain's report, as plain data (what `st2si report --json` prints).

Everything comes from the zoo's records (dataset statistics, each head's metrics, per-epoch history,
timings and settings) plus one scoring pass per head over its cached features (`top_lists`): the
beyond-accuracy metrics of every head, and the top-k lists of the default head for the users shown.
Nothing is trained, nothing goes through the backbone, and nothing is written to the zoo.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from st2si_cli.errors import St2siError
from st2si_cli.report.reproduce import name_of, reproduce
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

CURVE_METRIC = "NDCG@10"
MAX_PLOT_POINTS = 240


def _round(x: Any, digits: int = 6) -> Any:
    return round(x, digits) if isinstance(x, float) else x


# ---- the domain --------------------------------------------------------------------------------------
def _length_histogram(lengths: list[int], bins: int = 24) -> list[list[int]]:
    """[[low, high, users], ...]: users by history length, in equal-width bins (inclusive bounds)."""
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts: dict[int, int] = {}
    for n in lengths:
        b = (n - lo) // width
        counts[b] = counts.get(b, 0) + 1
    return [[lo + b * width, lo + (b + 1) * width - 1, counts.get(b, 0)] for b in range(max(counts) + 1)]


def _long_tail(popularity: Sequence[int]) -> dict[str, Any]:
    """The sorted popularity curve (at most MAX_PLOT_POINTS points, log-spaced ranks) and its shape."""
    counts = sorted((int(c) for c in popularity), reverse=True)
    n, total = len(counts), sum(counts)
    ranks = sorted({max(1, round(n ** (i / (MAX_PLOT_POINTS - 1)))) for i in range(MAX_PLOT_POINTS)} | {n})
    top = max(1, n // 5)
    return {
        "points": [[r, counts[r - 1]] for r in ranks] if n else [],
        "top_20pct_share": _round(sum(counts[:top]) / total) if total else 0.0,
        "items_never_seen": sum(1 for c in counts if c == 0),
        "max": counts[0] if n else 0,
        "median": statistics.median(counts) if n else 0,
    }


def _domain(zoo: Zoo, art: Artifact, ds: Any, popularity: Sequence[int]) -> dict[str, Any]:
    from st2si_cli.data.catalog import catalog_versions, retired_items

    dm = DatasetMeta.of(art)
    lengths = [len(s) for s in ds.sequences]
    versions = catalog_versions(zoo, art)
    first = versions[0] if versions and versions[0]["change"] == "prepare" else None
    return {
        "name": art.domain or art.name,
        "dataset_id": art.id,
        "source": dm.source_name or dm.format,
        "items": len(ds.items),
        "users": len(ds.sequences),
        "interactions": sum(lengths),
        "retired": len(retired_items(zoo, art)),
        "catalog_version": dm.catalog.version,
        "catalog_versions": [{k: v[k] for k in ("version", "items", "retired", "change")} for v in versions],
        "first_new_item": first["items"] if first and first["items"] < len(ds.items) else None,
        "history_length": {
            "min": min(lengths) if lengths else 0,
            "median": statistics.median(lengths) if lengths else 0,
            "mean": _round(sum(lengths) / len(lengths), 2) if lengths else 0,
            "max": max(lengths) if lengths else 0,
            "histogram": _length_histogram(lengths) if lengths else [],
        },
        "popularity": _long_tail(popularity),
    }


# ---- heads -------------------------------------------------------------------------------------------
def _curve(history: list[Any]) -> list[dict[str, Any]]:
    """Per epoch: {"epoch", "loss", "valid_NDCG@10"} where the record has them."""
    out = []
    for i, rec in enumerate(history):
        if not isinstance(rec, dict):
            continue
        valid = rec.get("valid") if isinstance(rec.get("valid"), dict) else {}
        point = {
            "epoch": rec.get("epoch", i + 1),
            "loss": rec.get("loss", rec.get("train_loss")),
            f"valid_{CURVE_METRIC}": rec.get(f"valid_{CURVE_METRIC}", valid.get(CURVE_METRIC)),
        }
        if point["loss"] is not None or point[f"valid_{CURVE_METRIC}"] is not None:
            out.append({k: _round(v) for k, v in point.items()})
    return out


def _reference(hm: HeadMeta) -> bool:
    """An in-tool ID-only SASRec: a sequence adapter trained without item text."""
    from st2si_cli.heads.registry import get_kind

    return get_kind(hm.kind).id_only(hm.train)


def _head(zoo: Zoo, head: Artifact) -> dict[str, Any]:
    hm = HeadMeta.of(head)
    t = hm.timings
    sweep = hm.sweep or {}
    return {
        "name": head.name or head.short_id,
        "id": head.id,
        "kind": hm.kind,
        "method": hm.method,
        "backbone": hm.backbone_name or name_of(zoo, hm.backbone),
        "backbone_id": hm.backbone,
        "created": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(head.created)),
        "valid": {k: _round(v) for k, v in hm.metrics.valid.items()},
        "test": {k: _round(v) for k, v in hm.metrics.test.items()},
        "alignment": {k: _round(v) for k, v in hm.metrics.alignment.items()},
        "best_epoch": hm.best_epoch,
        "epochs": len(hm.history),
        "training_seconds": t.get("training_seconds"),
        "features_seconds": t.get("features_seconds"),
        "curve": _curve(hm.history),
        "sweep": [
            {k: _round(v) for k, v in trial.items()}
            for trial in sweep.get("trials") or []
            if isinstance(trial, dict)
        ],
        "fusion_w": hm.fusion_w,
        "placed_items": hm.catalog.text_items,
        "id_only_reference": _reference(hm),
        "beyond": None,
        "beyond_note": None,
        "commands": reproduce(zoo, head),
    }


# ---- the report --------------------------------------------------------------------------------------
def _pick_users(ds: Any, users: Sequence[str], seed: int, n: int) -> list[int]:
    if users:
        index = {u: i for i, u in enumerate(ds.users)}
        missing = [u for u in users if u not in index]
        if missing:
            raise St2siError(f"no user {missing[0]!r} in the dataset (users are named as in its source data)")
        return [index[u] for u in dict.fromkeys(users)]
    return sorted(random.Random(seed).sample(range(len(ds.users)), min(n, len(ds.users))))


def _item(ds: Any, i: int, first_new: int | None) -> dict[str, Any]:
    it = ds.items[i]
    return {
        "index": i,
        "id": it.get("id"),
        "title": it.get("title"),
        "new": first_new is not None and i >= first_new,
    }


def build_report(
    zoo: Zoo,
    domain: str,
    *,
    users: Sequence[str] = (),
    seed: int = 0,
    k: int = 10,
    n_users: int = 3,
    history_shown: int = 10,
    score: bool = True,
) -> dict[str, Any]:
    """The report of `domain` as plain data: the domain, every head, and a few users' recommendations.

    `users`: user keys to show (default: `n_users` drawn with `seed`). `score`: run the scoring pass
    (beyond-accuracy metrics and top-k lists); without it, the records only."""
    from st2si_cli.adapt import read_dataset
    from st2si_cli.data.catalog import retired_items
    from st2si_cli.heads.choice import default_head, lm_over_id_only
    from st2si_cli.metrics.beyond import beyond_accuracy, training_popularity

    if k < 1:
        raise St2siError("k must be at least 1")
    t0 = time.time()
    dataset_art = zoo.get(domain, kind="dataset")
    ds = read_dataset(zoo, dataset_art.id)
    n_items = len(ds.items)
    k = min(k, n_items)  # a list holds at most the whole catalog
    popularity = training_popularity(ds.sequences, n_items)
    dom = _domain(zoo, dataset_art, ds, popularity)
    first_new = dom["first_new_item"]
    catalog_hash = DatasetMeta.of(dataset_art).catalog_hash
    heads, older = [], []
    for a in sorted(zoo.ls(kind="head", domain=domain), key=lambda a: a.created):
        hm = HeadMeta.of(a)
        (heads if hm.catalog_hash == catalog_hash and hm.n_items == n_items else older).append(a)
    choice = default_head(zoo, domain)
    default_id = choice.head.id if choice else None
    retired = retired_items(zoo, dataset_art)
    shown = _pick_users(ds, users, seed, n_users)

    records: list[dict[str, Any]] = []
    lists: dict[str, Any] = {}
    held: dict[str, Any] = {}
    scored = {}
    if score:  # heads grouped by feature cache: each cache is loaded once
        for head in sorted(heads, key=lambda a: Inputs.of(a).first("features") or ""):
            scored[head.id] = _score(zoo, head, ds, k, retired, held)
    held.clear()
    for head in heads:
        rec = _head(zoo, head)
        rec["default"] = head.id == default_id
        if score:
            top, note = scored[head.id]
            rec["beyond_note"] = note
            if top is not None:
                rec["beyond"] = {
                    key: _round(v)
                    for key, v in beyond_accuracy(top.items, popularity, (k,), n_items=n_items).items()
                }
                if head.id == default_id:
                    lists = {"items": top.items, "scores": top.scores, "ranks": top.ranks}
        records.append(rec)

    best = max(  # ties: the newest, as the default head's rule (records are oldest first)
        (r for r in reversed(records) if CURVE_METRIC in r["valid"]),
        key=lambda r: r["valid"][CURVE_METRIC],
        default=None,
    )
    reference = next((r for r in records if r["id_only_reference"]), None)
    user_rows = []
    for u in shown:
        seq = ds.sequences[u]
        history = seq[:-1]  # the test input: every item but the held-out one
        row: dict[str, Any] = {
            "user": ds.users[u],
            "history_length": len(history),
            "history": [_item(ds, i, first_new) for i in history[-history_shown:]],
            "target": _item(ds, seq[-1], first_new),
            "rank": None,
            "top": [],
        }
        if lists:
            row["rank"] = int(lists["ranks"][u])
            hist = set(history)
            for i, s in zip(lists["items"][u].tolist(), lists["scores"][u].tolist()):
                if s == float("-inf"):
                    break
                row["top"].append(
                    {
                        **_item(ds, i, first_new),
                        "score": round(s, 4),
                        "target": i == seq[-1],
                        "seen": i in hist,
                    }
                )
        user_rows.append(row)

    return {
        "domain": dom,
        "k": k,
        "seed": seed,
        "users_given": bool(users),
        "split": "test",
        "default_head": {
            "name": choice.head.name if choice else None,
            "id": default_id,
            "reason": choice.reason if choice else "the domain has no head",
            "best_on_validation": best["name"] if best else None,
            "pinned": bool(choice and choice.pinned),
            "lm_over_id_only": lm_over_id_only(zoo, domain),
        },
        "reference": (
            {"name": reference["name"], "valid": reference["valid"], "test": reference["test"]}
            if reference
            else None
        ),
        "heads": records,
        "older_heads": [
            {"name": a.name or a.short_id, "id": a.id, "n_items": HeadMeta.of(a).n_items} for a in older
        ],
        "users": user_rows,
        "generated": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 2),
    }


def _score(
    zoo: Zoo, head: Artifact, ds: Any, k: int, retired: list[int], held: dict[str, Any]
) -> tuple[Any, str | None]:
    """(the head's test top-k lists, None) from its cached features, or (None, why not)."""
    from st2si_cli.features.cache import load_feature_set
    from st2si_cli.heads.top_lists import user_top_k
    from st2si_cli.model.samples import TEST

    ref = Inputs.of(head).first("features")
    cache = zoo.find(ref, kind="features") if ref else None
    if cache is None:
        return None, "its feature cache is not in the zoo: `st2si eval` computes the metrics"
    fs = held.get(cache.id)
    if fs is None:
        held.clear()  # one feature set in memory at a time (heads are scored by cache)
        fs = held[cache.id] = load_feature_set(zoo, cache)
    try:
        return user_top_k(zoo, head, fs, ds.sequences, TEST, k, never=retired), None
    except ValueError as e:
        return None, f"not scored: {e}"
