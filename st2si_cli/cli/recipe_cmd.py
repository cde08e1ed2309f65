"""`st2si adapt --domain D` without `--head`: the recipe (`st2si_cli.recipe`), its stages as a table."""

from __future__ import annotations

from typing import Any

import typer

from st2si_cli.cli.output import err, out, print_jsonl, safe_text
from st2si_cli.cli.reporting import RichReporter
from st2si_cli.zoo.meta import HeadMeta

# adapt's options that set one head's training: without --head they have nothing to set
HEAD_ONLY = (
    "--sweep",
    "--sweep-trials",
    "--lr",
    "--batch-size",
    "--epochs",
    "--patience",
    "--weight-decay",
    "--schedule",
    "--warmup",
    "--dropout",
    "--hidden",
    "--seed",
    "--name",
    "--positions",
    "--no-multi-query",
    "--no-alignment",
)


def refuse_head_options(given: dict[str, bool]) -> None:
    """A usage error for the first option of one head's training given without --head."""
    for option in HEAD_ONLY:
        if given.get(option):
            raise typer.BadParameter(
                "sets one head's training: use it with --head ilp|ilp-text|adapter|sasrec "
                "(without --head, adapt runs the recipe, whose settings follow from the data)",
                param_hint=f"'{option}'",
            )


def parse_budget_option(value: str) -> float | None:
    from st2si_cli.recipe.settings import parse_budget

    try:
        return parse_budget(value)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--budget'") from None


def run_recipe_cmd(zoo: Any, domain: str, *, json_out: bool, **recipe: Any) -> None:
    """Run the recipe (`recipe`: `run_recipe`'s keywords) with progress on stderr; its table or JSON."""
    from st2si_cli.cli.reporting import say_default_and_reference
    from st2si_cli.recipe.run import run_recipe

    reporter = RichReporter()
    try:
        result = run_recipe(zoo, domain, reporter=reporter, **recipe)
    finally:
        reporter.close()
    if result.worker:
        return
    share = result.lm_share()
    if json_out:
        print_jsonl(
            {
                "domain": domain,
                "chosen": _record(result.chosen),
                "fusion": _record(result.fusion),
                "id_only_reference": _record(result.reference),
                "lm_over_id_only_valid": None if share is None else round(share, 6),
                "stages": [
                    {"stage": s.key, "status": s.status, "seconds": round(s.seconds, 2), **_record(s.head)}
                    for s in result.stages
                ],
                "train_seconds": result.train_seconds,
                "features_seconds": result.features_seconds,
                "features_pass_seconds": result.features_pass_seconds,
                "plan": result.plan,
            }
        )
    else:
        _table(result)
    if share is not None and result.fusion is not None:
        n = len([s for s in result.stages if s.key.startswith("sasrec") and s.head is not None])
        lm = result.fusion.name
        if share > 0:
            line = f"LM over ID-only: {share:+.1%} NDCG@10 on validation ({lm} against the {n} ID-only adapters alone)."
        else:
            line = f"LM over ID-only: {share:+.1%} NDCG@10 on validation: the language model adds nothing over {n} ID-only adapters on this data."
        err.print(line, markup=False, soft_wrap=True)
    cut = [s.key for s in result.stages if s.status in ("cut", "skipped")]
    if cut:
        err.print(
            f"The budget stopped {', '.join(cut)}: run the same command with a larger --budget to continue "
            "(finished stages are reused).",
            markup=False,
            soft_wrap=True,
        )
    say_default_and_reference(zoo, domain, reference=share is None)


def _record(head: Any) -> dict[str, Any]:
    if head is None:
        return {}
    hm = HeadMeta.of(head)
    return {
        "head": head.name,
        "id": head.id,
        "kind": hm.kind,
        "valid_ndcg10": hm.metrics.valid.get("NDCG@10"),
        "test_ndcg10": hm.metrics.test.get("NDCG@10"),
    }


def _table(result: Any) -> None:
    from rich.table import Table

    table = Table(title="Recipe stages (valid NDCG@10 decides; test shown, never used)")
    for col in ("stage", "status", "head", "valid NDCG@10", "test NDCG@10", "seconds"):
        table.add_column(col, justify="right" if "NDCG" in col or col == "seconds" else "left")
    for s in result.stages:
        rec = _record(s.head)
        mark = (
            " *" if s.head is not None and result.chosen is not None and s.head.id == result.chosen.id else ""
        )
        table.add_row(
            s.key + mark,
            s.status,
            safe_text(rec.get("head") or "-"),
            _num(rec.get("valid_ndcg10")),
            _num(rec.get("test_ndcg10")),
            f"{s.seconds:.0f}",
        )
    out.print(table)
    if result.chosen is not None:
        err.print(
            safe_text(
                f"Chosen on validation (*): {result.chosen.name}; training {result.train_seconds:.0f}s."
            ),
            markup=False,
        )


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"
