"""Evaluation during and after full tuning: validation NDCG@10 shared by the ranks, final metrics per domain."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from st2si_cli.features.cache import FeatureSet
from st2si_cli.model.samples import TEST, VALID, Sample, plan_batches
from st2si_cli.model.scoring import rank_rows
from st2si_cli.model.st2si import ST2SI
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.config import PretrainConfig, RunSetup
from st2si_cli.pretrain.corpus import Corpus


def module_features(
    module: ST2SI, samples: Sequence[Sample], precision: str
) -> Callable[[list[int]], Tensor]:
    """`features_of(indices)`: the samples' query features [P, d] from the module's whole forward."""

    def features_of(ids: list[int]) -> Tensor:
        with dist.autocast(str(module.device), precision):
            return module.hidden_at([samples[i] for i in ids])

    return features_of


@torch.no_grad()
def collect_features(
    features_of: Callable[[list[int]], Tensor],
    samples: Sequence[Sample],
    cfg: PretrainConfig,
    shard: tuple[int, int] = (0, 1),
    equal_rounds: bool = False,
) -> dict[int, Tensor]:
    """Query features of this rank's share of `samples`: {sample index: [q, d] float32 on CPU}.

    Batches are planned over all samples (length-sorted) and dealt to ranks round-robin. With
    `equal_rounds` every rank runs the same number of forwards (ZeRO-3 gathers weights collectively).
    """
    rank, world = shard
    batches = plan_batches([len(s.tokens) for s in samples], cfg.eval_batch_tokens, cfg.eval_max_batch)
    rounds = -(-len(batches) // world)
    out: dict[int, Tensor] = {}
    for k in range(rounds):
        b = k * world + rank
        if b >= len(batches) and not equal_rounds:
            break
        idx = batches[b] if b < len(batches) else batches[0]
        h = features_of(idx).float().cpu()  # [P, d]
        if b >= len(batches):
            continue  # a filler forward
        start = 0
        for i in idx:
            q = len(samples[i].query_pos)
            out[i] = h[start : start + q]
            start += q
    return out


def validate(
    engine: dist.Engine,
    run: RunSetup,
    valid_samples: list[Sample],
    features_of: Callable[[list[int]], Tensor] | None = None,
) -> dict[str, float]:
    """Validation NDCG@10 (and friends) over the union catalog, work shared by the ranks.

    `features_of(indices)` gives the samples' query features (default: the module's whole forward).
    """
    from st2si_cli.metrics import metrics_from_ranks

    engine.eval()
    module = engine.module
    info = run.info
    feats = collect_features(
        features_of or module_features(module, valid_samples, run.precision),
        valid_samples,
        run.cfg,
        shard=(info.rank, info.world_size),
        equal_rounds=engine.zero_stage == 3,
    )
    with engine.gathered([module.ilp.weight]):
        weight = module.ilp.weight.detach().float().cpu()  # [N, d]
    mine = sorted(feats)
    ranks: list[int] = []
    if mine:
        h = torch.cat([feats[i] for i in mine])  # one VALID query per sample
        t = torch.tensor([valid_samples[i].targets[0] for i in mine])
        ranks = rank_rows(weight, h, t).tolist()
    gathered = dist.all_gather_objects(info, (mine, ranks))
    by_sample = {i: r for idx, rk in gathered for i, r in zip(idx, rk)}
    engine.train()
    return metrics_from_ranks([by_sample[i] for i in range(len(valid_samples))], (10,))


def final_metrics(
    module: ST2SI,
    corpus: Corpus,
    cfg: PretrainConfig,
    precision: str,
    features_of: Callable[[list[int]], Tensor] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, list[int]]]]:
    """(union metrics, per-domain metrics, per-domain ranks) of the given weights: valid, test and
    text->ID accuracy; ranks: {domain: {"valid": [...], "test": [...]}}, each user's target rank in the
    order of the domain's users (what paired per-user comparisons need).

    Per domain the head is its slice of the ILP, ranking that domain's items only (as `st2si eval` does).
    `features_of(indices into corpus.eval_samples)` gives the query features (default: the module's
    whole forward).
    """
    from st2si_cli.model.scoring import rank_rows
    from st2si_cli.train.head import alignment_accuracy, evaluate_split

    module.eval()
    samples = corpus.eval_samples
    feats = collect_features(features_of or module_features(module, samples, precision), samples, cfg)
    weight = module.ilp.weight.detach().float().cpu()

    def feature_set(keep: Callable[[int], bool], offset: int) -> FeatureSet:
        idx = [i for i in range(len(samples)) if keep(i)]
        return FeatureSet(
            feats=torch.cat([feats[i] for i in idx]),
            targets=torch.tensor([t - offset for i in idx for t in samples[i].targets], dtype=torch.long),
            roles=torch.tensor([r for i in idx for r in samples[i].roles], dtype=torch.int8),
            owner=torch.tensor([samples[i].owner for i in idx for _ in samples[i].targets], dtype=torch.long),
            sample=torch.tensor([i for i in idx for _ in samples[i].targets], dtype=torch.long),
        )

    def metrics(w: Tensor, fs: FeatureSet) -> dict[str, Any]:
        return {
            "valid": evaluate_split(w, fs, VALID),
            "test": evaluate_split(w, fs, TEST),
            "alignment": alignment_accuracy(w, fs),
        }

    def user_ranks(w: Tensor, fs: FeatureSet, role: int) -> list[int]:
        rows = fs.rows(role)
        rows = rows[torch.argsort(fs.owner[rows], stable=True)]  # the domain's users in order
        return rank_rows(w, fs.feats[rows], fs.targets[rows]).tolist()

    union = metrics(weight, feature_set(lambda i: True, 0))
    per_domain, ranks = {}, {}
    for k, name in enumerate(corpus.domains):
        off, n = corpus.offsets[k], corpus.sizes[k]
        fs = feature_set(lambda i, k=k: corpus.eval_domain[i] == k, off)
        per_domain[name] = metrics(weight[off : off + n], fs)
        ranks[name] = {split: user_ranks(weight[off : off + n], fs, role) for split, role in SPLITS}
    return union, per_domain, ranks


SPLITS = (("valid", VALID), ("test", TEST))


__all__ = ["collect_features", "final_metrics", "module_features", "validate"]
