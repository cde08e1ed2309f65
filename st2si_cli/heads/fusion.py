"""Fusion heads (`st2si_cli.model.fusion`): the ILP and sequence adapters of one feature cache, their
log-probabilities mixed with a weight w chosen on validation NDCG@10 from a fixed grid (test is read
once, after the choice).

A fusion is made from stored heads (`fuse_heads`, `st2si fuse`) or trained whole on a feature set
(`FusionConfig`: the ILP's and each adapter's settings); either way `choose_w` picks the weight.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from st2si_cli.errors import MismatchError
from st2si_cli.heads.adapter import ADAPTER, SASREC
from st2si_cli.heads.base import PLAIN, HeadKind, How, Placing, Trained, batched_top_k
from st2si_cli.heads.ilp import ILP, ILP_KINDS
from st2si_cli.heads.store import (
    HeadOrigin,
    head_meta,
    head_text_config,
    load_head_tensors,
    store_head,
    stored_module_args,
)
from st2si_cli.progress import Reporter
from st2si_cli.zoo.meta import HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
CONFIG_KIND = "st2si-fusion-head"


@dataclass
class FusionConfig:
    """A fusion trained whole on a feature set: its ILP, its adapters (an ensemble if several), the grid of w."""

    ilp: Any = None  # HeadConfig (None: its defaults)
    adapters: list[Any] = field(default_factory=lambda: [None])  # AdapterConfigs (None: the defaults)
    weights: tuple[float, ...] = WEIGHTS


class FusionKind(HeadKind):
    name = "fusion"
    config_kind = CONFIG_KIND
    reads_every_query = True

    def default_config(self) -> Any:
        return FusionConfig()

    def accepts(self, cfg: Any) -> bool:
        return isinstance(cfg, FusionConfig)

    def train(self, fs: Any, ds: Any, cfg: Any, *, reporter: Reporter, how: How = PLAIN) -> Trained:
        from st2si_cli.model.adapter import load_adapter
        from st2si_cli.model.fusion import Fusion

        t0 = time.time()
        cfg = cfg or self.default_config()
        parts_how = How(how.sweep_trials, how.deadline)  # each part starts afresh
        ilp = ILP.train(fs, ds, cfg.ilp, reporter=reporter, how=parts_how)
        parts = [
            (ADAPTER if c.use_text else SASREC).train(fs, ds, c, reporter=reporter, how=parts_how)
            for c in cfg.adapters
        ]
        d_feat = int(fs.feats.shape[1])
        adapters = [load_adapter(p.tensors, p.meta["train"], d_feat, ds.n_items) for p in parts]
        fusion = Fusion(ilp.tensors["weight"].float(), adapters, 0.0)
        sweep, metrics = choose_w(fusion, fs, ds.sequences, cfg.weights)
        train = _fusion_train(fusion.w, ilp.meta["train"], [p.meta["train"] for p in parts])
        meta = _fusion_meta(train, sweep, metrics, d_feat, time.time() - t0)
        return Trained(fusion.tensors([p.tensors for p in parts]), _config(fusion, ds.n_items, d_feat), meta)

    def load(self, zoo: Zoo, head: Artifact) -> Any:
        from st2si_cli.model.fusion import load_fusion

        return load_fusion(*stored_module_args(zoo, head))

    def ranks(
        self, scorer: Any, fs: Any, sequences: Any, role: int, *, ties: str, exclude: Any = None
    ) -> Any:
        from st2si_cli.metrics import rank_of_target

        ilp, adapter, targets = _split_scores(scorer, fs, sequences, role)
        return rank_of_target(scorer.mix(ilp, adapter), targets, ties=ties, exclude=exclude)

    def score_batches(
        self, scorer: Any, fs: Any, sequences: Any, role: int, batch: int
    ) -> Iterator[tuple[Any, Any]]:
        from st2si_cli.heads.adapter import adapter_last_scores
        from st2si_cli.heads.ilp import ilp_score_batches, user_rows
        from st2si_cli.train.adapter_data import eval_windows, user_sequences

        rows = user_rows(fs, role, len(sequences))
        users = user_sequences(fs, sequences)
        windows = [eval_windows(users, role, a.cfg.max_len) for a in scorer.adapters]
        for b0 in range(0, len(rows), batch):
            scored = [
                adapter_last_scores(a, fs, w[b0 : b0 + batch]) for a, w in zip(scorer.adapters, windows)
            ]
            targets = scored[0][1]
            ilp = None
            if scorer.ilp_weight is not None:
                ilp, targets = next(ilp_score_batches(scorer.ilp_weight, fs, rows[b0 : b0 + batch], batch))
            yield scorer.mix(ilp, [part for part, _ in scored]), targets

    def top_k(
        self, scorer: Any, feats: list[Any], catalog_ids: list[list[int | None]], k: int, exclude: Any
    ) -> tuple[Any, Any]:
        return batched_top_k(scorer.score_histories, feats, catalog_ids, k, exclude)

    def extend(
        self, zoo: Zoo, head: Artifact, tensors: dict[str, Any], placing: Placing
    ) -> tuple[dict, dict]:
        from st2si_cli.heads.placement import extend_adapter, ilp_rows, set_rows
        from st2si_cli.model.fusion import ILP_TENSOR

        out: dict[str, Any] = {}
        info: dict[str, Any] = {"method": "adapter item text"}
        if ILP_TENSOR in tensors:  # an ensemble of adapters alone has none
            ilp = zoo.find(Inputs.of(head).first("ilp_head") or "", kind="head")
            own_map = ILP_KINDS.get(HeadMeta.of(ilp).kind if ilp is not None else ILP.name, ILP).own_map
            rows, info = ilp_rows(tensors[ILP_TENSOR], own_map, placing)
            out[ILP_TENSOR] = set_rows(tensors[ILP_TENSOR], rows, placing.n_items)
        prefixes = sorted({k.split(".", 1)[0] + "." for k in tensors if k != ILP_TENSOR})
        for prefix in prefixes:  # "adapter." for the first adapter, "adapter1." ... for an ensemble's others
            adapter = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            grown = extend_adapter(adapter, placing.text, placing.n_items, placing.id_from)
            out.update({prefix + k: v for k, v in grown.items()})
        return out, info

    def command(self, zoo: Zoo, head: Artifact, name_of: Any) -> list[str] | None:
        import shlex

        from st2si_cli.zoo.meta import Inputs

        inputs = Inputs.of(head)
        domain = HeadMeta.of(head).domain or head.domain or "DOMAIN"
        cmd = ["st2si", "fuse", "--domain", domain]
        if inputs.first("ilp_head"):
            cmd += ["--ilp", name_of(inputs.first("ilp_head"))]
        for role, ids in inputs.refs.items():
            if role.startswith("adapter"):
                for ref in ids:
                    cmd += ["--adapter", name_of(ref)]
        return [shlex.join([*cmd, "--name", head.name or head.short_id])]

    def id_only(self, train: Any) -> bool:
        """An ensemble of ID-only adapters without an ILP (the recipe's ID-only reference)."""
        train = train or {}
        adapters = train.get("adapters") or [train.get("adapter") or {}]
        return "ilp" not in train and all(a.get("use_text") is False for a in adapters)


FUSION = FusionKind()


def _split_scores(fusion: Any, fs: Any, sequences: Any, role: int) -> tuple[Any, list[Any], Any]:
    """(ILP scores, each adapter's scores, targets) of each user's VALID or TEST target, in user order."""
    import torch

    from st2si_cli.train.adapter import EVAL_BATCH
    from st2si_cli.train.adapter_data import collate, eval_windows, user_sequences

    rows = fs.rows(role)
    order = torch.argsort(fs.owner[rows])
    rows = rows[order]
    ilp = fusion.ilp_scores(fs.feats[rows]) if fusion.ilp_weight is not None else None
    users = user_sequences(fs, sequences)
    scores = []
    for adapter in fusion.adapters:
        windows = eval_windows(users, role, adapter.cfg.max_len)
        parts = []
        with torch.no_grad():
            for b0 in range(0, len(windows), EVAL_BATCH):
                feats, ids, lengths, _ = collate(
                    fs, windows[b0 : b0 + EVAL_BATCH], adapter.n_items, feats=adapter.cfg.use_text
                )
                parts.append(adapter.score_last(feats, ids, lengths))
        scores.append(torch.cat(parts))
    return ilp, scores, fs.targets[rows]


def choose_w(
    fusion: Any, fs: Any, sequences: Any, weights: tuple[float, ...] = WEIGHTS
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Set `fusion.w` to the grid point with the best validation NDCG@10 (the first of equals: the grid's
    order); (the sweep's record, validation and test metrics). Test is scored once, after the choice."""
    from st2si_cli.metrics import metrics_from_ranks, rank_of_target
    from st2si_cli.model.samples import TEST, VALID

    ilp_s, ad_s, targets = _split_scores(fusion, fs, sequences, VALID)
    if ilp_s is None:  # an ensemble of adapters alone: nothing to weigh
        weights = (0.0,)
    trials = []
    for w in weights:
        fusion.w = w
        ranks = rank_of_target(fusion.mix(ilp_s, ad_s), targets)
        trials.append({"w": w, "valid_ndcg10": metrics_from_ranks(ranks)["NDCG@10"]})
    best = max(trials, key=lambda t: t["valid_ndcg10"])
    fusion.w = best["w"]
    metrics = {
        "valid": metrics_from_ranks(rank_of_target(fusion.mix(ilp_s, ad_s), targets)),
        "test": metrics_from_ranks(FUSION.ranks(fusion, fs, sequences, TEST, ties="pessimistic")),
        "alignment": {},
    }
    sweep = {
        "selection": "best validation NDCG@10 (test never seen)",
        "grid": {"w": list(weights)},
        "chosen": {"w": fusion.w},
        "trials": trials,
    }
    return sweep, metrics


def _fusion_train(w: float, ilp: Any, adapters: list[Any]) -> dict[str, Any]:
    train: dict[str, Any] = {"w": w, "ilp": ilp, "adapter": adapters[0]}
    if ilp is None:  # an ensemble of adapters alone
        del train["ilp"]
    if len(adapters) > 1:  # written only for ensembles, so a one-adapter fusion keeps its old identity
        train["adapters"] = adapters
    return train


def _fusion_meta(
    train: dict[str, Any], sweep: dict[str, Any], metrics: dict[str, Any], d_feat: int, seconds: float
) -> dict[str, Any]:
    return head_meta(
        "fusion",
        kind=FUSION.name,
        train=train,
        metrics=metrics,
        best_epoch=None,
        history=[],
        timings={"training_seconds": round(seconds, 2)},
        d_feat=d_feat,
        sweep=sweep,
    )


def _config(fusion: Any, n_items: int, d_feat: int) -> dict[str, Any]:
    return {"kind": CONFIG_KIND, "n_items": n_items, "hidden": d_feat}


def fuse_heads(
    zoo: Zoo,
    ilp: Artifact | None,
    adapters: list[Artifact],
    *,
    name: str | None = None,
    weights: tuple[float, ...] = WEIGHTS,
) -> Artifact:
    """Store the fusion of a stored ILP head and adapter heads of the same cache, w chosen on validation;
    without an ILP (None), the ensemble of the adapters alone."""
    from st2si_cli.data.prepare import load_dataset
    from st2si_cli.features.cache import load_feature_set
    from st2si_cli.model.fusion import Fusion

    t0 = time.time()
    feats_ref = _check_parts(ilp, adapters)
    fs = load_feature_set(zoo, zoo.get(feats_ref, kind="features"))
    first = ilp if ilp is not None else adapters[0]
    first_meta = HeadMeta.of(first)
    dataset = zoo.get(first_meta.dataset or "", kind="dataset")
    ds = load_dataset(zoo, dataset.id)
    ilp_weight = ILP.load(zoo, ilp).float() if ilp is not None else None
    fusion = Fusion(ilp_weight, [ADAPTER.load(zoo, a) for a in adapters], 0.0)
    sweep, metrics = choose_w(fusion, fs, ds.sequences, weights)
    ilp_train = HeadMeta.of(ilp).train if ilp is not None else None
    train = _fusion_train(fusion.w, ilp_train, [HeadMeta.of(a).train for a in adapters])
    inputs: dict[str, Any] = {"features": feats_ref, "adapter_head": adapters[0].id}
    if ilp is not None:
        inputs["ilp_head"] = ilp.id
    if len(adapters) > 1:
        inputs["adapter_heads"] = [a.id for a in adapters]
    d_feat = int(HeadMeta.of(adapters[0]).d_feat or 0)
    meta = _fusion_meta(train, sweep, metrics, d_feat, time.time() - t0)
    meta.update(dtype=first_meta.dtype, inputs=inputs)
    backbone = zoo.get(first_meta.backbone or "", kind="backbone")
    origin = HeadOrigin(first.domain or dataset.name, backbone, dataset, head_text_config(first), name)
    tensors = fusion.tensors([load_head_tensors(zoo, a) for a in adapters])
    return store_head(zoo, tensors, origin, _config(fusion, ds.n_items, d_feat), meta)


def _check_parts(ilp: Artifact | None, adapters: list[Artifact]) -> str:
    """The feature cache the heads to fuse share; a MismatchError where they cannot be fused."""
    if not adapters:
        raise MismatchError("fuse needs at least one adapter head")
    ilp_kind = HeadMeta.of(ilp).kind if ilp is not None else None
    if ilp is not None and ilp_kind not in ILP_KINDS:
        raise MismatchError(f"fuse needs an ILP head first, not a {ilp_kind} head ({ilp.name})")
    first = ilp if ilp is not None else adapters[0]
    for adapter in adapters:
        kind = HeadMeta.of(adapter).kind
        if kind not in (ADAPTER.name, SASREC.name):
            raise MismatchError(f"fuse mixes adapter heads with the ILP, not a {kind} head")
        for key in ("backbone", "dataset", "catalog_hash", "text"):
            if first.meta.get(key) != adapter.meta.get(key):
                raise MismatchError(
                    f"heads {first.name} and {adapter.name} differ in {key}: they cannot be fused"
                )
    feats_refs = {Inputs.of(head).first("features") for head in (*adapters, first)} - {None}
    if len(feats_refs) != 1:
        raise MismatchError("the heads to fuse were trained on different feature caches")
    return feats_refs.pop()
