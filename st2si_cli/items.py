"""`items add / update / rm`: change a domain's catalog without retraining.

    items file --(parse, check)--> new catalog version --(new items' text, one forward pass each)-->
    each head of the domain extended: rows for the new items placed from their text, others copied

The whole item file is parsed and every head's new tensors are computed before anything is written,
so bad input leaves the zoo as it was. Old dataset versions and old heads stay in the zoo (by ID), so
old evaluations remain reproducible; the names (DOMAIN, the heads' names) move to the new versions.
Each head's feature cache is carried to the new version (history rows unchanged, the new items'
alignment rows appended), so `eval` on the grown catalog needs no new forward pass over the histories.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.data.catalog import read_item_file, retired_items, store_version
from st2si_cli.data.dataset import Dataset, canonical_attributes, natural_key
from st2si_cli.data.formats._io import lone_surrogate, surrogate_message
from st2si_cli.errors import InputError, St2siError, ZooError
from st2si_cli.zoo.meta import FeaturesMeta, HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

ORIGIN_KEYS = ("domain", "text", "backbone", "dataset", "catalog_hash", "versions", "backbone_name", "inputs")
PLACEMENTS = ("auto", "ridge", "text", "neighbour")


@dataclass
class ItemsOptions:
    placement: str = "auto"  # auto: each head's own map (text for ilp-text heads, ridge for the paper's ILP); neighbour: the nearest known item's trained row / ID embedding
    device: str = "cpu"
    batch_tokens: int = 16384
    max_batch: int = 64


@dataclass
class CatalogChange:
    dataset: Artifact  # the new dataset version
    heads: list[tuple[Artifact, Artifact]] = field(default_factory=list)  # (old head, new head)
    skipped: list[tuple[Artifact, str]] = field(default_factory=list)  # heads not extended, and why
    items: list[str] = field(default_factory=list)  # the item keys changed


def add_items(zoo: Zoo, domain: str, path: str | Path, opts: ItemsOptions | None = None) -> CatalogChange:
    """Append the items of `path` to the catalog of `domain` and extend every head of its current catalog."""
    opts = opts or ItemsOptions()
    if opts.placement not in PLACEMENTS:
        raise St2siError(f"placement must be one of {', '.join(PLACEMENTS)}, not {opts.placement!r}")
    items, lines = read_item_file(path)
    parent, ds = _current(zoo, domain)
    known = {item["id"] for item in ds.items}
    for key in items:
        if key in known:
            raise InputError(
                path,
                f"item {key!r} is already in the catalog of {domain} (use `st2si items update`)",
                lines[key],
            )
    keys = sorted(items, key=natural_key)
    grown = Dataset(ds.items + [{"id": k, **items[k]} for k in keys], ds.users, ds.sequences)
    place = list(range(ds.n_items, grown.n_items))
    change = {"change": "add", "added": len(keys)}
    return _new_version(zoo, parent, grown, retired_items(zoo, parent), change, place, opts, keys)


def update_items(
    zoo: Zoo,
    domain: str,
    keys: list[str],
    *,
    attributes: dict[str, str] | None = None,
    retire: bool | None = None,
    opts: ItemsOptions | None = None,
) -> CatalogChange:
    """Retitle (set `attributes`) and/or retire (True) or bring back (False) the items `keys`."""
    opts = opts or ItemsOptions()
    parent, ds = _current(zoo, domain)
    index = {item["id"]: i for i, item in enumerate(ds.items)}
    missing = [k for k in keys if k not in index]
    if missing:
        raise St2siError(f"no item {missing[0]!r} in the catalog of {domain}")
    ids = [index[k] for k in keys]
    retired = set(retired_items(zoo, parent))
    if retire is not None:
        retired = retired | set(ids) if retire else retired - set(ids)
    change: dict[str, Any] = {"change": "update", "updated": len(ids)}
    items = ds.items
    if attributes:
        for name, value in attributes.items():
            if lone_surrogate(value) is not None:  # e.g. bytes that are not UTF-8 on a command line
                raise InputError(None, f"attribute {name!r}: {surrogate_message(value)}")
        attrs = canonical_attributes(attributes)
        if "title" in attributes and "title" not in attrs:
            raise St2siError("a title cannot be empty")
        items = [dict(it) for it in ds.items]
        for i in ids:
            items[i].update(attrs)
        change["attributes"] = sorted(attrs)
    if retire is not None:
        change["retire" if retire else "unretire"] = len(ids)
    new = Dataset(items, ds.users, ds.sequences)
    place = ids if new.catalog_hash() != ds.catalog_hash() else []
    return _new_version(zoo, parent, new, sorted(retired), change, place, opts, keys)


def _current(zoo: Zoo, domain: str) -> tuple[Artifact, Dataset]:
    from st2si_cli.data.prepare import load_dataset

    parent = zoo.find(domain, kind="dataset")
    if parent is None:
        raise ZooError(
            f"no dataset {domain!r} in the zoo at {zoo.root}: run `st2si prepare SOURCE --domain {domain}`"
        )
    return parent, load_dataset(zoo, parent.id)


@dataclass
class _Plan:
    head: Artifact
    tensors: dict[str, Any]
    config: dict[str, Any]
    catalog: dict[str, Any]
    cache: Artifact


def _new_version(
    zoo: Zoo,
    parent: Artifact,
    new: Dataset,
    retired: list[int],
    change: dict[str, Any],
    place: list[int],
    opts: ItemsOptions,
    keys: list[str],
) -> CatalogChange:
    """Compute every head's new tensors, then store the dataset version, the carried caches and the heads."""
    from st2si_cli.features.cache import load_feature_set

    same_text = new.catalog_hash() == parent.meta.get("catalog_hash")
    heads = [
        h
        for h in zoo.ls("head", parent.domain or parent.name)
        if h.meta.get("catalog_hash") == parent.meta.get("catalog_hash")
    ]
    heads.reverse()  # oldest first, so the newest head stays the newest
    plans: list[_Plan] = []
    skipped: list[tuple[Artifact, str]] = []
    caches: dict[str, tuple[Artifact, Any]] = {}
    feats: dict[str, Any] = {}  # cache ID -> {item: alignment feature} of the items placed
    if not same_text:
        for head in heads:
            ref = Inputs.of(head).first("features")
            cache = zoo.find(ref, kind="features") if ref else None
            if cache is None:
                skipped.append((head, "its feature cache is not in the zoo"))
                continue
            if cache.id not in caches:
                caches[cache.id] = (cache, load_feature_set(zoo, cache))
                feats[cache.id] = _text_features(zoo, cache, new, place, opts)
            try:
                plans.append(_extend(zoo, head, caches[cache.id], feats[cache.id], new.n_items, opts))
            except ValueError as e:
                skipped.append((head, str(e)))
    art = store_version(zoo, new, parent, retired, change)
    out = CatalogChange(art, skipped=skipped, items=keys)
    if same_text:  # retiring only: the heads stay valid; the caches carry over unchanged
        for ref in {Inputs.of(h).first("features") for h in heads} - {None}:
            cache = zoo.find(ref, kind="features")
            if cache is not None and FeaturesMeta.of(cache).dataset == parent.id:
                _carry_cache(zoo, cache, load_feature_set(zoo, cache), art, {})
        return out
    carried = {}
    if set(place) == set(
        range(parent.meta["stats"]["items"], new.n_items)
    ):  # added items: histories unchanged
        for cid, (cache, fs) in caches.items():
            if FeaturesMeta.of(cache).dataset == parent.id:
                carried[cid] = _carry_cache(zoo, cache, fs, art, feats[cid])
    for plan in plans:
        out.heads.append((plan.head, _store(zoo, plan, art, carried.get(plan.cache.id, plan.cache))))
    return out


def _text_features(
    zoo: Zoo, cache: Artifact, ds: Dataset, place: list[int], opts: ItemsOptions
) -> dict[int, Any]:
    """Alignment features of the items `place`, with the cache's backbone, text settings and dtype."""
    from st2si_cli.backbones.load import load_backbone
    from st2si_cli.features.forward import features_per_sample
    from st2si_cli.model.samples import alignment_sample
    from st2si_cli.model.text import ItemTokenizer, TextConfig

    if not place:
        return {}
    meta = FeaturesMeta.of(cache)
    text = TextConfig.from_dict(meta.text)
    backbone = load_backbone(
        zoo, meta.backbone or "", dtype=meta.dtype or "auto", device=opts.device, query=text.query
    )
    itok = ItemTokenizer.create(backbone.tokenizer, text)
    tokens = itok.encode_items([ds.items[i] for i in place])
    samples = [alignment_sample(itok, t, i) for t, i in zip(tokens, place)]
    feats = features_per_sample(backbone.st2si(), samples, opts.batch_tokens, opts.max_batch)
    return {i: f[0] for i, f in zip(place, feats)}


def _extend(
    zoo: Zoo,
    head: Artifact,
    cache: tuple[Artifact, Any],
    text: dict[int, Any],
    n_items: int,
    opts: ItemsOptions,
) -> _Plan:
    from st2si_cli.heads.base import Placing
    from st2si_cli.heads.placement import neighbours
    from st2si_cli.heads.registry import kind_of
    from st2si_cli.heads.store import load_head_tensors

    meta = HeadMeta.of(head)
    prev = meta.catalog
    n_trained = meta.trained_items or 0
    text = {i: f for i, f in text.items() if i >= n_trained}  # trained rows are never re-placed
    fs = cache[1]
    id_from = neighbours(fs, n_trained, text) if opts.placement == "neighbour" else None
    placing = Placing(fs, n_trained, text, n_items, opts.placement, id_from)
    new, info = kind_of(head).extend(zoo, head, load_head_tensors(zoo, head), placing)
    if not text and prev.placement:  # nothing placed now: keep how the earlier items were placed
        info = prev.placement
    config = json.loads(zoo.file(head, "config.json").read_text("utf-8"))
    config = {k: v for k, v in config.items() if k not in ORIGIN_KEYS}
    config["n_items"] = n_items
    placed = sorted(set(prev.text_item_ids) | set(text)) if text else prev.text_item_ids
    catalog = {
        "trained_items": n_trained,
        "text_items": n_items - n_trained,
        "text_item_ids": placed if len(placed) <= 1000 else [],
        "placement": info,
        "parent_head": head.id,
        "metrics_catalog": prev.metrics_catalog or meta.catalog_hash,
    }
    return _Plan(head, new, config, catalog, cache[0])


def _store(zoo: Zoo, plan: _Plan, dataset: Artifact, cache: Artifact) -> Artifact:
    from st2si_cli.heads.store import HeadOrigin, head_text_config, store_head

    old = plan.head
    meta = {k: v for k, v in old.meta.items() if k not in ORIGIN_KEYS and k not in plan.config}
    inputs = {k: v for k, v in old.meta.get("inputs", {}).items() if k not in ("backbone", "dataset")}
    meta["inputs"] = {**inputs, "features": cache.id, "head": old.id}
    meta["catalog"] = plan.catalog
    backbone = zoo.get(old.meta["backbone"], kind="backbone")
    origin = HeadOrigin(old.domain or dataset.domain, backbone, dataset, head_text_config(old), old.name)
    return store_head(zoo, plan.tensors, origin, plan.config, meta)


def _carry_cache(zoo: Zoo, cache: Artifact, fs: Any, dataset: Artifact, text: dict[int, Any]) -> Artifact:
    """The feature cache of `dataset` made from `cache` (of its parent): history rows as they are, the
    new items' alignment rows appended (where the cache has alignment rows)."""
    import torch
    from safetensors.torch import save

    from st2si_cli.features.cache import cache_key, cache_name
    from st2si_cli.model.samples import ALIGN
    from st2si_cli.model.text import TextConfig

    meta = dict(cache.meta)
    backbone = FeaturesMeta.of(cache).backbone
    text_cfg = TextConfig.from_dict(meta["text"])
    key = cache_key(backbone, dataset.id, text_cfg, meta["dtype"], bool(meta.get("alignment", True)))
    existing = zoo.find(cache_name(key), kind="features")
    if existing is not None:
        return existing
    t = fs.tensors()
    if meta.get("alignment", True) and text:
        ids = sorted(text)
        n = len(ids)
        t = {
            "feats": torch.cat([t["feats"], torch.stack([text[i] for i in ids])]),
            "targets": torch.cat([t["targets"], torch.tensor(ids, dtype=torch.long)]),
            "roles": torch.cat([t["roles"], torch.full((n,), ALIGN, dtype=t["roles"].dtype)]),
            "owner": torch.cat([t["owner"], torch.tensor(ids, dtype=torch.long)]),
            "sample": torch.cat([t["sample"], int(t["sample"].max()) + 1 + torch.arange(n)]),
        }
    t["feats"] = t["feats"].to(getattr(torch, meta["dtype"]))
    meta.update(
        key=key,
        inputs={"backbone": backbone, "dataset": dataset.id, "features": cache.id},
        positions=int(t["targets"].numel()),
        samples=int(t["sample"].max()) + 1 if t["sample"].numel() else 0,
        carried_from=cache.id,
    )
    blob = save({k: v.contiguous() for k, v in t.items()})
    return zoo.put(
        "features", {"features.safetensors": blob}, meta, name=cache_name(key), identity={"key": key}
    )
