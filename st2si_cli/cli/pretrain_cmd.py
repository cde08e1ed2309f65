"""`st2si pretrain`: full tuning (backbone + ILP), or top-K tuning on cached activations, on one or more
domains, in one process or many."""

from __future__ import annotations

import typer

from st2si_cli.cli.options import (
    CacheDtype,
    Precision,
    QueryToken,
    Sampling,
    attribute_list,
    attributes_option,
    backbone_option,
    check_attributes,
    check_finite,
    check_new_name,
    check_positive,
    device_option,
    json_option,
    no_alignment_option,
    no_clean_option,
    no_multi_query_option,
    open_zoo,
    query_token_option,
    seed_option,
)
from st2si_cli.cli.output import err, metrics_table, out, print_jsonl
from st2si_cli.cli.reporting import RichReporter
from st2si_cli.zoo.meta import HeadMeta, RunMeta


def check_deepspeed(value: str | None) -> str | None:
    from pathlib import Path

    if value is None or value in ("zero0", "zero1", "zero2", "zero3") or Path(value).is_file():
        return value
    raise typer.BadParameter(f"{value!r} is not zero0..zero3 or an existing JSON file")


def pretrain_cmd(
    domain: list[str] = typer.Option(
        ..., "--domain", help="Dataset in the zoo; repeat for one item space over several."
    ),
    backbone: str = backbone_option("Backbone name or ID to start from."),
    out_name: str | None = typer.Option(
        None,
        "--out",
        help="Name of the new backbone (default BACKBONE-st2si-DOMAINS).",
        callback=check_new_name,
    ),
    epochs: int = typer.Option(
        30, "--epochs", min=1, help="Most epochs (early stopping usually ends sooner)."
    ),
    patience: int = typer.Option(
        5,
        "--patience",
        min=1,
        help="Validation points (epoch ends, and --valid-every points) without a better valid NDCG@10 "
        "before stopping.",
    ),
    valid_every: int = typer.Option(
        0,
        "--valid-every",
        min=0,
        help="Also validate every N optimizer steps within an epoch (0: at epoch ends only); the best "
        "point is kept. For runs that overfit within an epoch.",
    ),
    lr: float = typer.Option(
        5e-5, "--lr", callback=check_positive, help="AdamW learning rate (backbone and ILP)."
    ),
    weight_decay: float = typer.Option(0.0, "--weight-decay", min=0.0, callback=check_finite),
    head_lr: float | None = typer.Option(
        None,
        "--head-lr",
        callback=check_positive,
        help="The ILP's own learning rate (default: --lr): random item rows may want a larger step than "
        "pretrained layers.",
    ),
    dropout: float = typer.Option(
        0.0,
        "--dropout",
        min=0.0,
        max=0.9,
        callback=check_finite,
        help="Dropout on the tuned layers' attention and MLP outputs, in training only (OPT-125m, the "
        "authors' backbone, has 0.1 built in; Llama has none).",
    ),
    lora: int = typer.Option(
        0,
        "--lora",
        min=0,
        help="LoRA of this rank on every linear layer of the tuned layers (peft); only LoRA and the ILP "
        "train. Folded into plain weights when stored (0: the weights themselves train).",
    ),
    warmup_steps: int = typer.Option(
        100,
        "--warmup-steps",
        min=0,
        help="Linear warm-up steps, then cosine (clipped to a tenth of the run).",
    ),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Samples per micro-batch per process."),
    grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Micro-batches per optimizer step."),
    max_grad_norm: float = typer.Option(
        1.0, "--max-grad-norm", min=0.0, callback=check_finite, help="Gradient clipping (0: off)."
    ),
    sampling: Sampling = typer.Option(
        Sampling.all,
        "--sampling",
        help="all: every training query of each history; crop: one random crop per user per epoch.",
    ),
    no_multi_query: bool = no_multi_query_option("Only the last query of each history trains."),
    no_alignment: bool = no_alignment_option(),
    tune_layers: int = typer.Option(
        0,
        "--tune-layers",
        min=0,
        help="Tune only the top K layers, the final norm and the ILP on activations cached once (0: all layers).",
    ),
    no_activation_cache: bool = typer.Option(
        False,
        "--no-activation-cache",
        help="With --tune-layers: run the frozen layers at every step instead of caching their output.",
    ),
    cache_dtype: CacheDtype = typer.Option(
        CacheDtype.bf16, "--cache-dtype", help="dtype of the activation cache: bf16 (half the disk) or fp32."
    ),
    init_head: list[str] = typer.Option(
        [],
        "--init-head",
        help="Start the ILP from this ILP head (trained by `adapt` on the same backbone and dataset) "
        "instead of random rows; repeat for several domains.",
    ),
    query_token: QueryToken = query_token_option(
        "dot: the tokenizer's '.'; new: an added [Q] token (saved with the backbone)."
    ),
    attributes: str = attributes_option("Item attributes in order, comma-separated."),
    max_items: int = typer.Option(50, "--max-items", min=1, help="Newest history items kept per user."),
    max_tokens: int = typer.Option(
        1024, "--max-tokens", min=16, help="Token budget of a history, newest first."
    ),
    no_clean: bool = no_clean_option(),
    seed: int = seed_option(),
    device: str = device_option(
        "auto", help="auto (cuda:LOCAL_RANK if a GPU is visible, else cpu), cpu, cuda, cuda:N."
    ),
    precision: Precision = typer.Option(
        Precision.auto, "--precision", help="auto: bf16, else fp16, on GPU; fp32 on CPU."
    ),
    deepspeed: str | None = typer.Option(
        None,
        "--deepspeed",
        callback=check_deepspeed,
        help="zero0, zero1, zero2, zero3 or a DeepSpeed JSON config. On first use DeepSpeed builds an op; "
        "a run waits for another process's build at most $ST2SI_OP_BUILD_WAIT_S seconds (default 300).",
    ),
    max_minutes: float = typer.Option(
        0.0,
        "--max-minutes",
        min=0.0,
        callback=check_finite,
        help="Stop at the first validation point (epoch end, or --valid-every point) past this many minutes "
        "of training and validation (0: no limit); the best point so far is kept and the record says "
        "stopped_by: time.",
    ),
    save_every: int = typer.Option(
        0, "--save-every", min=0, help="Also checkpoint every N optimizer steps (0: epoch ends only)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run with these settings."),
    restart: bool = typer.Option(
        False, "--restart", help="Discard an interrupted run's checkpoint and start over."
    ),
    eval_batch_tokens: int = typer.Option(
        16384, "--eval-batch-tokens", min=64, help="Padded tokens per validation batch."
    ),
    json_out: bool = json_option("Print the run's record as JSON."),
) -> None:
    """Full tuning with multi-query input and ID alignment: a new backbone, a head per domain, a run record.

    `--tune-layers K` freezes everything below the top K layers and caches their output once (in the
    zoo), so each epoch costs the top K layers' forward and backward only.

    \b
    Examples:
      st2si pretrain --domain ml-100k --backbone smollm2-135m --epochs 10 --json
      st2si pretrain --domain amazon-scientific --tune-layers 2
      torchrun --nproc_per_node 2 -m st2si_cli pretrain --domain A --domain B

    One process: `st2si pretrain --domain A`. Several: `torchrun --nproc_per_node 2 -m st2si_cli pretrain ...`
    (torch DDP) or `deepspeed --num_gpus 8 --no_local_rank -m st2si_cli pretrain ... --deepspeed zero2`.
    """
    from st2si_cli.heads.choice import metrics_record
    from st2si_cli.model.text import TextConfig
    from st2si_cli.pretrain.config import PretrainConfig
    from st2si_cli.pretrain.distributed import launch_env
    from st2si_cli.pretrain.full import pretrain

    if resume and restart:
        raise typer.BadParameter("--resume and --restart exclude each other", param_hint="'--restart'")
    if no_activation_cache and not tune_layers:
        raise typer.BadParameter(
            "the activation cache is used only with --tune-layers K", param_hint="'--no-activation-cache'"
        )
    zoo = open_zoo()
    check_attributes(zoo, list(domain), attribute_list(attributes))
    text = TextConfig(
        attributes=attribute_list(attributes),
        max_items=max_items,
        max_tokens=max_tokens,
        query=query_token.value,
        clean=not no_clean,
    )
    cfg = PretrainConfig(
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_grad_norm=max_grad_norm,
        sampling=sampling.value,
        multi_query=not no_multi_query,
        alignment=not no_alignment,
        seed=seed,
        precision=precision.value,
        save_every=save_every,
        max_minutes=max_minutes,
        eval_batch_tokens=eval_batch_tokens,
        tune_layers=tune_layers,
        activation_cache=not no_activation_cache,
        cache_dtype=cache_dtype.value,
        init_heads=tuple(init_head),
        valid_every=valid_every,
        dropout=dropout,
        lora=lora,
        head_lr=head_lr,
    )
    main_rank = launch_env()[0] == 0
    reporter = RichReporter(quiet=json_out or not main_rank)
    try:
        result = pretrain(
            zoo,
            domain,
            backbone=backbone,
            text=text,
            cfg=cfg,
            out=out_name,
            device=device,
            deepspeed=deepspeed,
            resume=resume,
            restart=restart,
            reporter=reporter,
        )
    finally:
        reporter.close()
    if result.run is None:  # ranks other than 0 print nothing
        return
    run_meta = RunMeta.of(result.run)
    if json_out:  # one line per domain's head, in the shape of adapt and eval
        for head in result.heads.values():
            print_jsonl(
                {
                    **metrics_record(head),
                    "valid": HeadMeta.of(head).metrics.valid,
                    "backbone": result.backbone.name,
                    "run": result.run.name,
                    "run_id": result.run.id,
                    "best_epoch": run_meta.best_epoch,
                    "best_step": run_meta.best_step,
                    "stopped_by": run_meta.stopped_by,
                    "early_stopped": run_meta.early_stopped,
                    "history": run_meta.history,
                    "flags": run_meta.flags,
                    "world_size": run_meta.world_size,
                    "timings": run_meta.timings,
                }
            )
        return
    rows = {"valid": run_meta.metrics.valid, "test": run_meta.metrics.with_alignment("test")}
    if len(domain) > 1:
        rows.update({f"test {d}": m.test for d, m in run_meta.metrics.domains.items()})
    best = f"best epoch {run_meta.best_epoch}" if run_meta.best_epoch else "best: the starting weights"
    out.print(metrics_table(f"{result.backbone.name} ({best})", rows))
    t = run_meta.timings
    err.print(
        f"Stored backbone {result.backbone.name} ({result.backbone.short_id}), heads "
        f"{', '.join(h.name for h in result.heads.values())} and {result.run.name}; "
        f"{t['epochs']} epochs, {t['epoch_seconds']:.1f}s each, {t['total_seconds']:.0f}s in all",
        markup=False,
    )
    if "activation_cache" in t:
        a = t["activation_cache"]
        err.print(
            f"Activation cache (states entering layer {a['layer']}): {a['bytes'] / 1e6:.1f} MB {a['dtype']}, "
            f"{a['tokens']} tokens, "
            + ("found in the zoo" if a["reused"] else f"built in {a['seconds']:.0f}s"),
            markup=False,
        )
