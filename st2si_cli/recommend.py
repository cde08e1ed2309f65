"""`recommend`: top-k catalog items for histories given as catalog IDs or as item texts.

Input: one JSON object per line, `{"user": ..., "history": [...]}`, where each history entry is a
catalog item ID (string or number) or an object with attributes (`{"title": ...}`; an object with
only `"id"` is a catalog reference). Items outside the catalog are fine in a history: the model
reads text; only the predicted items need IDs. Output: one JSON object per input line, in order,
`{"user", "items": [{"id", "title", "score"}], "head", "head_id", "backbone_id"}`. With history
exclusion, every history item the catalog resolves (by ID, or by a title equal up to case,
whitespace and HTML entities) is left out, and text items it does not resolve are listed under
`"unresolved"`. `Recommender` loads the state once and answers any number of batches.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from st2si_cli.errors import InputError, St2siError
from st2si_cli.zoo.store import Zoo


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
    from st2si_cli.line_stream import TooLong

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


@dataclass
class RecommendOptions:
    k: int = 10
    exclude_history: bool = False
    head_ref: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    batch_tokens: int = 16384
    max_batch: int = 64


class Recommender:
    """The state of one `recommend` call, loaded once: head, catalog, then (on the first answer) backbone.

    `parse` turns lines into requests (needs the catalog only); `answer` ranks a batch of them.
    """

    def __init__(self, zoo: Zoo, domain: str, opts: RecommendOptions | None = None):
        from st2si_cli.data.catalog import retired_items
        from st2si_cli.data.prepare import load_dataset
        from st2si_cli.head_choice import choose_head
        from st2si_cli.heads import check_compatible

        self.zoo, self.opts = zoo, opts or RecommendOptions()
        if self.opts.k < 1:
            raise St2siError("k must be at least 1")
        self.choice = choose_head(zoo, domain, self.opts.head_ref)
        self.head = self.choice.head
        dataset_art = zoo.get(domain, kind="dataset")
        check_compatible(self.head, dataset=dataset_art)
        self.catalog = load_dataset(zoo, dataset_art.id).items
        self.retired = retired_items(zoo, dataset_art)  # never recommended
        self.index = {item["id"]: i for i, item in enumerate(self.catalog)}
        self.titles = title_index(self.catalog)
        self.provenance = {
            "head": self.head.name,
            "head_id": self.head.id,
            "backbone_id": self.choice.backbone_id,
        }
        self._model: Any = None
        self._loader: Any = None
        self._load_error: BaseException | None = None

    def parse(
        self, lines: Iterable[tuple[int, str | None]], source: str, skip_bad: bool = False
    ) -> list[Request | BadLine]:
        return parse_requests(
            lines, source, self.catalog, skip_bad=skip_bad, index=self.index, titles=self.titles
        )

    def preload(self) -> None:
        """Start loading the backbone and head weights in a thread, so that the load overlaps the wait
        for input; `answer` waits for it (and raises what it raised)."""
        import threading

        if self._model is None and self._loader is None:
            self._loader = threading.Thread(target=self._load_now, name="st2si-load", daemon=True)
            self._loader.start()

    def _load_now(self) -> None:
        try:
            from st2si_cli.recommend_model import RecommendModel

            if self._loader is None:
                self._model = RecommendModel(self.zoo, self.head, self.opts)
                return
            with Zoo(
                self.zoo.root, create=False
            ) as zoo:  # a SQLite connection serves only the thread that opened it
                self._model = RecommendModel(zoo, self.head, self.opts)
        except BaseException as e:  # handed to the thread that needs the model
            self._load_error = e

    def _load(self) -> Any:
        if self._loader is not None:
            self._loader.join()
            self._loader = None
        elif self._model is None and self._load_error is None:
            self._load_now()
        if self._load_error is not None:
            raise self._load_error
        return self._model

    def close(self) -> None:
        """Wait for a load still running (its thread must not outlive the call)."""
        if self._loader is not None:
            self._loader.join()
            self._loader = None

    def answer(self, requests: list[Request | BadLine]) -> list[dict[str, Any]]:
        """One output object per request (errors for BadLines), in input order."""
        good = [r for r in requests if isinstance(r, Request)]
        scores, idx = self._load().top_k(good, self.retired) if good else ([], [])
        results: list[dict[str, Any]] = []
        g = 0
        for r in requests:
            if isinstance(r, BadLine):
                results.append({"user": r.user, "line": r.line, "error": r.error, **self.provenance})
                continue
            recs = []
            for s, i in zip(scores[g].tolist(), idx[g].tolist()):
                if s == float("-inf"):  # excluded: fewer than k items were left
                    break
                item = self.catalog[i]
                recs.append({"id": item["id"], "title": item.get("title"), "score": round(s, 4)})
            row = {"user": r.user, "items": recs, **self.provenance}
            if self.opts.exclude_history and r.unresolved:
                row["unresolved"] = r.unresolved
            results.append(row)
            g += 1
        return results


def recommend(
    zoo: Zoo,
    domain: str,
    requests: list[Request | BadLine],
    *,
    k: int = 10,
    exclude_history: bool = False,
    head_ref: str | None = None,
    dtype: str | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """One output object per request (errors for BadLines), in input order."""
    opts = RecommendOptions(
        k=k, exclude_history=exclude_history, head_ref=head_ref, dtype=dtype, device=device
    )
    return Recommender(zoo, domain, opts).answer(requests)
