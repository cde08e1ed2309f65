"""Typed views of artifact meta: what datasets, backbones, heads, feature caches and runs record.

An artifact's `meta` is stored as JSON in the zoo and, for heads, is part of what their ID is computed
from, so it is never rewritten here: each class reads it with `of(...)`, tolerating every shape written
so far (older artifacts lack newer keys; `inputs` has had several shapes), and keeps the keys it does
not know in `extra`. `Inputs` and `Metrics` read one part of a meta (their own raw value, or an
artifact's); the others read a whole meta (an `Artifact`, or a meta mapping).

Fields are plain values, dicts and tuples (JSON-ready); treat them as read-only. Nothing heavy, and
nothing above the zoo layer, is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol


class HasMeta(Protocol):
    """An artifact, as far as these records care (`zoo.artifact` imports this module, not the reverse)."""

    meta: Mapping[str, Any]


def _meta(src: HasMeta | Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The meta mapping of an artifact (anything with `.meta`), or `src` itself; {} for anything else."""
    meta = getattr(src, "meta", src)
    return meta if isinstance(meta, Mapping) else {}


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _opt_dict(value: Any) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, Mapping) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _flags(value: Any) -> dict[str, Any]:
    """Flags as {flag: value}; a list of flag names (True each) is read too."""
    if isinstance(value, (list, tuple)):
        return {str(f): True for f in value}
    return _dict(value)


def _extra(meta: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in known}


# ---- inputs ------------------------------------------------------------------------------------------
def _refs(value: Any) -> list[str]:
    """The IDs a value names: a string, {"id": ID, ...}, or a (nested) list of those."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [value["id"]] if isinstance(value.get("id"), str) else []
    if isinstance(value, (list, tuple)):
        return [ref for v in value for ref in _refs(v)]
    return []


@dataclass(frozen=True)
class Inputs:
    """The artifacts another was made from, by role, in one shape whatever shape was written.

    Written so far: {role: id} (most), {role: [id, ...]} (a run's datasets, a fusion ensemble's
    adapters), {role: {"id": id, ...}}, and a plain list (read as role "")."""

    refs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # role -> the IDs it names, in order
    other: dict[str, Any] = field(default_factory=dict)  # roles naming no artifact (a cache's text settings)

    @classmethod
    def of(cls, raw: Any) -> Inputs:
        """From a raw `meta["inputs"]` value (None for none), or from an artifact (its meta's inputs)."""
        if isinstance(raw, Inputs):
            return raw
        if hasattr(raw, "meta"):
            raw = _meta(raw).get("inputs")
        if not raw:
            return cls()
        pairs = list(raw.items()) if isinstance(raw, Mapping) else [("", raw)]
        refs: dict[str, tuple[str, ...]] = {}
        other: dict[str, Any] = {}
        for role, value in pairs:
            ids = _refs(value)
            if ids or (isinstance(value, (list, tuple)) and not value):
                refs[str(role)] = tuple(dict.fromkeys(ids))
            else:
                other[str(role)] = value
        return cls(refs, other)

    def ids(self) -> tuple[str, ...]:
        """Every ID named, each once, in the order of the roles."""
        return tuple(dict.fromkeys(ref for ids in self.refs.values() for ref in ids))

    def get(self, role: str) -> tuple[str, ...]:
        """The IDs of one role (empty if it has none)."""
        return self.refs.get(role, ())

    def first(self, role: str) -> str | None:
        """The first ID of one role, None if it has none."""
        ids = self.refs.get(role)
        return ids[0] if ids else None

    def to_dict(self) -> dict[str, list[str]]:
        """The one shape: {role: [id, ...]} (roles naming no artifact left out)."""
        return {role: list(ids) for role, ids in self.refs.items()}


# ---- metrics -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metrics:
    """Metrics as heads and runs record them: per split, metric name -> value."""

    valid: dict[str, Any] = field(default_factory=dict)  # validation targets ({} where not measured)
    test: dict[str, Any] = field(default_factory=dict)  # test targets
    alignment: dict[str, Any] = field(default_factory=dict)  # text->ID accuracies ({} for adapter heads)
    domains: dict[str, Metrics] = field(default_factory=dict)  # a pretrain run's per-domain metrics
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above

    @classmethod
    def of(cls, raw: Any) -> Metrics:
        """From a raw `meta["metrics"]` value, or from an artifact (its meta's metrics)."""
        if isinstance(raw, Metrics):
            return raw
        if hasattr(raw, "meta"):
            raw = _meta(raw).get("metrics")
        m = _dict(raw)
        return cls(
            valid=_dict(m.get("valid", m.get("validation"))),
            test=_dict(m.get("test")),
            alignment=_dict(m.get("alignment")),
            domains={str(d): cls.of(v) for d, v in _dict(m.get("domains")).items()},
            extra=_extra(m, ("valid", "validation", "test", "alignment", "domains")),
        )

    def with_alignment(self, split: str = "test") -> dict[str, Any]:
        """One split's metrics ("valid" or "test") with the alignment accuracies added."""
        return {**(self.valid if split in ("valid", "validation") else self.test), **self.alignment}


# ---- the records, read field by field ----------------------------------------------------------------
def _f(read: Callable[[Any], Any], key: str | None = None) -> Any:
    """A field read from meta[key] (default: the field's name) by `read`, which tolerates any value."""
    return field(metadata={"read": read, "key": key})


class _Record:
    """Base of the records below: `of` reads each `_f` field, and keeps the other keys in `extra`."""

    @classmethod
    def of(cls, art_or_meta: HasMeta | Mapping[str, Any] | None) -> Any:
        """From an artifact, or a meta mapping (a part's raw value for the parts: stats, catalogs)."""
        m = _meta(art_or_meta)
        values, known = {}, []
        for f in fields(cls):  # type: ignore[arg-type]
            if "read" in f.metadata:
                known.append(f.metadata["key"] or f.name)
                values[f.name] = f.metadata["read"](m.get(known[-1]))
        return cls(**values, extra=_extra(m, tuple(known)))


def _bool(default: bool) -> Callable[[Any], bool]:
    return lambda v: v if isinstance(v, bool) else default


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def _any(value: Any) -> Any:
    return value


# ---- datasets ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetStats(_Record):
    """The paper's Table 1 statistics of a dataset (None where a record lacks one)."""

    users: int | None = _f(_int)  # users kept
    items: int | None = _f(_int)  # items in the catalog
    interactions: int | None = _f(_int)  # interactions kept
    avg_length: float | None = _f(_any)  # interactions per user
    density: float | None = _f(_any)  # interactions / (users * items)
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above

    def counts(self) -> dict[str, int]:
        """users, items and interactions, those recorded, in that order."""
        pairs = (("users", self.users), ("items", self.items), ("interactions", self.interactions))
        return {k: v for k, v in pairs if v is not None}


@dataclass(frozen=True)
class CatalogVersion(_Record):
    """Which version of its domain's catalog a dataset is (`st2si items` makes versions after the first)."""

    version: int = _f(lambda v: _int(v) or 1)  # 1 for a dataset as `prepare` stored it
    parent: str | None = _f(_str)  # the previous version's dataset ID
    items: int | None = _f(_int)  # items in the catalog, retired ones included (a first version: stats')
    retired: int = _f(lambda v: _int(v) or 0)  # items never recommended any more
    change: str = _f(lambda v: _str(v) or "prepare")  # what made this version: prepare, add, update, ...
    extra: dict[str, Any] = field(default_factory=dict)  # the change's details (added, attributes, ...)


@dataclass(frozen=True)
class DatasetMeta(_Record):
    """A dataset artifact's meta (`prepare`, and each catalog version `st2si items` stores)."""

    stats: DatasetStats = _f(DatasetStats.of)  # size of the data
    report: dict[str, Any] = _f(_dict)  # what preparation dropped or counted
    format: str | None = _f(_str)  # the source's format (generic, recbole, ...)
    source: str | None = _f(lambda v: None if v is None else str(v))  # where the data came from
    source_name: str | None = _f(_str)  # the known source name `prepare` was given, if any
    catalog_hash: str | None = _f(_str)  # hash of the catalog's items and text (heads are checked against it)
    catalog: CatalogVersion = _f(CatalogVersion.of)  # its catalog version
    inputs: Inputs = _f(Inputs.of)  # the previous version, for a version after the first
    versions: dict[str, Any] = _f(_dict)  # software versions that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above

    @classmethod
    def of(cls, art_or_meta: HasMeta | Mapping[str, Any] | None) -> DatasetMeta:
        meta = super().of(art_or_meta)
        if meta.catalog.items is None:  # a first version records no catalog: its items are all of them
            meta = replace(meta, catalog=replace(meta.catalog, items=meta.stats.items))
        return meta


# ---- backbones ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BackboneMeta(_Record):
    """A backbone artifact's meta (pulled, imported, built tiny, or tuned by `pretrain`)."""

    family: str | None = _f(_str)  # the model type (opt, llama, qwen2, ...)
    hidden: int | None = _f(_int)  # hidden size
    layers: int | None = _f(_int)  # transformer layers
    parameters: int | None = _f(_int)  # parameter count (not recorded for tiny backbones)
    vocab: int | None = _f(_int)  # vocabulary size (not recorded for tiny backbones)
    source: dict[str, Any] = _f(_dict)  # where from: {"type": hub, folder, gguf, random-init, ...}
    flags: dict[str, Any] = _f(_flags)  # a tuned backbone's non-default pretrain choices ({} otherwise)
    metrics: Metrics = _f(Metrics.of)  # a tuned backbone's metrics (empty otherwise)
    text: dict[str, Any] = _f(_dict)  # a tuned backbone's text settings ({} otherwise)
    query_token: str | None = _f(_str)  # a tuned backbone's query token
    inputs: Inputs = _f(Inputs.of)  # a tuned backbone's source backbone and datasets
    versions: dict[str, Any] = _f(_dict)  # software versions that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above (build_seconds, ...)


# ---- heads -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadCatalog(_Record):
    """How a head was extended to a grown catalog (`st2si items`); defaults for a head never extended."""

    trained_items: int | None = _f(_int)  # rows learned in training (None: all of them)
    text_items: int = _f(lambda v: _int(v) or 0)  # rows placed from item text since
    text_item_ids: list[int] = _f(_list)  # those items (empty when there are over 1000)
    placement: dict[str, Any] = _f(_dict)  # how they were placed: {"method": ..., ...}
    parent_head: str | None = _f(_str)  # the head this one extends
    metrics_catalog: str | None = _f(_str)  # the catalog hash the recorded metrics were measured on
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above

    def to_dict(self) -> dict[str, Any]:
        """The record as `st2si items` writes it."""
        known = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**known, **self.extra}


@dataclass(frozen=True)
class HeadMeta(_Record):
    """A head artifact's meta: what `adapt`, `fuse`, `pretrain` and `st2si items` record."""

    kind: str = _f(lambda v: str(v or "ilp"), "head")  # ilp | ilp-text | adapter | fusion (absent: ilp)
    method: str | None = _f(_str)  # how it was trained: ilp, adapter, fusion, full, top-layers
    domain: str | None = _f(_str)  # the domain it recommends for
    backbone: str | None = _f(_str)  # the backbone's ID (it only works on that backbone)
    backbone_name: str | None = _f(_str)  # that backbone's name when the head was stored
    dataset: str | None = _f(_str)  # the dataset's ID
    catalog_hash: str | None = _f(_str)  # the catalog it ranks (checked against the dataset's)
    n_items: int | None = _f(_int)  # items it scores
    hidden: int | None = _f(_int)  # its width
    d_feat: int | None = _f(_int)  # an adapter's or fusion's feature width
    dtype: str | None = _f(_str)  # the features' dtype
    text: dict[str, Any] = _f(_dict)  # text settings (TextConfig.to_dict())
    train: dict[str, Any] | None = _f(_opt_dict)  # training settings (a fusion's: w, ilp, adapter, ...)
    metrics: Metrics = _f(Metrics.of)  # measured when it was stored
    protocol: dict[str, Any] = _f(_dict)  # how the metrics were measured (ties, masking, ranking)
    best_epoch: int | None = _f(_int)  # the epoch kept (None for a fusion)
    best_step: int | None = _f(_int)  # a pretrain head's best validation point (global step; 0: the start)
    stopped_by: str | None = _f(_str)  # a pretrain head's stop reason
    history: list[Any] = _f(_list)  # per-epoch records
    sweep: dict[str, Any] | None = _f(_opt_dict)  # the validation sweep, if one chose the settings
    timings: dict[str, Any] = _f(_dict)  # seconds spent (not part of its identity)
    pretrain: dict[str, Any] | None = _f(_opt_dict)  # a pretrain head's slice of the union catalog
    catalog: HeadCatalog = _f(HeadCatalog.of)  # items added since training (`st2si items`)
    inputs: Inputs = _f(Inputs.of)  # backbone, dataset, features, and the heads it was made from
    config_kind: str | None = _f(_str, "kind")  # its config.json kind: st2si-ilp-head, ...
    adapter: dict[str, Any] | None = _f(_opt_dict)  # an adapter head's settings as its config records them
    versions: dict[str, Any] = _f(_dict)  # software versions that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above

    @property
    def trained_items(self) -> int | None:
        """Rows learned in training: all `n_items` unless items were placed from text since."""
        return self.catalog.trained_items if self.catalog.trained_items is not None else self.n_items

    @property
    def fusion_w(self) -> float | None:
        """A fusion's weight on the ILP, chosen on validation (None for other heads)."""
        return (self.train or {}).get("w") if self.kind == "fusion" else None


# ---- feature caches ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeaturesMeta(_Record):
    """A features artifact's meta: a head-training feature cache, or a pretrain activation cache."""

    key: str | None = _f(_str)  # the cache key it is found by (its name is derived from it)
    type: str = _f(lambda v: _str(v) or "features")  # "features" (for heads) or "activations" (pretrain)
    inputs: Inputs = _f(Inputs.of)  # backbone, dataset(s); a carried-over cache also the cache it came from
    text: dict[str, Any] = _f(_dict)  # text settings (an activation cache's are in inputs.other)
    dtype: str | None = _f(_str)  # stored dtype
    alignment: bool = _f(_bool(True))  # whether alignment samples were computed
    positions: int | None = _f(_int)  # feature rows
    samples: int | None = _f(_int)  # samples the rows belong to
    hidden: int | None = _f(_int)  # feature width
    layer: int | None = _f(_int)  # an activation cache's layer k (states entering it)
    precision: str | None = _f(_str)  # an activation cache's autocast precision
    timings: dict[str, Any] = _f(_dict)  # seconds and tokens spent
    carried_from: str | None = _f(_str)  # the parent catalog's cache it was carried over from
    versions: dict[str, Any] = _f(_dict)  # software versions that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above (tokens, shards, bytes, ...)

    @property
    def backbone(self) -> str | None:
        """The backbone's ID."""
        return self.inputs.first("backbone")

    @property
    def dataset(self) -> str | None:
        """The dataset's ID (a head-training cache's; an activation cache has `inputs.get("datasets")`)."""
        return self.inputs.first("dataset")


# ---- runs --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunMeta(_Record):
    """A run artifact's meta (`pretrain`)."""

    flags: dict[str, Any] = _f(_flags)  # the non-default choices (what `zoo ls` shows)
    config: dict[str, Any] = _f(_dict)  # every setting
    metrics: Metrics = _f(Metrics.of)  # union-catalog metrics of the best epoch, and per domain
    history: list[Any] = _f(_list)  # per validation point (epoch ends; "end": false within an epoch)
    best_epoch: int | None = _f(_int)  # the epoch kept (0: the starting weights)
    best_step: int | None = _f(_int)  # the validation point kept (global step; None before it was recorded)
    stopped_by: str | None = _f(_str)  # patience | epochs | time (None: a run stored before it was recorded)
    early_stopped: bool = _f(_bool(False))  # stopped by patience (False where not recorded)
    timings: dict[str, Any] = _f(_dict)  # seconds spent, epochs, the activation cache's record
    inputs: Inputs = _f(Inputs.of)  # the source backbone and the datasets
    world_size: int = _f(lambda v: _int(v) or 1)  # processes that trained it
    outputs: dict[str, Any] = _f(_dict)  # {"backbone": ID, "heads": {domain: ID}}
    versions: dict[str, Any] = _f(_dict)  # software versions that wrote it
    extra: dict[str, Any] = field(default_factory=dict)  # keys not above
