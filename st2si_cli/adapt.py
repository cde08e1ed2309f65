"""`adapt` and `eval`: efficient ILP tuning on cached features of a frozen backbone, and evaluation.

    dataset + backbone --(one forward pass, cached)--> features --(AdamW on the ILP)--> head

The head records the backbone, dataset and feature-cache IDs, the catalog hash, its text and
training settings, per-epoch validation metrics, and its validation and test metrics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from st2si_cli import DEFAULT_BACKBONE
from st2si_cli.errors import St2siError
from st2si_cli.model.text import TextConfig
from st2si_cli.progress import Reporter
from st2si_cli.zoo.meta import DatasetMeta, FeaturesMeta, HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo


@dataclass
class FeatureOptions:
    dtype: str | None = "auto"  # None: the head's own (evaluate), else "auto"
    device: str = "cpu"
    batch_tokens: int = 16384
    max_batch: int = 64
    alignment: bool = True


def read_dataset(zoo: Zoo, ref: str) -> Any:
    """`load_dataset(zoo, ref)`, where bytes changed in place in the zoo are a ZooError naming the
    dataset and its file (and pointing at `st2si zoo verify --repair`), not a JSON decoder's message."""
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.zoo.decoding import DECODE_ERRORS, changed_files, corrupt_file

    try:
        return load_dataset(zoo, ref)
    except DECODE_ERRORS as e:
        art = zoo.find(ref, kind="dataset") or zoo.newest("dataset", ref)
        if art is None:
            raise
        raise corrupt_file(art, ", ".join(changed_files(zoo, art) or sorted(art.files)), e) from None


def get_features(
    zoo: Zoo,
    backbone_ref: str,
    dataset_art: Artifact,
    text: TextConfig,
    opts: FeatureOptions,
    reporter: Reporter | None = None,
    ds: Any = None,
) -> tuple[Artifact, Any, Artifact]:
    """(features artifact, FeatureSet, backbone artifact): from the cache, else one forward pass.

    `ds` is the loaded dataset of `dataset_art` where the caller has it already.

    Under `torchrun --nproc_per_node N` every rank calls it and gets the same cache: each rank computes
    its share of the pass (on its own GPU where `opts.device` is "cuda": cuda:LOCAL_RANK) and rank 0
    stores it (`features.cache.compute_features`).
    """
    import os

    from st2si_cli.backbones.load import load_backbone, resolve_dtype
    from st2si_cli.backbones.pull import ensure_backbone
    from st2si_cli.features.cache import cache_key, cache_name, compute_features, dtype_name, load_feature_set
    from st2si_cli.features.ranks import gather, world

    reporter = reporter or Reporter()
    bb_art = ensure_backbone(zoo, backbone_ref)
    zoo.hold(dataset_art, bb_art)  # `zoo rm` refuses them while this command uses them
    dtype = opts.dtype or "auto"
    key = cache_key(
        bb_art.id, dataset_art.id, text, dtype_name(resolve_dtype(dtype, opts.device)), opts.alignment
    )
    rank, size = world()
    cached = zoo.find(cache_name(key), kind="features") if rank == 0 else None
    if size > 1:  # every rank must take the same branch (compute_features meets the others): rank 0's
        cached_id = gather(cached.id if cached is not None else None)[0]
        cached = zoo.get(cached_id, kind="features") if cached_id is not None else None
    if cached is not None:
        reporter.message(f"Using cached features {cached.name} ({cached.meta.get('positions')} positions)")
        return cached, load_feature_set(zoo, cached), bb_art
    device = opts.device
    if size > 1 and device == "cuda":  # one card per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    ds = ds if ds is not None else read_dataset(zoo, dataset_art.id)
    origin = None
    backbone = None
    if size == 1 and device == "cpu" and dtype_name(resolve_dtype(dtype, device)) == "float32":
        backbone, origin = _from_activations(zoo, bb_art, dataset_art, text)
    if backbone is None:
        backbone = load_backbone(zoo, bb_art.id, dtype=dtype, device=device, query=text.query)
    how = f"from activation cache {origin['activations']}, layers {origin['layer']}.." if origin else ""
    reporter.message(
        f"Computing features with {bb_art.name or bb_art.short_id} ({dtype_name(backbone.dtype)}) {how}".strip()
    )
    art, fs = compute_features(
        zoo,
        backbone,
        ds,
        dataset_art.id,
        text,
        alignment=opts.alignment,
        batch_tokens=opts.batch_tokens,
        max_batch=opts.max_batch,
        on_start=reporter.features_start,
        on_progress=reporter.features_advance,
    )
    reporter.features_done()
    return art, fs, bb_art


def _from_activations(zoo: Zoo, bb_art: Artifact, dataset_art: Artifact, text: TextConfig) -> tuple[Any, Any]:
    """(a Backbone whose `st2si()` reads a matching fp32 activation cache, its record for the features'
    meta) where the zoo holds one (`features/from_activations.py`), else (None, None)."""
    import torch

    from st2si_cli.backbones.load import Backbone
    from st2si_cli.features.from_activations import activation_source

    found = activation_source(zoo, bb_art, dataset_art, text)
    if found is None:
        return None, None
    source, art, tokenizer = found
    zoo.hold(art)  # `zoo rm` refuses the cache while it is read
    backbone = Backbone(
        model=source.model,
        tokenizer=tokenizer,
        hidden_size=source.cache.hidden_size,
        artifact_id=bb_art.id,
        name=bb_art.name,
        dtype=torch.float32,
    )
    backbone._st2si = source
    return backbone, source.origin


def adapt(
    zoo: Zoo,
    domain: str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    text: TextConfig | None = None,
    head_cfg: Any = None,
    feature_opts: FeatureOptions | None = None,
    name: str | None = None,
    reporter: Reporter | None = None,
    sweep_trials: int | None = None,
) -> Artifact | None:
    """Train a new head for `domain` on a frozen backbone; store and return it.

    Under `torchrun --nproc_per_node N -m st2si_cli adapt ...` every rank computes its share of the
    feature pass (`get_features`); rank 0 alone then trains and stores the head, and the other ranks
    (workers) return None once the features are stored.

    The head's kind follows from `head_cfg` (`heads.registry.kind_for_config`): a `HeadConfig` gives the
    paper's item linear projection ("ilp"; with `init="text"` each row starts from its item's alignment
    feature: "ilp-text"), an `AdapterConfig` a sequence adapter (SASRec over the LM's query features and
    item text features, plus ID embeddings), a `FusionConfig` both, mixed. `sweep_trials`: train that
    many points of the kind's sweep grid (0: all of them) and keep the best on validation; None: no sweep.
    """
    from st2si_cli.features.ranks import is_worker
    from st2si_cli.heads.base import How
    from st2si_cli.heads.registry import kind_for_config
    from st2si_cli.heads.store import HeadOrigin

    reporter = reporter or Reporter()
    text = text or TextConfig()
    kind = kind_for_config(head_cfg)
    if kind.reads_every_query and text.positions != "all":
        raise St2siError(f"a {kind.name} head reads every position of a history: positions must be 'all'")
    feature_opts = feature_opts or FeatureOptions()
    dataset_art = zoo.get(domain, kind="dataset")
    ds = read_dataset(zoo, dataset_art.id)
    t0 = time.time()
    feat_art, fs, bb_art = get_features(zoo, backbone, dataset_art, text, feature_opts, reporter, ds=ds)
    if is_worker():  # the features are stored: training is rank 0's
        return None
    timings = {
        "features_seconds": round(time.time() - t0, 2),
        "features_cached": FeaturesMeta.of(feat_art).timings,
    }
    trained = kind.train(fs, ds, head_cfg, reporter=reporter, how=How(sweep_trials=sweep_trials))
    return store_trained(zoo, trained, HeadOrigin(domain, bb_art, dataset_art, text, name), feat_art, timings)


def store_trained(
    zoo: Zoo,
    trained: Any,
    origin: Any,
    feat_art: Artifact,
    timings: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Artifact:
    """Store a head trained on the feature cache `feat_art` (`heads.base.Trained`), with the cache's
    dtype and ID among its inputs, `timings` (the feature pass's) beside its own, and `extra` meta."""
    from st2si_cli.heads.store import store_head

    meta = {
        **trained.meta,
        **(extra or {}),
        "dtype": FeaturesMeta.of(feat_art).dtype,
        "inputs": {"features": feat_art.id},
        "timings": {**timings, **trained.meta["timings"]},
    }
    return store_head(zoo, trained.tensors, origin, trained.config, meta)


def protocol_candidates(protocol: str) -> int | None:
    """None for "full" (rank every item), N for "candidates-N" (the target among N-1 sampled negatives)."""
    if protocol == "full":
        return None
    prefix, _, n = protocol.partition("-")
    if prefix == "candidates" and n.isdigit() and int(n) >= 2:
        return int(n)
    raise St2siError(f"protocol must be full or candidates-N (N >= 2), not {protocol!r}")


def evaluate(
    zoo: Zoo,
    domain: str,
    *,
    head_ref: str | None = None,
    split: str = "test",
    protocol: str = "full",
    ties: str = "pessimistic",
    mask_history: bool = False,
    backbone: str | None = None,
    feature_opts: FeatureOptions | None = None,
    ks: tuple[int, ...] = (10,),
    n_candidates: int = 20,
    seeds: int = 20,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Metrics of a head on the validation or test targets of its domain.

    The features are computed in `feature_opts.dtype`; None (and no `feature_opts`): the dtype the head
    was trained on, so the head's own feature cache is used and its recorded metrics are reproduced."""
    from st2si_cli.heads.choice import choose_head
    from st2si_cli.heads.registry import kind_of
    from st2si_cli.heads.store import check_compatible, head_text_config
    from st2si_cli.metrics import RankingProtocol, metrics_from_ranks
    from st2si_cli.model.samples import TEST, VALID
    from st2si_cli.train.head import alignment_accuracy

    if split not in ("valid", "test"):
        raise St2siError(f"split must be valid or test, not {split!r}")
    candidates = protocol_candidates(protocol)
    t0 = time.time()
    head = choose_head(zoo, domain, head_ref, backbone).head
    meta = HeadMeta.of(head)
    dataset_art = zoo.get(domain, kind="dataset")
    bb_art = zoo.get(backbone or meta.backbone or "", kind="backbone")
    check_compatible(head, backbone=bb_art, dataset=dataset_art)
    text = head_text_config(head)
    opts = feature_opts or FeatureOptions(dtype=None, alignment=True)
    if opts.dtype is None:
        opts = replace(opts, dtype=meta.dtype or "auto")
    n_items = DatasetMeta.of(dataset_art).catalog.items
    if candidates is not None and n_items and candidates > n_items:
        raise St2siError(f"protocol {protocol}: the catalog of {domain} has only {n_items} items")
    ds = read_dataset(zoo, dataset_art.id)
    _, fs, _ = get_features(zoo, bb_art.id, dataset_art, text, opts, reporter, ds=ds)
    role = VALID if split == "valid" else TEST
    kind = kind_of(head)
    weight = kind.ilp_weight(zoo, head)  # None: the kind does not rank with an ILP alone
    result: dict[str, Any] = {
        "domain": domain,
        "head": head.name,
        "head_id": head.id,
        "backbone": bb_art.name,
        "split": split,
        "protocol": RankingProtocol(ties, mask_history, ks, ranking=protocol).record(),
    }
    if candidates is None:  # one scoring pass: the ranks and the top-k lists of the same scores
        from st2si_cli.data.catalog import retired_items
        from st2si_cli.heads.top_lists import beyond_metrics, user_top_k

        never = retired_items(zoo, dataset_art)  # listed never, ranked as ever
        top = user_top_k(
            zoo, head, fs, ds.sequences, role, max(ks), ties=ties, mask_history=mask_history, never=never
        )
        result["metrics"] = metrics_from_ranks(top.ranks, ks)
        result["metrics"].update(beyond_metrics(top, ds.sequences, ks, int(meta.n_items or ds.n_items)))
    elif weight is None:
        raise St2siError(f"protocol {protocol} scores ILP heads only; {head.name} is a {kind.name} head")
    else:
        where = f"protocol {protocol} on {domain}"
        result["metrics"] = _candidate_metrics(weight, fs, ds, role, candidates, seeds, ties, where)
    if weight is not None:
        result["metrics"].update(alignment_accuracy(weight, fs))
    result["seconds"] = round(time.time() - t0, 2)
    return result


def _candidate_metrics(
    weight: Any, fs: Any, ds: Any, role: int, candidates: int, seeds: int, ties: str, where: str
) -> dict[str, Any]:
    """HR@1 among `candidates` (the target and N - 1 sampled negatives outside the history), over seeds."""
    from st2si_cli.metrics import candidate_hit_ratio
    from st2si_cli.train.head import history_exclusions

    rows = fs.rows(role)
    scores = fs.feats[rows] @ weight.float().T
    histories = history_exclusions(fs, rows, ds.sequences, role)
    try:
        return candidate_hit_ratio(
            scores, fs.targets[rows], histories, n_candidates=candidates, seeds=range(seeds), ties=ties
        )
    except ValueError as e:  # a user with fewer items outside their history than N - 1
        raise St2siError(f"{where}: {e}") from None
