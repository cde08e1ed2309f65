"""`st2si fuse`: an ILP and adapter heads mixed, or adapters alone (an ensemble)."""

from __future__ import annotations

import typer

from st2si_cli.cli.options import check_new_name, json_option, open_zoo
from st2si_cli.cli.output import metrics_table, out, print_jsonl
from st2si_cli.cli.reporting import say_default_and_reference
from st2si_cli.zoo.meta import HeadMeta


def fuse_cmd(
    domain: str = typer.Option(..., "--domain", help="Dataset name in the zoo."),
    ilp: str | None = typer.Option(
        None, "--ilp", help="ILP head (name or ID); left out: the ensemble of the adapters alone."
    ),
    adapter: list[str] = typer.Option(
        ...,
        "--adapter",
        help="Adapter head of the same features (name or ID); repeat it to average several (an ensemble).",
    ),
    name: str | None = typer.Option(
        None, "--name", help="Name of the new head (default DOMAIN/BACKBONE).", callback=check_new_name
    ),
    json_out: bool = json_option("Print the head's record as JSON."),
) -> None:
    """Fuse an ILP head and adapter heads: log-probabilities mixed with a weight chosen on validation.

    Without --ilp the adapters are averaged alone (an ensemble; of `sasrec` heads, an ID-only one).

    \b
    Examples:
      st2si fuse --domain ml-100k --ilp ml-100k/smollm2-135m --adapter ml-100k/adapter
      st2si fuse --domain ml-100k --adapter ml-100k/sasrec-s0 --adapter ml-100k/sasrec-s1
    """
    from st2si_cli.heads.choice import metrics_record
    from st2si_cli.heads.fusion import fuse_heads
    from st2si_cli.heads.store import check_compatible

    zoo = open_zoo()
    dataset = zoo.get(domain, kind="dataset")
    ilp_head = zoo.get(ilp, kind="head") if ilp is not None else None
    adapters = [zoo.get(ref, kind="head") for ref in adapter]
    for part in [*([ilp_head] if ilp_head is not None else []), *adapters]:
        check_compatible(part, dataset=dataset)
    head = fuse_heads(zoo, ilp_head, adapters, name=name)
    hm = HeadMeta.of(head)
    if json_out:
        print_jsonl(
            {
                **metrics_record(head),
                "kind": "fusion",
                "valid": hm.metrics.valid,
                "sweep": hm.sweep,
                "timings": hm.timings,
            }
        )
        say_default_and_reference(zoo, domain, head)
        return
    out.print(
        metrics_table(
            f"{head.name} (w = {hm.fusion_w} on the ILP, chosen on validation)"
            if ilp_head is not None
            else f"{head.name} (ensemble of {len(adapters)} adapters)",
            {"valid": hm.metrics.valid, "test": hm.metrics.test},
        )
    )
