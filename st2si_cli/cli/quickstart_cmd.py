"""`st2si quickstart`: MovieLens-100k + the offline SmolLM2 backbone, end to end, offline."""

from __future__ import annotations

import time
from typing import Any

import typer

from st2si_cli.cli.options import backbone_option, check_new_name, open_zoo
from st2si_cli.cli.output import err, metrics_table, out
from st2si_cli.cli.reporting import RichReporter
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta

QUICKSTART_MAX_ITEMS = 20  # items per history window, windows not overlapping: keeps the pass to minutes
QUICKSTART_BUDGET = "3m"  # the recipe's training time
QUICKSTART_USERS = 400  # the first users of MovieLens-100k: the pass over every position stays within minutes


def quickstart_cmd(
    backbone: str = backbone_option("Backbone (built offline if known)."),
    domain: str = typer.Option(
        "ml-100k", "--domain", help="Name of the dataset in the zoo.", callback=check_new_name
    ),
    max_items: int = typer.Option(
        QUICKSTART_MAX_ITEMS, "--max-items", min=1, help="Newest history items per user."
    ),
    budget: str = typer.Option(
        QUICKSTART_BUDGET, "--budget", help="Training time of the recipe (90s, 3m, 1h or none)."
    ),
    max_users: int = typer.Option(
        QUICKSTART_USERS,
        "--max-users",
        min=0,
        help="Use only the first N users (the domain is then named DOMAIN-firstN); 0: all 943 (a pass of "
        "about 580,000 tokens).",
    ),
    users: int = typer.Option(3, "--users", min=0, help="Sample users to show recommendations for."),
    k: int = typer.Option(5, "-k", min=1, help="Recommendations per sample user."),
) -> None:
    """Prepare MovieLens-100k, build the SmolLM2 backbone, run the recipe, evaluate, recommend.

    \b
    Example:
      st2si quickstart --users 5
    """
    from rich.table import Table

    from st2si_cli.backbones.pull import ensure_backbone
    from st2si_cli.cli.recipe_cmd import parse_budget_option
    from st2si_cli.data.prepare import resolve_source_name
    from st2si_cli.model.text import TextConfig
    from st2si_cli.recipe.run import run_recipe
    from st2si_cli.recommend import Request, recommend

    budget_s = parse_budget_option(budget)
    t0 = time.time()
    zoo = open_zoo()
    if max_users:
        domain = f"{domain}-first{max_users}"
    err.print(f"[1/5] Preparing MovieLens-100k from the recbole wheel as {domain!r}", markup=False)
    folder, fmt, _ = resolve_source_name("movielens-100k")
    ds_art, ds = _prepare(zoo, folder, fmt, domain, max_users)
    st = DatasetMeta.of(ds_art).stats
    err.print(
        f"      {st.users:,} users, {st.items:,} items, {st.interactions:,} interactions",
        markup=False,
    )

    err.print(f"[2/5] Backbone {backbone}", markup=False)
    t = time.time()
    bb = ensure_backbone(zoo, backbone)
    err.print(f"      {bb.name} ({bb.short_id}) ready in {time.time() - t:.0f}s", markup=False)

    err.print(
        f"[3/5] The recipe within {budget}: ID-only adapters, the swept ILP over the frozen backbone's "
        f"features ({max_items}-item windows), an adapter over them, their fusions",
        markup=False,
    )
    reporter = RichReporter()
    try:
        result = run_recipe(
            zoo,
            domain,
            backbone=bb.name or bb.id,
            text=TextConfig(max_items=max_items, stride=max_items),
            budget_s=budget_s,
            reporter=reporter,
        )
    finally:
        reporter.close()
    head = result.chosen
    hm = HeadMeta.of(head)

    err.print(
        "[4/5] Evaluation (full ranking over all items, pessimistic ties, history not masked)", markup=False
    )
    out.print(
        metrics_table(
            f"{head.name} (chosen on validation)",
            {"valid": hm.metrics.valid, "test": hm.metrics.test},
        )
    )
    if result.reference is not None and result.reference.id != head.id:
        ref = HeadMeta.of(result.reference)
        out.print(
            metrics_table(
                f"{result.reference.name}: the in-tool ID-only SASRec ensemble, for comparison",
                {"valid": ref.metrics.valid, "test": ref.metrics.test},
            )
        )
    share = result.lm_share()
    if share is not None:
        err.print(f"      LM over ID-only: {share:+.1%} NDCG@10 on validation", markup=False)

    err.print(f"[5/5] Recommendations for {users} sample users", markup=False)
    picks = list(range(min(users, ds.n_users)))
    requests = [
        Request(
            line=i + 1,
            user=ds.users[u],
            items=[ds.items[j] for j in ds.sequences[u][:-1]],
            catalog_ids=list(ds.sequences[u][:-1]),
        )
        for i, u in enumerate(picks)
    ]
    results = recommend(zoo, domain, requests, k=k, exclude_history=True, head_ref=head.id)
    for u, res in zip(picks, results):
        seq = ds.sequences[u]
        table = Table(title=f"user {ds.users[u]}", show_header=True)
        table.add_column("recently watched")
        table.add_column(f"top {k} recommended (history excluded)")
        recent = [ds.items[j]["title"] for j in seq[-6:-1]]
        recs = [
            f"{r['title']}" + ("  <- held-out next item" if r["id"] == ds.items[seq[-1]]["id"] else "")
            for r in res["items"]
        ]
        for i in range(max(len(recent), len(recs))):
            table.add_row(recent[i] if i < len(recent) else "", recs[i] if i < len(recs) else "")
        out.print(table)
        out.print(f"  held-out next item: {ds.items[seq[-1]]['title']}")
    err.print(
        f"Done in {time.time() - t0:.0f}s. Try: st2si recommend --domain {domain} --user-history FILE",
        markup=False,
    )


def _prepare(zoo: Any, folder: Any, fmt: str, domain: str, max_users: int) -> tuple[Any, Any]:
    """The MovieLens dataset stored as `domain`; with `max_users`, only the first that many users."""
    from st2si_cli.data.dataset import RawInteraction, build_dataset
    from st2si_cli.data.prepare import parse_dataset, prepare_dataset, store_dataset

    if not max_users:
        return prepare_dataset(folder, format=fmt, domain=domain, zoo=zoo)
    full, fmt = parse_dataset(folder, format=fmt)
    items = {it["id"]: {k: v for k, v in it.items() if k != "id"} for it in full.items}
    rows = [
        RawInteraction(user=full.users[u], item=full.items[i]["id"], timestamp=float(t), order=t)
        for u in range(min(max_users, len(full.users)))
        for t, i in enumerate(full.sequences[u])
    ]
    ds = build_dataset(items, rows, source=f"{folder} (first {max_users} users)")
    return store_dataset(zoo, ds, domain=domain, fmt=fmt, source=str(folder)), ds
