"""Which head answers for a domain, and why: the one rule `eval`, `recommend` and `zoo ls` share.

With `--head`, that head. Without, the domain's newest head (the last `adapt`, `fuse` or `pretrain`
that stored one). A new head therefore changes the default, so commands say which one they chose and
each `recommend` answer carries the head and backbone IDs. Nothing heavy is imported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from st2si_cli.errors import ZooError
from st2si_cli.zoo.meta import HeadMeta
from st2si_cli.zoo.store import Artifact, Zoo


@dataclass(frozen=True)
class HeadChoice:
    head: Artifact
    reason: str  # "given by --head" or "the newest of N heads for domain D"

    @property
    def backbone_id(self) -> str:
        return HeadMeta.of(self.head).backbone or ""

    def describe(self) -> str:
        """One line for stderr: the head, its backbone, and why it was chosen."""
        h = self.head
        bb = HeadMeta.of(h).backbone_name or self.backbone_id[:12]
        return (
            f"Using head {h.name or h.short_id} ({h.short_id}) on backbone {bb} ({self.backbone_id[:12]}): "
            f"{self.reason}; pass --head to pin one."
        )


def default_head(zoo: Zoo, domain: str) -> HeadChoice | None:
    """The head a command uses for `domain` when none is given, with the reason; None if it has none."""
    heads = zoo.ls(kind="head", domain=domain)  # newest first
    if not heads:
        return None
    n = len(heads)
    why = "the only head" if n == 1 else f"the newest of {n} heads"
    return HeadChoice(
        heads[0],
        f"{why} for domain {domain} (created {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(heads[0].created))})",
    )


def choose_head(zoo: Zoo, domain: str, ref: str | None = None) -> HeadChoice:
    """`ref` if given, else the domain's default head (see `default_head`)."""
    if ref:
        return HeadChoice(zoo.get(ref, kind="head"), "given by --head")
    choice = default_head(zoo, domain)
    if choice is None:
        raise ZooError(f"no head for domain {domain!r}: run `st2si adapt --domain {domain}` first")
    return choice


RECORD_KEYS = ("head", "head_id", "backbone_id", "domain", "split", "protocol", "metrics")


def metrics_record(
    head: Artifact, split: str = "test", protocol: dict | None = None, metrics: dict | None = None
) -> dict:
    """The one JSON shape of a head's metrics (`adapt`, `eval` and `pretrain` print it):
    {"head", "head_id", "backbone_id", "domain", "split", "protocol", "metrics"}. Without `metrics`,
    the head's stored ones for `split` (with the text->ID alignment accuracies where it has them)."""
    from st2si_cli.metrics import RankingProtocol

    meta = HeadMeta.of(head)
    return {
        "head": head.name,
        "head_id": head.id,
        "backbone_id": meta.backbone,
        "domain": head.domain,
        "split": split,
        "protocol": protocol or meta.protocol or RankingProtocol().record(),
        "metrics": meta.metrics.with_alignment(split) if metrics is None else metrics,
    }
