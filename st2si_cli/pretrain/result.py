"""The end of a run (rank 0): the best weights' final metrics, then the backbone, one head per domain and
the run record into the zoo; the staging folder goes."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from st2si_cli import __version__
from st2si_cli.model.st2si import ST2SI, length_split_pays
from st2si_cli.pretrain import distributed as dist
from st2si_cli.pretrain.checkpoint import RunState
from st2si_cli.pretrain.config import RunSetup, default_out_name
from st2si_cli.pretrain.corpus import Corpus, steps_per_epoch
from st2si_cli.pretrain.evaluation import final_metrics
from st2si_cli.pretrain.loop import epoch_records
from st2si_cli.pretrain.tuning import merge_lora
from st2si_cli.pretrain.weights import load_trainable, store_backbone
from st2si_cli.zoo.store import Artifact


@dataclass
class PretrainResult:
    run: Artifact | None  # None on ranks other than 0
    backbone: Artifact | None
    heads: dict[str, Artifact]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def store_result(
    run: RunSetup, corpus: Corpus, tokenizer: Any, state: RunState, elapsed: float
) -> PretrainResult:
    """Rank 0: best weights -> final metrics -> backbone, heads and run into the zoo; staging removed."""
    from safetensors.torch import load_file

    t0 = time.time()
    best = merge_lora(load_file(str(run.stage / state.best_file)))  # LoRA folded in: a plain backbone
    run.reporter.message(f"Evaluating the best {_point_name(state)} on valid and test")
    union, per_domain, ranks = _final_metrics(run, corpus, best)
    eval_seconds = time.time() - t0

    cfg, text, bb_art = run.cfg, run.text, run.backbone
    name = run.out or default_out_name(bb_art.name or bb_art.short_id, corpus.domains, cfg, text)
    flags = run_flags(run)
    inputs: dict[str, Any] = {"backbone": bb_art.id, "datasets": [a.id for a in run.datasets]}
    if cfg.init_heads:
        inputs["init_heads"] = list(cfg.init_heads)
    config = {
        "train": cfg.to_dict(),
        "text": text.to_dict(),
        "precision": run.precision,
        "deepspeed": run.ds_config,
        "domains": corpus.domains,
        "offsets": corpus.offsets,
        "n_items": corpus.n_items,
        "steps_per_epoch": steps_per_epoch(corpus, cfg, run.info.world_size),
        "key": state.key,
    }
    s0 = time.time()
    backbone_state = {k.removeprefix("backbone."): v for k, v in best.items() if k.startswith("backbone.")}
    new_bb = store_backbone(
        run.zoo,
        bb_art,
        backbone_state,
        tokenizer,
        text.query,
        name,
        {
            "source": {
                "type": "st2si-pretrain",
                "from": bb_art.id,
                "from_name": bb_art.name,
                "domains": corpus.domains,
            },
            "inputs": inputs,
            "text": text.to_dict(),
            "query_token": text.query,
            "flags": flags,
            "metrics": union,
            "versions": {"torch": torch.__version__},
        },
    )
    ends = epoch_records(state.history)
    timings = {
        "total_seconds": round(elapsed + time.time() - t0, 2),
        "train_seconds": round(state.seconds["train"], 2),
        "valid_seconds": round(state.seconds["valid"], 2),
        "final_eval_seconds": round(eval_seconds, 2),
        "final_eval": run.final_eval,
        "epochs": len(ends),
        "epoch_seconds": round(sum(r["seconds"] for r in ends) / max(1, len(ends)), 2),
    }
    if run.activations is not None:
        timings["activation_cache"] = run.activations
    heads = _store_heads(run, corpus, state, HeadsInput(best["ilp.weight"], new_bb, per_domain, timings))
    timings["store_seconds"] = round(time.time() - s0, 2)
    meta = {
        "flags": flags,
        "config": config,
        "metrics": {**union, "domains": per_domain},
        "history": state.history,
        "best_epoch": state.best_epoch,
        "best_step": state.best_step,
        "stopped_by": state.stopped_by,
        "early_stopped": state.stopped_by == "patience",
        "timings": timings,
        "inputs": inputs,
        "world_size": run.info.world_size,
        "outputs": {"backbone": new_bb.id, "heads": {d: h.id for d, h in heads.items()}},
        "versions": {"st2si": __version__, "torch": torch.__version__},
    }
    art = run.zoo.put(
        "run",
        {
            "run.json": json.dumps(meta, indent=1, sort_keys=True).encode(),
            "ranks.json": json.dumps(
                {d: {split: " ".join(map(str, r)) for split, r in by.items()} for d, by in ranks.items()}
            ).encode(),
        },
        meta,
        name=f"run/{name}",
        domain="+".join(corpus.domains),
    )
    shutil.rmtree(run.stage, ignore_errors=True)
    return PretrainResult(art, new_bb, heads, union, state.history)


def _point_name(state: RunState) -> str:
    """The best validation point in words: the start, an epoch end, or a step within an epoch."""
    if state.best_step == 0:
        return "point (the starting weights)"
    ends = {r["steps"] for r in epoch_records(state.history)}
    if state.best_step in ends:
        return f"epoch ({state.best_epoch})"
    return f"point (epoch {state.best_epoch}, global step {state.best_step})"


def run_flags(run: RunSetup) -> dict[str, Any]:
    """The non-default choices (what `st2si zoo ls --kind run` shows); the run's `config` has every setting."""
    cfg, spec, world = run.cfg, run.deepspeed, run.info.world_size
    return {
        "no-multi-query": not cfg.multi_query,
        "no-alignment": not cfg.alignment,
        "sampling": cfg.sampling if cfg.sampling != "all" else None,
        "query-token": run.text.query if run.text.query != "dot" else None,
        "deepspeed": (spec if spec in dist.ZERO_PRESETS else "json") if spec else None,
        "world-size": world if world > 1 else None,
        "tune-layers": cfg.tune_layers or None,
        "no-activation-cache": True if cfg.tune_layers and not cfg.activation_cache else None,
        "init-head": len(cfg.init_heads) or None,
        "valid-every": cfg.valid_every or None,
        "dropout": cfg.dropout or None,
        "lora": cfg.lora or None,
        "head-lr": cfg.head_lr,
    }


def _final_metrics(
    run: RunSetup, corpus: Corpus, best: dict[str, Tensor]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(union, per-domain) metrics of the best weights, loaded into a fresh module (top-K tuning on an
    fp32 activation cache: its top layers on the cached inputs, the same arithmetic)."""
    from st2si_cli.pretrain.top import cached_final_features

    cached = cached_final_features(run, corpus, best)
    if cached is not None:
        run.final_eval = "activation cache"
        return final_metrics(cached[0], corpus, run.cfg, run.precision, features_of=cached[1])
    run.final_eval = "whole forward"
    model, _ = load_trainable(run.zoo, run.backbone, run.text.query)
    module = ST2SI(
        model, corpus.n_items, pad_id=corpus.pad_id, split_by_length=length_split_pays(run.info.device)
    )
    module.load_state_dict(best)
    module.to(run.info.device)
    return final_metrics(module, corpus, run.cfg, run.precision)


@dataclass
class HeadsInput:
    """What the per-domain heads are cut from and record."""

    ilp: Tensor  # [N_union, d], the best epoch's ILP
    backbone: Artifact  # the stored tuned backbone
    per_domain: dict[str, Any]  # each domain's final metrics
    timings: dict[str, Any]


def _store_heads(run: RunSetup, corpus: Corpus, state: RunState, h: HeadsInput) -> dict[str, Artifact]:
    """One head per domain: its slice of the union ILP, on the tuned backbone."""
    from st2si_cli.heads.ilp import save_ilp_head
    from st2si_cli.heads.store import HeadOrigin, head_meta

    heads: dict[str, Artifact] = {}
    for k, (art, domain) in enumerate(zip(run.datasets, corpus.domains)):
        off, n = corpus.offsets[k], corpus.sizes[k]
        meta = head_meta(
            "top-layers" if run.cfg.tune_layers else "full",
            kind=None,  # a pretrain's heads record no kind: they are ILPs
            train=run.cfg.to_dict(),
            metrics=h.per_domain[domain],
            best_epoch=state.best_epoch,
            history=state.history,
            timings=h.timings,
            dtype="float32",
            best_step=state.best_step,
            stopped_by=state.stopped_by,
            pretrain={
                "key": state.key,
                "domains": corpus.domains,
                "offset": off,
                "union_items": corpus.n_items,
            },
            inputs={"source_backbone": run.backbone.id},
        )
        heads[domain] = save_ilp_head(
            run.zoo, h.ilp[off : off + n], HeadOrigin(domain, h.backbone, art, run.text), meta
        )
    return heads


__all__ = ["PretrainResult", "run_flags", "store_result"]
