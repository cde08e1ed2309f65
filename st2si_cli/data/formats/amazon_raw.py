"""amazon-raw: Amazon Review Data (2018).

`{Cat}_5.json.gz` or `{Cat}.json.gz` (reviews: reviewerID, asin, unixReviewTime) + `meta_{Cat}.json.gz`
(asin, title, brand, category). JSON lines, gzip optional. Items without a title are dropped (counted).
"""

from __future__ import annotations

from st2si_cli.data.dataset import RawInteraction
from st2si_cli.data.formats._io import iter_json_lines
from st2si_cli.data.formats.base import (
    Format,
    ItemTable,
    Located,
    Names,
    Origins,
    Parsed,
    require_content,
    timestamp,
)
from st2si_cli.errors import InputError

AMAZON_META_FIELDS = ("title", "brand", "category")


def read_amazon_raw(loc: Located) -> Parsed:
    reviews, meta = loc.files["interactions"], loc.files["items"]
    interactions: list[RawInteraction] = []
    origins = Origins()
    origins.file(reviews)
    asins: set[str] = set()
    for n, obj in iter_json_lines(reviews):
        for k in ("reviewerID", "asin", "unixReviewTime"):
            if k not in obj:
                raise InputError(reviews, f"review has no {k!r} field", n)
        user, item = str(obj["reviewerID"]), str(obj["asin"])
        interactions.append(RawInteraction(user, item, timestamp(reviews, n, obj["unixReviewTime"]), n))
        origins.add(n)
        asins.add(item)
    require_content(reviews, len(interactions), "reviews")

    table = ItemTable(meta)
    rows = 0
    for n, obj in iter_json_lines(meta):
        rows += 1
        if "asin" not in obj:
            raise InputError(meta, "item has no 'asin' field", n)
        asin = str(obj["asin"])
        if asin in asins:  # the meta file lists the whole category; keep the reviewed items only
            table.add(asin, {k: obj.get(k) for k in AMAZON_META_FIELDS}, n)
    require_content(meta, rows, "items")
    notes = {"reviews_file": reviews.name, "meta_file": meta.name, "meta_rows": rows}
    return Parsed("amazon-raw", table.items, interactions, meta, origins, notes=notes)


def detect_file(name: str, names: Names) -> Located | None:
    """meta_{Cat}.json[.gz] with {Cat}_5.json[.gz] (preferred) or {Cat}.json[.gz]."""
    if not name.startswith("meta_") or not name.endswith((".json", ".json.gz")):
        return None
    if name.endswith(".inter.json"):  # a json-lists file
        return None
    ext = ".json.gz" if name.endswith(".gz") else ".json"
    cat = name.removeprefix("meta_").removesuffix(ext)
    for review in (
        f"{cat}_5{ext}",
        f"{cat}{ext}",
        f"{cat}_5.json",
        f"{cat}_5.json.gz",
        f"{cat}.json",
        f"{cat}.json.gz",
    ):
        if review in names:
            return Located("amazon-raw", {"interactions": names[review], "items": names[name]}, cat)
    return None


FORMAT = Format(
    name="amazon-raw",
    description="Amazon Review Data (2018): review and meta JSON lines, gzip optional",
    expected="{Cat}_5.json.gz or {Cat}.json.gz and meta_{Cat}.json.gz",
    read=read_amazon_raw,
    detect_file=detect_file,
    claims_pair=lambda i, m: m.startswith("meta_") or i.endswith(".json.gz"),
)
