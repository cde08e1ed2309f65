"""The heavy half of `recommend`: backbone, head weights and item tokens, loaded once per call.

`RecommendModel.top_k` ranks the catalog for a batch of parsed requests (`st2si_cli.recommend.Request`).
Distinct item texts are tokenised once and kept for later batches of the same call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from typing import Any

from st2si_cli.zoo.store import Artifact, Zoo


class RecommendModel:
    def __init__(self, zoo: Zoo, head: Artifact, opts: Any):
        from st2si_cli.adapter_head import adapter_history_scores, load_adapter_head
        from st2si_cli.backbones import load_backbone
        from st2si_cli.fusion_head import load_fusion_head
        from st2si_cli.heads import head_kind, head_text_config, load_head_weight
        from st2si_cli.model.text import ItemTokenizer

        self.opts = opts
        text = head_text_config(head)
        self.backbone = load_backbone(
            zoo,
            head.meta["backbone"],
            dtype=opts.dtype or head.meta.get("dtype") or "auto",
            device=opts.device,
            query=text.query,
        )
        kind = head_kind(head)
        self.sequence_scores: Callable[..., Any] | None = None
        if kind == "adapter":
            self.sequence_scores = partial(adapter_history_scores, load_adapter_head(zoo, head))
        elif kind == "fusion":
            self.sequence_scores = load_fusion_head(zoo, head).history_scores
        else:  # ILP: chunked top-k over the last query's feature, bounded memory for any catalog size
            self.weight = load_head_weight(zoo, head)
        self.itok = ItemTokenizer.create(self.backbone.tokenizer, text)
        self.model = self.backbone.st2si()
        self.cache: dict[Any, list[int]] = {}

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
            if self.sequence_scores is None:  # the ILP reads the last query; other heads every query
                sample.query_pos = sample.query_pos[-1:]
            samples.append(sample)
        return samples

    def top_k(self, good: list[Any], retired: list[int] | None = None) -> tuple[Any, Any]:
        """(scores, catalog indices) [len(good), k] for parsed requests; `retired` items never appear."""
        import torch

        from st2si_cli.data.catalog import exclude_retired
        from st2si_cli.features import query_features
        from st2si_cli.model.samples import plan_batches
        from st2si_cli.scoring import top_k

        opts = self.opts
        samples = self._samples(good)
        feats: list[Any] = [None] * len(samples)
        with torch.inference_mode():
            for batch in plan_batches([len(s.tokens) for s in samples], opts.batch_tokens, opts.max_batch):
                for i, f in zip(batch, query_features(self.model, [samples[i] for i in batch])):
                    feats[i] = f
            exclude = [r.exclude for r in good] if opts.exclude_history else None
            exclude = exclude_retired(exclude, retired or [], len(good))
            if self.sequence_scores is None:
                hidden = torch.stack([f[-1] for f in feats])
                return top_k(self.weight, hidden, opts.k, exclude=exclude)
            ids = [r.catalog_ids for r in good]
            return sequence_top_k(self.sequence_scores, feats, ids, opts.k, exclude)


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
