"""`recommend`: top-k catalog items for histories given as catalog IDs or as item texts.

Input: one JSON object per line, `{"user": ..., "history": [...]}`, where each history entry is a
catalog item ID (string or number) or an object with attributes (`{"title": ...}`; an object with
only `"id"` is a catalog reference). Items outside the catalog are fine in a history: the model
reads text; only the predicted items need IDs. Output: one JSON object per input line, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from st2si_cli.errors import InputError, St2siError
from st2si_cli.zoo.store import Zoo


@dataclass
class Request:
    line: int
    user: Any
    items: list[dict[str, Any]]  # attributes of each history item, oldest first
    catalog_ids: list[int | None] = field(default_factory=list)  # catalog index where known


@dataclass
class BadLine:
    line: int
    user: Any
    error: str


def parse_requests(
    lines: Iterable[str], source: str, catalog: list[dict[str, Any]], *, skip_bad: bool = False
) -> list[Request | BadLine]:
    """Validate every line before any work: a bad line raises (or, with skip_bad, becomes a BadLine)."""
    index = {item["id"]: i for i, item in enumerate(catalog)}
    out: list[Request | BadLine] = []
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        user = None
        try:
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object with a history")
            user = obj.get("user", obj.get("user_id"))
            history = obj.get("history")
            if not isinstance(history, list):
                raise ValueError('missing "history" list')
            if not history:
                raise ValueError("empty history")
            items, ids = [], []
            for entry in history:
                if isinstance(entry, dict) and entry.get("title") is not None:
                    items.append({k: v for k, v in entry.items() if k != "id"})
                    ids.append(index.get(str(entry["id"])) if "id" in entry else None)
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
                    items.append(catalog[index[key]])
                    ids.append(index[key])
                else:
                    raise ValueError(
                        f"history entry {json.dumps(entry)[:60]} is neither an item ID nor an object with a title"
                    )
        except ValueError as e:
            if not skip_bad:
                raise InputError(source, str(e), n) from None
            out.append(BadLine(n, user, str(e)))
            continue
        out.append(Request(n, user, items, ids))
    return out


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
    batch_tokens: int = 16384,
    max_batch: int = 64,
    on_progress: Any = None,
) -> list[dict[str, Any]]:
    """One output object per request (errors for BadLines), in input order."""
    import torch

    from st2si_cli.adapter_head import adapter_history_scores, load_adapter_head
    from st2si_cli.backbones import load_backbone
    from st2si_cli.data.catalog import exclude_retired, retired_items
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.features import query_features
    from st2si_cli.fusion_head import load_fusion_head
    from st2si_cli.heads import check_compatible, find_head, head_kind, head_text_config, load_head_weight
    from st2si_cli.model.samples import Sample, history_samples, plan_batches
    from st2si_cli.model.text import ItemTokenizer
    from st2si_cli.scoring import top_k

    if k < 1:
        raise St2siError("-k must be at least 1")
    head = find_head(zoo, domain, head_ref)
    dataset_art = zoo.get(domain, kind="dataset")
    check_compatible(head, dataset=dataset_art)
    ds = load_dataset(zoo, dataset_art.id)
    text = head_text_config(head)
    backbone = load_backbone(
        zoo,
        head.meta["backbone"],
        dtype=dtype or head.meta.get("dtype") or "auto",
        device=device,
        query=text.query,
    )
    kind = head_kind(head)
    if kind == "adapter":
        adapter = load_adapter_head(zoo, head)
        sequence_scores = partial(adapter_history_scores, adapter)
    elif kind == "fusion":
        sequence_scores = load_fusion_head(zoo, head).history_scores
    else:  # ILP: chunked top-k over the last query's feature, bounded memory for any catalog size
        sequence_scores = None
        weight = load_head_weight(zoo, head)
    itok = ItemTokenizer.create(backbone.tokenizer, text)

    good = [r for r in requests if isinstance(r, Request)]
    # Tokenise each distinct item once: catalog items by index, text items by their attributes.
    cache: dict[Any, list[int]] = {}
    samples: list[Sample] = []
    for r in good:
        keys = [
            ("c", i) if i is not None else ("t", json.dumps(it, sort_keys=True))
            for it, i in zip(r.items, r.catalog_ids)
        ]
        missing = [(key, it) for key, it in zip(keys, r.items) if key not in cache]
        if missing:
            for (key, _), ids in zip(missing, itok.encode_items([it for _, it in missing])):
                cache[key] = ids
        [sample] = history_samples(itok, [cache[key] for key in keys], None, None, 0, every_position=False)
        if sequence_scores is None:  # the ILP reads the last query; the other heads every query of the window
            sample.query_pos = sample.query_pos[-1:]
        samples.append(sample)

    feats: list[Any] = [None] * len(samples)
    model = backbone.st2si()
    with torch.inference_mode():
        for batch in plan_batches([len(s.tokens) for s in samples], batch_tokens, max_batch):
            for i, f in zip(batch, query_features(model, [samples[i] for i in batch])):
                feats[i] = f
            if on_progress:
                on_progress(len(batch))
        exclude = [[i for i in r.catalog_ids if i is not None] for r in good] if exclude_history else None
        exclude = exclude_retired(exclude, retired_items(zoo, dataset_art), len(good))  # never a retired item
        if sequence_scores is None:
            hidden = torch.stack([f[-1] for f in feats]) if feats else torch.empty(0, backbone.hidden_size)
            scores, idx = top_k(weight, hidden, k, exclude=exclude)
        else:
            scores, idx = sequence_top_k(sequence_scores, feats, [r.catalog_ids for r in good], k, exclude)

    results: list[dict[str, Any]] = []
    g = 0
    for r in requests:
        if isinstance(r, BadLine):
            results.append({"user": r.user, "line": r.line, "error": r.error})
            continue
        recs = []
        for s, i in zip(scores[g].tolist(), idx[g].tolist()):
            item = ds.items[i]
            recs.append({"id": item["id"], "title": item.get("title"), "score": round(s, 4)})
        results.append({"user": r.user, "items": recs})
        g += 1
    return results


def sequence_top_k(
    scores_of: Callable[[list[Any], list[list[int | None]]], Any],
    feats: list[Any],
    catalog_ids: list[list[int | None]],
    k: int,
    exclude: list[list[int]] | None,
    batch: int = 256,
) -> tuple[Any, Any]:
    """Top-k of a head that reads each history's query features and item IDs, `batch` histories at a time."""
    import torch

    out_s, out_i = [], []
    for b0 in range(0, len(feats), batch):
        scores = scores_of(feats[b0 : b0 + batch], catalog_ids[b0 : b0 + batch])
        if exclude is not None:
            for r, items in enumerate(exclude[b0 : b0 + batch]):
                if items:
                    scores[r, items] = float("-inf")
        s, i = scores.topk(min(k, scores.shape[1]), dim=1)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(out_s), torch.cat(out_i)
