"""The canonical dataset: an item catalog, user sequences in time order, and the leave-one-out split.

Every input format is parsed into `RawInteractions` + item attributes and then canonicalised by
`build_dataset`, so that the same data given in two formats serialises to the same bytes and hence
the same hash. Canonical means:

- item and user keys are strings, ordered "naturally" (numbers by value, then other strings);
- the catalog's internal item ID is the position in that order;
- attribute names are lower-case (`title`, `brand`, `category`, ...), values are stripped strings,
  lists are joined with ", ", empty values are dropped;
- a user's items are sorted by timestamp, stably (ties keep their order in the source file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Attribute names that item files use for the same thing, mapped to one canonical name.
ATTRIBUTE_ALIASES: dict[str, str] = {
    "title": "title",
    "movie_title": "title",
    "name": "title",
    "brand": "brand",
    "categories": "category",
    "category": "category",
    "class": "category",
    "genre": "category",
    "genres": "category",
    "description": "description",
    "release_year": "year",
    "year": "year",
}

MIN_USER_INTERACTIONS = 3  # leave-one-out needs a train, a validation and a test item


def natural_key(key: str) -> tuple[int, int, str]:
    """Sort key: integers by value first, then everything else as text."""
    if key.isdigit():
        return (0, int(key), "")
    return (1, 0, key)


def canonical_value(value: Any) -> str | None:
    """Flatten an attribute value into one stripped string (None if empty)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [canonical_value(v) for v in value]
        text = ", ".join(p for p in parts if p)
    else:
        text = str(value)
    text = text.strip()
    return text or None


def canonical_attributes(raw: Mapping[str, Any]) -> dict[str, str]:
    """Map raw attribute names to canonical ones and values to strings; unknown names kept lower-case."""
    out: dict[str, str] = {}
    for name, value in raw.items():
        key = ATTRIBUTE_ALIASES.get(name.lower(), name.lower())
        if key == "id":
            continue
        text = canonical_value(value)
        if text is not None and key not in out:
            out[key] = text
    return out


def dumps_canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


@dataclass
class Dataset:
    """An item catalog and user sequences; internal item IDs index `items`.

    items:      one dict per item: {"id": source item key, "title": ..., other attributes}
    users:      user keys, one per sequence
    sequences:  item IDs of each user in time order (len >= 3)
    report:     what preparation dropped or counted (not part of the hash)
    """

    items: list[dict[str, str]]
    users: list[str]
    sequences: list[list[int]]
    report: dict[str, Any] = field(default_factory=dict)

    # ---- serialisation -------------------------------------------------------------------------
    def catalog_bytes(self) -> bytes:
        return "".join(dumps_canonical(item) + "\n" for item in self.items).encode("utf-8")

    def sequences_bytes(self) -> bytes:
        lines = (dumps_canonical({"user": u, "items": s}) + "\n" for u, s in zip(self.users, self.sequences))
        return "".join(lines).encode("utf-8")

    def catalog_hash(self) -> str:
        return hashlib.sha256(self.catalog_bytes()).hexdigest()

    def content_hash(self) -> str:
        """Hash of catalog and sequences: equal for equal data, whatever the source format."""
        h = hashlib.sha256()
        h.update(self.catalog_hash().encode())
        h.update(hashlib.sha256(self.sequences_bytes()).hexdigest().encode())
        return h.hexdigest()

    @classmethod
    def from_bytes(cls, catalog: bytes, sequences: bytes, report: dict | None = None) -> Dataset:
        items = [json.loads(line) for line in catalog.decode("utf-8").splitlines() if line]
        users, seqs = [], []
        for line in sequences.decode("utf-8").splitlines():
            if line:
                row = json.loads(line)
                users.append(row["user"])
                seqs.append(row["items"])
        return cls(items=items, users=users, sequences=seqs, report=report or {})

    # ---- views ---------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def stats(self) -> dict[str, Any]:
        """The statistics of the paper's Table 1."""
        n_inter = sum(len(s) for s in self.sequences)
        n_users, n_items = self.n_users, self.n_items
        return {
            "users": n_users,
            "items": n_items,
            "interactions": n_inter,
            "avg_length": round(n_inter / n_users, 2) if n_users else 0.0,
            "density": round(n_inter / (n_users * n_items), 6) if n_users and n_items else 0.0,
        }

    def split(self, user: int) -> dict[str, Any]:
        """Leave-one-out: the last item is the test target, the one before it the validation target."""
        seq = self.sequences[user]
        return {"train": seq[:-2], "valid_target": seq[-2], "test_target": seq[-1]}


@dataclass
class RawInteraction:
    user: str
    item: str
    timestamp: float
    order: int  # position in the source, breaks timestamp ties stably


def build_dataset(
    item_attributes: Mapping[str, Mapping[str, Any]],
    interactions: Iterable[RawInteraction],
    *,
    k_core: int = 0,
    min_user_interactions: int = MIN_USER_INTERACTIONS,
    source: str = "",
) -> Dataset:
    """Canonicalise parsed input into a `Dataset`.

    Items without a title are dropped; interactions naming an unknown item are dropped and counted;
    repeated (user, item, timestamp) rows are kept (they are real repeat interactions in time order).
    """
    report: dict[str, Any] = {"source": source}
    catalog: dict[str, dict[str, str]] = {}
    no_title = 0
    for key, attrs in item_attributes.items():
        canon = canonical_attributes(attrs)
        if "title" not in canon:
            no_title += 1
            continue
        catalog[str(key)] = canon
    report["items_without_title_dropped"] = no_title

    by_user: dict[str, list[RawInteraction]] = {}
    unknown = 0
    for row in interactions:
        if row.item not in catalog:
            unknown += 1
            continue
        by_user.setdefault(row.user, []).append(row)
    report["interactions_with_unknown_item_dropped"] = unknown

    if k_core > 0:
        by_user = _k_core(by_user, k_core)
        report["k_core"] = k_core

    short = [u for u, rows in by_user.items() if len(rows) < min_user_interactions]
    for u in short:
        del by_user[u]
    report["users_too_short_dropped"] = len(short)
    report["min_user_interactions"] = min_user_interactions

    item_keys = sorted(catalog, key=natural_key)
    index = {key: i for i, key in enumerate(item_keys)}
    items = [{"id": key, **catalog[key]} for key in item_keys]
    users = sorted(by_user, key=natural_key)
    sequences = []
    for u in users:
        rows = sorted(by_user[u], key=lambda r: (r.timestamp, r.order))
        sequences.append([index[r.item] for r in rows])
    return Dataset(items=items, users=users, sequences=sequences, report=report)


def _k_core(by_user: dict[str, list[RawInteraction]], k: int) -> dict[str, list[RawInteraction]]:
    """Iteratively drop users and items with fewer than k interactions."""
    while True:
        item_counts: dict[str, int] = {}
        for rows in by_user.values():
            for r in rows:
                item_counts[r.item] = item_counts.get(r.item, 0) + 1
        changed = False
        kept: dict[str, list[RawInteraction]] = {}
        for u, rows in by_user.items():
            rows2 = [r for r in rows if item_counts[r.item] >= k]
            if len(rows2) != len(rows):
                changed = True
            if len(rows2) >= k:
                kept[u] = rows2
            else:
                changed = True
        by_user = kept
        if not changed:
            return by_user


def sequences_from_lists(user_lists: Mapping[str, Sequence[str]]) -> list[RawInteraction]:
    """Interactions from already ordered per-user item lists (formats without timestamps)."""
    out: list[RawInteraction] = []
    order = 0
    for user, items in user_lists.items():
        for t, item in enumerate(items):
            out.append(RawInteraction(user=str(user), item=str(item), timestamp=float(t), order=order))
            order += 1
    return out
