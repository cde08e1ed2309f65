"""`st2si adapt` and `st2si eval`."""

from __future__ import annotations

import typer

from st2si_cli.cli.options import (
    Dtype,
    HeadKind,
    Positions,
    QueryToken,
    Schedule,
    Split,
    Ties,
    attribute_list,
    attributes_option,
    backbone_option,
    check_attributes,
    check_candidates,
    check_finite,
    check_new_name,
    check_positive,
    check_protocol,
    device_option,
    dtype_option,
    head_ref_option,
    json_option,
    no_alignment_option,
    no_clean_option,
    no_multi_query_option,
    open_zoo,
    query_token_option,
    seed_option,
)
from st2si_cli.cli.output import err, metrics_table, out, print_jsonl, safe_text
from st2si_cli.cli.reporting import RichReporter, say_default_and_reference
from st2si_cli.zoo.meta import HeadMeta


def adapt_cmd(
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo (from `st2si prepare`)."),
    backbone: str = backbone_option("Backbone name or ID in the zoo."),
    head_kind: HeadKind | None = typer.Option(
        None,
        "--head",
        show_default=False,
        help="Train one head instead of the recipe. ilp: the paper's item linear projection (the "
        "paper-faithful option); "
        "ilp-text: ILP rows initialised from each item's text feature; adapter: "
        "sequence adapter (SASRec over the LM's features, item text and IDs); sasrec: the same "
        "adapter on item IDs only, the in-tool ID-only reference. Left out: the recipe (ID-only "
        "adapters, the swept ILP, an adapter over the LM's features, their fusions, the best on "
        "validation kept).",
    ),
    budget: str = typer.Option(
        "60m",
        "--budget",
        help="Recipe: training time allowed (90s, 30m, 2h or none); no epoch starts past it, a rerun "
        "with a larger one continues. The feature pass is not counted.",
    ),
    seeds: int = typer.Option(
        3, "--seeds", min=1, max=16, help="Recipe: ID-only adapters (seeds 0..N-1) in the ensemble."
    ),
    sweep: bool = typer.Option(
        False,
        "--sweep",
        help="Try points of a small grid on the cached features and keep the "
        "best on validation (ILP: lr, weight decay, dropout, batch size, cosine schedule; "
        "adapter: width, dropout, lr, weight decay). Recorded in the head.",
    ),
    sweep_trials: int = typer.Option(
        8, "--sweep-trials", min=0, help="Grid points tried by --sweep (0: all 16)."
    ),
    lr: float | None = typer.Option(
        None,
        "--lr",
        callback=check_positive,
        help="AdamW learning rate (default: ILP 3e-4, the authors'; 1e-4 suits a pretrained backbone; adapter 1e-3).",
    ),
    batch_size: int | None = typer.Option(
        None,
        "--batch-size",
        min=1,
        help="Per step: ILP query positions (256); adapter history windows (128).",
    ),
    epochs: int | None = typer.Option(
        None,
        "--epochs",
        min=1,
        help="Most epochs, early stopping usually ends sooner (ILP 100, adapter 200).",
    ),
    patience: int | None = typer.Option(
        None,
        "--patience",
        min=1,
        help="Epochs without a better valid NDCG@10 before stopping (ILP 5, adapter 10).",
    ),
    weight_decay: float | None = typer.Option(
        None, "--weight-decay", min=0.0, callback=check_finite, help="AdamW weight decay (default 0)."
    ),
    schedule: Schedule = typer.Option(
        Schedule.constant, "--schedule", help="constant or cosine (to 0 at --epochs)."
    ),
    warmup: float = typer.Option(
        0.0,
        "--warmup",
        min=0.0,
        max=1.0,
        callback=check_finite,
        help="Fraction of the schedule spent warming up.",
    ),
    dropout: float | None = typer.Option(
        None,
        "--dropout",
        min=0.0,
        max=0.95,
        callback=check_finite,
        help="ILP: dropout on the features while training (0); adapter: hidden and attention dropout (0.5).",
    ),
    hidden: int | None = typer.Option(None, "--hidden", min=8, help="Adapter width (64)."),
    seed: int = seed_option(),
    attributes: str = attributes_option(
        "Item attributes in order, comma-separated (e.g. title,brand,category)."
    ),
    max_items: int = typer.Option(
        50, "--max-items", min=1, help="Items per history window (the newest at inference)."
    ),
    max_tokens: int = typer.Option(
        1024, "--max-tokens", min=16, help="Token budget of a window, newest first."
    ),
    stride: int | None = typer.Option(
        None,
        "--stride",
        min=1,
        help="Training windows step back this many positions "
        "(default: half of --max-items), so every position trains once and sees at least "
        "max-items - stride earlier items; = --max-items: non-overlapping windows.",
    ),
    positions: Positions = typer.Option(
        Positions.all,
        "--positions",
        help="all: every training position gets a row "
        "(windows); newest: only the newest window of each history (faster, fewer "
        "training rows).",
    ),
    query_token: QueryToken = query_token_option(),
    no_multi_query: bool = no_multi_query_option("Train on each user's last query only."),
    no_alignment: bool = no_alignment_option(),
    no_clean: bool = no_clean_option(),
    trim_periods: bool = typer.Option(
        False,
        "--trim-periods",
        help="Drop periods that end an attribute (Amazon titles "
        "end in '.', so with the '.' query every query would read '..').",
    ),
    dtype: Dtype = dtype_option("Backbone dtype: auto (bf16 where native) or a fixed one."),
    device: str = device_option(),
    batch_tokens: int = typer.Option(
        16384, "--batch-tokens", min=64, help="Padded tokens per forward batch."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Name of the new head (default DOMAIN/BACKBONE).", callback=check_new_name
    ),
    json_out: bool = json_option("Print the head's record as JSON."),
) -> None:
    """Train a new head for a domain on a frozen backbone (features cached in the zoo).

    \b
    Without --head: the recipe (ID-only adapters, the swept ILP, an adapter over the LM's features,
    their fusions; each stage stored as a head DOMAIN/recipe-..., the best on validation becomes the
    domain's default).

    \b
    Examples:
      st2si adapt --domain ml-100k                       # the recipe, within --budget 60m
      st2si adapt --domain ml-100k --budget 2h           # continues a recipe the budget stopped
      st2si adapt --domain ml-100k --head ilp            # the paper's head alone
      st2si adapt --domain ml-100k --head adapter --epochs 50 --json
    """
    import dataclasses

    from st2si_cli.adapt import FeatureOptions, adapt
    from st2si_cli.heads.choice import metrics_record
    from st2si_cli.heads.registry import get_kind
    from st2si_cli.model.text import TextConfig

    if head_kind is None:
        from st2si_cli.cli.recipe_cmd import parse_budget_option, refuse_head_options

        refuse_head_options(
            {
                "--sweep": sweep,
                "--lr": lr is not None,
                "--batch-size": batch_size is not None,
                "--epochs": epochs is not None,
                "--patience": patience is not None,
                "--weight-decay": weight_decay is not None,
                "--schedule": schedule is not Schedule.constant,
                "--warmup": bool(warmup),
                "--dropout": dropout is not None,
                "--hidden": hidden is not None,
                "--seed": bool(seed),
                "--name": name is not None,
                "--positions": positions is Positions.newest,
                "--no-multi-query": no_multi_query,
                "--no-alignment": no_alignment,
            }
        )
        budget_s = parse_budget_option(budget)
    kind = get_kind(head_kind.value if head_kind is not None else "adapter")
    fields = {f.name for f in dataclasses.fields(kind.default_config())}
    if kind.reads_every_query and positions is Positions.newest:
        raise typer.BadParameter(
            f"the {kind.name} head reads every position: use all", param_hint="'--positions'"
        )
    if hidden is not None and "hidden" not in fields:
        raise typer.BadParameter(
            "sets the adapter's width: use it with --head adapter or --head sasrec", param_hint="'--hidden'"
        )
    if stride is not None and stride > max_items:
        raise typer.BadParameter(
            f"{stride} is more than --max-items ({max_items}): windows would skip positions",
            param_hint="'--stride'",
        )
    if "schedule" not in fields and (schedule is not Schedule.constant or warmup):
        raise typer.BadParameter(
            f"sets the ILP's learning-rate schedule: the {kind.name} head does not use it",
            param_hint="'--schedule'" if schedule is not Schedule.constant else "'--warmup'",
        )
    zoo = open_zoo()
    check_attributes(zoo, [domain], attribute_list(attributes))
    text = TextConfig(
        attributes=attribute_list(attributes),
        max_items=max_items,
        max_tokens=max_tokens,
        stride=stride,
        query=query_token.value,
        clean=not no_clean,
        trim_periods=trim_periods,
        positions=positions.value,
    )
    feature_opts = FeatureOptions(dtype=dtype.value, device=device, batch_tokens=batch_tokens, alignment=True)
    if head_kind is None:
        from st2si_cli.cli.recipe_cmd import run_recipe_cmd
        from st2si_cli.recipe.settings import RecipeStages

        recipe = {"backbone": backbone, "text": text, "feature_opts": feature_opts}
        recipe["stages"] = RecipeStages(seeds=seeds)
        run_recipe_cmd(zoo, domain, json_out=json_out, budget_s=budget_s, **recipe)
        return
    # Settings left out keep the head kind's own defaults.
    given = {
        "lr": lr,
        "weight_decay": weight_decay,
        "batch_size": batch_size,
        "max_epochs": epochs,
        "patience": patience,
        "dropout": dropout,
    }
    given = {k: v for k, v in given.items() if v is not None}
    given.update(
        seed=seed,
        hidden=hidden,
        multi_query=not no_multi_query,
        alignment=not no_alignment,
        schedule=schedule.value,
        warmup=warmup,
    )
    head_cfg = dataclasses.replace(
        kind.default_config(), **{k: v for k, v in given.items() if k in fields and v is not None}
    )
    reporter = RichReporter()
    try:
        head = adapt(
            zoo,
            domain,
            backbone=backbone,
            text=text,
            head_cfg=head_cfg,
            feature_opts=feature_opts,
            name=name,
            reporter=reporter,
            sweep_trials=sweep_trials if sweep else None,
        )
    finally:
        reporter.close()
    if head is None:  # a torchrun worker rank: its share of the feature pass is done, rank 0 trains
        return
    hm = HeadMeta.of(head)
    if json_out:
        print_jsonl(
            {
                **metrics_record(head),
                "kind": hm.kind,
                "valid": hm.metrics.valid,
                "best_epoch": hm.best_epoch,
                "train": hm.train,
                "sweep": hm.sweep,
                "timings": hm.timings,
            }
        )
        say_default_and_reference(zoo, domain, head)
        return
    out.print(
        metrics_table(
            f"{head.name} (best epoch {hm.best_epoch})",
            {"valid": hm.metrics.valid, "test": hm.metrics.with_alignment("test")},
        )
    )
    t = hm.timings
    err.print(
        f"Stored head {head.name} ({head.short_id}); features {t['features_seconds']:.1f}s, "
        f"training {t['training_seconds']:.1f}s",
        markup=False,
    )
    say_default_and_reference(zoo, domain, head)


def eval_cmd(
    domain: str = typer.Option(..., "--domain"),
    head: str | None = head_ref_option(),
    split: Split = typer.Option(Split.test, "--split", help="Which targets: validation or test."),
    protocol: str = typer.Option(
        "full",
        "--protocol",
        callback=check_protocol,
        help="full (rank all items) or candidates-N, e.g. candidates-20.",
    ),
    ties: Ties = typer.Option(
        Ties.pessimistic, "--ties", help="pessimistic (default) or optimistic (the authors' rule)."
    ),
    mask_history: bool = typer.Option(False, "--mask-history", help="Never rank items the user already has."),
    backbone: str | None = typer.Option(None, "--backbone", help="Backbone to use (must be the head's)."),
    dtype: Dtype | None = typer.Option(
        None, "--dtype", help="Backbone dtype of the features (default: the head's, as it was trained)."
    ),
    device: str = device_option(),
    json_out: bool = json_option(),
) -> None:
    """Evaluate a head: NDCG@10, Recall@10, MRR, MRR@10 and text->ID accuracy (Acc@1, Acc@5).

    Without --head, the domain's default head: the one pinned with `st2si zoo default`, else the best
    on validation NDCG@10 (named on stderr, with why).

    \b
    Examples:
      st2si eval --domain ml-100k
      st2si eval --domain ml-100k --head ml-100k/smollm2-135m --split valid --protocol candidates-20 --json
    """
    from st2si_cli.adapt import FeatureOptions, evaluate
    from st2si_cli.heads.choice import choose_head, lm_over_id_only, metrics_record

    zoo = open_zoo(create=False)
    check_candidates(zoo, domain, protocol)
    choice = choose_head(zoo, domain, head, backbone)
    if head is None:
        err.print(safe_text(choice.describe()), markup=False, soft_wrap=True)
    if line := lm_over_id_only(zoo, domain, choice.head):
        err.print(safe_text(line), markup=False, soft_wrap=True)
    reporter = RichReporter(quiet=json_out)
    try:
        result = evaluate(
            zoo,
            domain,
            head_ref=choice.head.id,
            split=split.value,
            protocol=protocol,
            ties=ties.value,
            mask_history=mask_history,
            backbone=backbone,
            feature_opts=FeatureOptions(dtype=dtype.value if dtype else None, device=device),
            reporter=reporter,
        )
    finally:
        reporter.close()
    if json_out:
        record = metrics_record(choice.head, split.value, result["protocol"], result["metrics"])
        print_jsonl({**record, "backbone": result["backbone"], "seconds": result["seconds"]})
        return
    out.print(
        metrics_table(
            f"{result['head']} on {domain} ({split.value}, {protocol}, ties {ties.value})",
            {split.value: result["metrics"]},
        )
    )
