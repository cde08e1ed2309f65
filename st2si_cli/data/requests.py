"""`recommend`'s input: one JSON object per line, `{"user": ..., "history": [...]}`, parsed against a
catalog into `Request`s (or `BadLine`s, which answer with an error). Each history entry is a catalog
item ID (string or number) or an object with attributes (`{"title": ...}`; an object with only `"id"`
is a catalog reference); a title equal up to case, whitespace and HTML entities resolves to its item.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from st2si_cli.errors import InputError


@dataclass
class Request:
    line: int
    user: Any
    items: list[dict[str, Any]]  # attributes of each history item, oldest first
    catalog_ids: list[int | None] = field(default_factory=list)  # catalog index where given by ID
    exclude: list[int] = field(default_factory=list)  # every catalog item the history resolves to
    unresolved: list[dict[str, Any]] = field(default_factory=list)  # text items the catalog lacks

    def __post_init__(self) -> None:
        if not self.exclude:  # built by hand from catalog IDs: those are what it excludes
            self.exclude = [i for i in self.catalog_ids if i is not None]


@dataclass
class BadLine:
    line: int
    user: Any
    error: str


def _norm(text: Any) -> str:
    return " ".join(html.unescape(str(text)).split()).casefold()


def title_index(catalog: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Normalised title (entities decoded, whitespace collapsed, case folded) -> catalog indices."""
    out: dict[str, list[int]] = {}
    for i, item in enumerate(catalog):
        if item.get("title") is not None:
            out.setdefault(_norm(item["title"]), []).append(i)
    return out


def parse_requests(
    lines: Iterable[str] | Iterable[tuple[int, Any]],
    source: str,
    catalog: list[dict[str, Any]],
    *,
    skip_bad: bool = False,
    index: dict[str, int] | None = None,
    titles: dict[str, list[int]] | None = None,
) -> list[Request | BadLine]:
    """Validate every line before any work: a bad line raises (or, with skip_bad, becomes a BadLine).

    `lines` are texts (numbered from 1) or (number, text) pairs; a None text is a line that is not UTF-8,
    a `line_stream.TooLong` one that was too long to read. A string anywhere in a line that holds a lone
    surrogate (JSON "\\ud800": not Unicode text, so it cannot be tokenised or written out) makes it bad.
    """
    from st2si_cli.data.formats._io import lone_surrogate, surrogate_message
    from st2si_cli.data.line_stream import TooLong

    index = index if index is not None else {item["id"]: i for i, item in enumerate(catalog)}
    titles = titles if titles is not None else title_index(catalog)
    out: list[Request | BadLine] = []
    for n, raw in (x if isinstance(x, tuple) else (i, x) for i, x in enumerate(lines, start=1)):
        if isinstance(raw, str) and not raw.strip():
            continue
        user = None
        try:
            if raw is None:
                raise ValueError("not UTF-8 text")
            if isinstance(raw, TooLong):
                raise ValueError(raw.message())
            obj = _loads(raw)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object with a history")
            user = obj.get("user", obj.get("user_id"))
            bad = lone_surrogate(obj)
            if bad is not None:
                if lone_surrogate(user) is not None:
                    user = None
                raise ValueError(surrogate_message(bad))
            request = _request(n, user, obj.get("history"), catalog, index, titles)
        except ValueError as e:
            if not skip_bad:
                raise InputError(source, str(e), n) from None
            out.append(BadLine(n, user, str(e)))
            continue
        out.append(request)
    return out


def _loads(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _request(
    n: int,
    user: Any,
    history: Any,
    catalog: list[dict[str, Any]],
    index: dict[str, int],
    titles: dict[str, list[int]],
) -> Request:
    if not isinstance(history, list):
        raise ValueError('missing "history" list')
    if not history:
        raise ValueError("empty history")
    r = Request(n, user, [], [])
    for pos, entry in enumerate(history):
        if isinstance(entry, dict) and entry.get("title") is not None:
            r.items.append({k: v for k, v in entry.items() if k != "id"})
            given = index.get(str(entry["id"])) if "id" in entry else None
            r.catalog_ids.append(given)
            found = [given] if given is not None else titles.get(_norm(entry["title"]), [])
            r.exclude += found
            if not found:
                r.unresolved.append({"position": pos, "title": entry["title"]})
        elif (
            isinstance(entry, dict)
            and "id" in entry
            or isinstance(entry, (str, int))
            and not isinstance(entry, bool)
        ):
            key = str(entry["id"] if isinstance(entry, dict) else entry)
            if key not in index:
                raise ValueError(
                    f"unknown item ID {key!r} (give an object with a title for items outside the catalog)"
                )
            r.items.append(catalog[index[key]])
            r.catalog_ids.append(index[key])
            r.exclude.append(index[key])
        else:
            raise ValueError(
                f"history entry {json.dumps(entry)[:60]} is neither an item ID nor an object with a title"
            )
    return r
