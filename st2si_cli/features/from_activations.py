"""Query features read from an activation cache instead of a whole pass through the backbone.

`st2si pretrain --tune-layers K --cache-dtype fp32` stores the states entering layer L-K of every
history (whole) and every alignment sample of its domain, computed by the frozen backbone: the feature
pass `adapt` needs is then the top K layers and the final norm on those states, at the query positions
only (`model.layers.run_from`), a small part of a pass (the last layer alone at the queries for K = 1).

    activation cache (fp32, states entering layer k) --covering--> each feature sample's rows
        --layers k.., norm, at its queries--> [q, d]    (what the whole fp32 forward gives, within rounding)

It is used only where the result is the fp32 feature cache a pass would store: the cache holds this
backbone's states (made by it, or by the backbone a top-K run tuned it from, entering a layer no
higher than the first tuned one: the layers below were frozen), for this dataset alone and these text
settings, in fp32 (dtype and precision), and the features are wanted in fp32. So `adapt --backbone
<a top-K result>` (the recipe on tuned features) costs K layers at the queries too. Anything else (a
bf16 cache, other text settings, a multi-domain run, whose item IDs are shifted) finds no source and
the pass runs as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from st2si_cli.model.samples import Sample, collate
from st2si_cli.model.text import TextConfig
from st2si_cli.zoo.store import Artifact, Zoo


def cache_sources(backbone: Artifact) -> dict[str, int | None]:
    """{backbone ID: how many top layers of `backbone` differ from it}: the backbone itself (None: it
    shares every layer's states), and for a backbone stored by top-K tuning (`pretrain --tune-layers
    K`), the backbone it was tuned from (K): the embeddings and the layers below L-K were frozen, so the
    states entering layers up to L-K are the same in both."""
    sources: dict[str, int | None] = {backbone.id: None}
    origin = backbone.meta.get("source") or {}
    k = (backbone.meta.get("flags") or {}).get("tune-layers")
    if origin.get("type") == "st2si-pretrain" and origin.get("from") and k:
        sources[origin["from"]] = int(k)
    return sources


def matching_caches(zoo: Zoo, backbone: Artifact, dataset: Artifact, text: TextConfig) -> list[Artifact]:
    """The fp32 activation caches (made in fp32) of this dataset alone and these text settings, by
    `backbone` or the backbone it was top-K tuned from; whether one starts high enough is checked by
    `pick` (it needs the layer count)."""
    sources = cache_sources(backbone)
    found = []
    for art in zoo.ls("features"):
        m = art.meta
        inputs = m.get("inputs") or {}
        if (
            m.get("type") == "activations"
            and inputs.get("backbone") in sources
            and inputs.get("datasets") == [dataset.id]
            and inputs.get("text") == text.to_dict()
            and m.get("dtype") == "fp32"
            and m.get("precision") == "fp32"
        ):
            found.append(art)
    return found


def pick(caches: Sequence[Artifact], backbone: Artifact, layers: int) -> Artifact | None:
    """Of `caches`, the one with the fewest layers above it whose states `backbone` (of `layers` decoder
    layers) shares: any of its own, a source's up to layer L-K (the states entering a layer are made by
    the layers below it, and only those below L-K were frozen)."""
    sources = cache_sources(backbone)

    def shared(art: Artifact) -> bool:
        k = sources[art.meta["inputs"]["backbone"]]
        return k is None or art.meta["layer"] <= layers - k  # states entering it: frozen layers only

    usable = [a for a in caches if shared(a)]
    return max(usable, key=lambda a: (a.meta["layer"], a.created), default=None)


class ActivationSource:
    """`hidden_at(samples)`: the samples' query features [P, d] (fp32, CPU) from the cached states
    entering layer `layer`, through the layers above it and the final norm."""

    def __init__(self, model: Any, layer: int, cache: Any, stored: Sequence[Sample], pad_id: int):
        from st2si_cli.model.st2si import ST2SI

        self.model, self.layer, self.cache, self.stored, self.pad_id = model, layer, cache, stored, pad_id
        self.whole = ST2SI(model, None, pad_id=pad_id)  # for samples the cache does not cover
        self.origin: dict[str, Any] = {"layer": layer}  # what the feature cache's record says (`cache.py`)

    def hidden_at(self, samples: Sequence[Sample]) -> Any:
        """Samples the cache covers (each a prefix of a stored one) run the layers above it on their
        cached states; any other (an earlier window of a history longer than one, which the run stored
        among its own extra inputs) runs the whole backbone. Results in sample order."""
        import torch

        from st2si_cli.pretrain.activations import covers

        entries = covers(samples, self.stored)
        cached = [i for i, j in enumerate(entries) if j is not None]
        whole = [i for i, j in enumerate(entries) if j is None]
        parts: dict[int, Any] = {}
        with torch.no_grad():
            if cached:
                parts.update(
                    zip(cached, self._from_cache([samples[i] for i in cached], [entries[i] for i in cached]))
                )
            if whole:
                rest = [samples[i] for i in whole]  # the whole backbone (packed where it can be)
                h = self.whole.hidden_at(rest).float()
                parts.update(zip(whole, h.split([len(s.query_pos) for s in rest])))
        return torch.cat([parts[i] for i in range(len(samples))])

    def _from_cache(self, samples: Sequence[Sample], entries: Sequence[Any]) -> list[Any]:
        import torch

        from st2si_cli.model.layers import run_from

        batch = collate(samples, self.pad_id, "cpu")
        hidden = torch.zeros(len(samples), batch.input_ids.shape[1], self.cache.hidden_size)
        for b, (s, j) in enumerate(zip(samples, entries)):
            hidden[b, : len(s.tokens)] = self.cache.get(j)[: len(s.tokens)].float()
        rows, cols = batch.query_rows, batch.query_cols
        h = run_from(self.model, batch.input_ids, hidden, self.layer, (rows, cols))[rows, cols]
        return list(h.split([len(s.query_pos) for s in samples]))


def activation_source(
    zoo: Zoo, backbone: Artifact, dataset: Artifact, text: TextConfig
) -> tuple[ActivationSource, Artifact, Any] | None:
    """(the source, the cache it reads, the backbone's tokenizer) where the zoo holds a usable fp32
    activation cache (`matching_caches`, `pick`) whose first entries are this dataset's histories and
    alignment samples (checked against the cache's index, sample by sample); else None."""
    caches = matching_caches(zoo, backbone, dataset, text)
    if not caches:
        return None
    from st2si_cli.model.layers import n_layers
    from st2si_cli.pretrain.activations import ActivationCache, load_index
    from st2si_cli.pretrain.corpus import build_corpus
    from st2si_cli.pretrain.weights import load_trainable

    model, tokenizer = load_trainable(zoo, backbone, text.query)
    model.eval()
    art = pick(caches, backbone, n_layers(model))
    if art is None:
        return None
    corpus = build_corpus(zoo, [dataset], tokenizer, text)
    stored = corpus.eval_samples
    index = load_index(zoo, art)
    if index.shape[0] < len(stored) or index[: len(stored), 2].tolist() != [len(s.tokens) for s in stored]:
        return None  # stored for other samples (another tokenizer or sample definition): run the pass
    files = [zoo.file(art, f"shard-{n:05d}.safetensors") for n in range(art.meta["shards"])]
    cache = ActivationCache(files, index[: len(stored)])
    source = ActivationSource(model, int(art.meta["layer"]), cache, stored, corpus.pad_id)
    source.origin["activations"] = art.short_id
    return source, art, tokenizer


__all__ = ["ActivationSource", "activation_source", "cache_sources", "matching_caches", "pick"]
