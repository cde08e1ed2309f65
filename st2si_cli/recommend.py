"""`recommend`: top-k catalog items for histories given as catalog IDs or as item texts.

Input: one JSON object per line, `{"user": ..., "history": [...]}`, where each history entry is a
catalog item ID (string or number) or an object with attributes (`{"title": ...}`; an object with
only `"id"` is a catalog reference). Items outside the catalog are fine in a history: the model
reads text; only the predicted items need IDs. Output: one JSON object per input line, in order,
`{"user", "items": [{"id", "title", "score"}], "head", "head_id", "backbone_id"}`. With history
exclusion, every history item the catalog resolves (by ID, or by a title equal up to case,
whitespace and HTML entities) is left out, and text items it does not resolve are listed under
`"unresolved"`. `Recommender` loads the state once and answers any number of batches; `RecommendModel` is its
heavy half (backbone, head scorer and item tokens).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from st2si_cli.data.requests import BadLine, Request, parse_requests, title_index
from st2si_cli.errors import St2siError
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo

__all__ = [
    "BadLine",
    "RecommendModel",
    "RecommendOptions",
    "Recommender",
    "Request",
    "parse_requests",
    "recommend",
]


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
        from st2si_cli.heads.choice import choose_head
        from st2si_cli.heads.store import check_compatible

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


class RecommendModel:
    """The heavy half of `recommend`: backbone, head scorer and item tokens, loaded once per call.

    `top_k` ranks the catalog for a batch of parsed requests. Distinct item texts are tokenised once
    and kept for later batches of the same call.

    Two engines answer (`engine`). "numpy" (torch is never imported, which alone costs more than a small
    backbone's answer: `model/np_forward.py` runs the backbone, `model/np_heads.py` the adapter heads) where
    every one of these holds: the head is an ILP (`ilp`, `ilp-text`), a sequence adapter (`adapter`, the
    ID-only `sasrec`) or a fusion of them (`fusion`, with or without an ILP) that `np_heads.load_scorer`
    rebuilds; the device is the CPU; the backbone folder is one the fast loader takes
    (`backbones/fast_load.py::plain_llama`: a plain Llama in safetensors with a plain tokenizer.json);
    neither `ST2SI_NO_FAST_LOAD` nor `ST2SI_NO_NUMPY` is set; and, for a head that reads the backbone's
    features, the dtype (`--dtype`, else the head's) is float32. A head that reads no feature (an ID-only
    `sasrec`, a fusion of ID-only adapters without an ILP: `heads/choice.py::id_only`) never loads or runs
    the backbone, whatever the dtype: only the tokenizer, since the item IDs it reads are the newest
    window of the history that fits the text settings (one per query position). "torch" (the backbone
    through `load_backbone`, the head kind's own `top_k`) otherwise. Both give the same items and scores
    up to float32 rounding (tests/test_np_forward.py, tests/test_np_heads.py).
    """

    def __init__(self, zoo: Zoo, head: Artifact, opts: Any):
        from st2si_cli.heads.registry import kind_of
        from st2si_cli.heads.store import head_text_config
        from st2si_cli.model.text import ItemTokenizer

        self.opts = opts
        meta = HeadMeta.of(head)
        text = head_text_config(head)
        dtype = opts.dtype or meta.dtype or "auto"
        self.cache: dict[Any, list[int]] = {}
        numpy_engine = _numpy_engine(zoo, head, meta, text.query, dtype, opts.device)
        if numpy_engine is not None:
            self.engine = "numpy"
            self.model, tokenizer, self.scorer = numpy_engine  # model None: the head reads no feature
            self.kind = kind_of(head)
            self.itok = ItemTokenizer.create(tokenizer, text)
            return
        from st2si_cli.backbones.load import load_backbone

        self.engine = "torch"
        self.backbone = load_backbone(
            zoo,
            meta.backbone or "",
            dtype=dtype,
            device=opts.device,
            query=text.query,
            inference_only=True,
        )
        self.kind = kind_of(head)
        self.scorer = self.kind.load(zoo, head)
        self.itok = ItemTokenizer.create(self.backbone.tokenizer, text)
        self.model = self.backbone.st2si()

    def _samples(self, good: list[Any]) -> list[Any]:
        from st2si_cli.model.samples import history_samples

        samples = []
        for r in good:
            keys = [
                ("c", i) if i is not None else ("t", json.dumps(it, sort_keys=True))
                for it, i in zip(r.items, r.catalog_ids)
            ]
            missing = {key: it for key, it in zip(keys, r.items) if key not in self.cache}
            if missing:
                for key, ids in zip(missing, self.itok.encode_items(list(missing.values()))):
                    self.cache[key] = ids
            [sample] = history_samples(
                self.itok, [self.cache[key] for key in keys], None, None, 0, every_position=False
            )
            if not self.kind.reads_every_query:  # only the last query's feature is needed
                sample.query_pos = sample.query_pos[-1:]
            samples.append(sample)
        return samples

    def top_k(self, good: list[Any], retired: list[int] | None = None) -> tuple[Any, Any]:
        """(scores, catalog indices) [len(good), k] for parsed requests; `retired` items never appear."""
        from st2si_cli.data.catalog import exclude_retired

        opts = self.opts
        samples = self._samples(good)
        exclude = [r.exclude for r in good] if opts.exclude_history else None
        exclude = exclude_retired(exclude, retired or [], len(good))
        if self.engine == "numpy":
            import numpy as np

            from st2si_cli.model import np_forward, np_heads

            if self.model is None:  # only the count of query positions (the window of IDs) is read
                feats = [np.zeros((len(s.query_pos), 0), np.float32) for s in samples]
            else:
                feats = np_forward.features_per_sample(self.model, samples, opts.batch_tokens, opts.max_batch)
            if isinstance(self.scorer, np.ndarray):  # an ILP weight
                last = np.stack([f[-1] for f in feats])
                return np_forward.ilp_top_k(self.scorer, last, opts.k, exclude=exclude)
            catalog_ids = [r.catalog_ids for r in good]
            return np_heads.top_k(self.scorer, feats, catalog_ids, opts.k, exclude)

        import torch

        from st2si_cli.features.forward import features_per_sample

        feats = features_per_sample(self.model, samples, opts.batch_tokens, opts.max_batch)
        with torch.inference_mode():
            return self.kind.top_k(self.scorer, feats, [r.catalog_ids for r in good], opts.k, exclude)


ILP_KINDS = ("ilp", "ilp-text")  # heads the numpy engine answers with an ILP weight over the last query
NUMPY_KINDS = (*ILP_KINDS, "adapter", "sasrec", "fusion")  # every head kind the numpy engine answers


def _numpy_engine(
    zoo: Zoo, head: Artifact, meta: HeadMeta, query: str, dtype: str, device: str
) -> tuple[Any, Any, Any] | None:
    """(NumpyLlama or None, tokenizer, scorer) where the numpy engine answers (see `RecommendModel`), else
    None. The scorer is an ILP weight [N, d] float32, or an `np_heads` adapter or fusion; the NumpyLlama
    is None for a scorer that reads no feature (then the weights are never read). The torch path's dtype
    is float32 exactly when `dtype` names it ("auto" is left to torch: it may choose bf16 on CPUs that
    compute it natively)."""
    import os

    if os.environ.get("ST2SI_NO_NUMPY") or os.environ.get("ST2SI_NO_FAST_LOAD"):
        return None
    if device != "cpu" or meta.kind not in NUMPY_KINDS:
        return None
    from st2si_cli.backbones import hf
    from st2si_cli.backbones.fast_load import plain_llama
    from st2si_cli.backbones.load import removed_while_loading
    from st2si_cli.model import np_heads
    from st2si_cli.model.np_forward import NumpyLlama, read_ilp_weight

    path = zoo.file(head, "head.safetensors")
    scorer: Any
    if meta.kind in ILP_KINDS:
        scorer = read_ilp_weight(path)
        d_feat, reads = (int(scorer.shape[1]) if scorer is not None else 0), True
    else:
        scorer = np_heads.load_scorer(
            path, meta.kind, meta.train, int(meta.d_feat or 0), int(meta.n_items or 0)
        )
        d_feat, reads = int(meta.d_feat or 0), scorer is not None and scorer.reads_features
    if scorer is None:  # the torch path says what is wrong with the head
        return None
    if reads and dtype not in ("fp32", "float32"):  # features in another dtype: torch computes them
        return None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    art = zoo.get(meta.backbone or "", kind="backbone")
    folder = zoo.view(art)
    hf.refuse_custom_code(folder)
    with removed_while_loading(zoo, art, folder):
        plain = plain_llama(folder, "cpu", query)
        if plain is None:
            return None
        if not reads:  # an ID-only head: the tokenizer alone
            return None, plain.tokenizer, scorer
        try:
            model = NumpyLlama.from_files(plain.cfg, plain.files, plain.rope_theta)
        except KeyError:  # a dtype or a weight name outside the plain layout
            return None
    if model.hidden_size != d_feat:
        return None
    return model, plain.tokenizer, scorer
