"""Which head answers for a domain, and why: the one rule `eval`, `recommend`, `report` and `zoo ls` share.

With `--head`, that head. Without, the head pinned with `st2si zoo default DOMAIN HEAD`, where there is
one and it still ranks the domain's current catalog; else the best on validation NDCG@10 among the
domain's heads that rank its current catalog (ties: the newest). Heads that recorded no validation
NDCG@10 are chosen only where none did (then the newest). A new head becomes the default only by
being better on validation, so commands say which one they chose and why, and each `recommend` answer
carries the head and backbone IDs. Nothing heavy is imported here.
"""

from __future__ import annotations

from dataclasses import dataclass

from st2si_cli.errors import MismatchError, ZooError
from st2si_cli.zoo.meta import DatasetMeta, HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

METRIC = "NDCG@10"  # what the default head is the best on, on validation
PIN_HINT = "pinned with st2si zoo default"


@dataclass(frozen=True)
class HeadChoice:
    head: Artifact
    reason: str  # "given by --head", "pinned with st2si zoo default", "the best on validation ..."

    @property
    def backbone_id(self) -> str:
        return HeadMeta.of(self.head).backbone or ""

    @property
    def pinned(self) -> bool:
        return self.reason.startswith(PIN_HINT)

    def describe(self) -> str:
        """One line for stderr: the head, its backbone, and why it was chosen."""
        h = self.head
        bb = HeadMeta.of(h).backbone_name or self.backbone_id[:12]
        return (
            f"Using head {h.name or h.short_id} ({h.short_id}) on backbone {bb} ({self.backbone_id[:12]}): "
            f"{self.reason}; pass --head to pick another."
        )


def valid_score(head: Artifact) -> float | None:
    """The head's recorded validation NDCG@10 (None where it recorded none)."""
    value = HeadMeta.of(head).metrics.valid.get(METRIC)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def current_heads(zoo: Zoo, domain: str) -> list[Artifact]:
    """The domain's heads that rank its current catalog (same catalog hash and size), newest first.

    Where the domain has no dataset, or none of its heads matches it, all of its heads."""
    heads = zoo.ls(kind="head", domain=domain)  # newest first
    dataset = zoo.find(domain, kind="dataset")
    if dataset is None:
        return heads
    dm = DatasetMeta.of(dataset)
    matching = [
        h
        for h in heads
        if HeadMeta.of(h).catalog_hash == dm.catalog_hash
        and (dm.catalog.items is None or HeadMeta.of(h).n_items == dm.catalog.items)
    ]
    return matching or heads


def best_on_validation(heads: list[Artifact]) -> Artifact | None:
    """The head with the best validation NDCG@10 (ties: the first, i.e. the newest of a newest-first
    list); None where none recorded one."""
    best, best_v = None, None
    for h in heads:
        v = valid_score(h)
        if v is not None and (best_v is None or v > best_v):
            best, best_v = h, v
    return best


def _current_version(zoo: Zoo, domain: str, pinned: Artifact, heads: list[Artifact]) -> Artifact | None:
    """The head of `heads` that `st2si items` made from `pinned` (through any number of catalog
    versions: each extended head names the head it was made from), if any."""
    parent = {h.id: Inputs.of(h).first("head") for h in zoo.ls(kind="head", domain=domain)}
    for h in heads:  # newest first
        seen, at = set(), parent.get(h.id)
        while at and at not in seen:
            if at == pinned.id:
                return h
            seen.add(at)
            at = parent.get(at)
    return None


def default_head(zoo: Zoo, domain: str, backbone: str | None = None) -> HeadChoice | None:
    """The head a command uses for `domain` when none is given, with the reason; None if it has none.
    `backbone` (an artifact ID): only heads trained on that backbone count."""
    heads = current_heads(zoo, domain)
    label = domain
    if backbone is not None:
        heads = [h for h in heads if HeadMeta.of(h).backbone == backbone]
        label = f"{domain} on backbone {backbone[:12]}"
    if not heads:
        return None
    pinned = zoo.pinned_head(domain)
    stale = ""
    if pinned is not None:
        if any(h.id == pinned.id for h in heads):
            return HeadChoice(pinned, PIN_HINT)
        version = _current_version(zoo, domain, pinned, heads)
        if version is not None:
            return HeadChoice(version, f"{PIN_HINT} (its version for the current catalog)")
        stale = f" (the pinned head {pinned.name or pinned.short_id} does not rank the current catalog)"
    n = len(heads)
    best = best_on_validation(heads)
    if n == 1:
        return HeadChoice(heads[0], f"the only head for domain {label}{stale}")
    if best is None:
        return HeadChoice(
            heads[0], f"the newest of {n} heads for domain {label}, none with validation {METRIC}{stale}"
        )
    scored = sum(valid_score(h) is not None for h in heads)
    of = f"{n} heads" if scored == n else f"{scored} heads with validation metrics ({n - scored} without)"
    return HeadChoice(
        best, f"the best on validation {METRIC} ({valid_score(best):.4f}) of {of} for domain {label}{stale}"
    )


def choose_head(zoo: Zoo, domain: str, ref: str | None = None, backbone: str | None = None) -> HeadChoice:
    """`ref` if given, else the domain's default head (see `default_head`); `backbone` (a name or ID):
    the default among the heads trained on that backbone."""
    if ref:
        return HeadChoice(zoo.get(ref, kind="head"), "given by --head")
    bb_id = zoo.get(backbone, kind="backbone").id if backbone else None
    choice = default_head(zoo, domain, bb_id)
    if choice is None and bb_id is not None and (other := default_head(zoo, domain)) is not None:
        raise MismatchError(
            f"no head of domain {domain} was trained on backbone {backbone} (the default one, "
            f"{other.head.name or other.head.short_id}, uses another): pass --head, or adapt one with "
            f"--backbone {backbone}"
        )
    if choice is None:
        raise ZooError(f"no head for domain {domain!r}: run `st2si adapt --domain {domain}` first")
    return choice


def pin_default(zoo: Zoo, domain: str, ref: str | None) -> Artifact | None:
    """Pin head `ref` as `domain`'s default (None: unpin, back to the best on validation); the head
    pinned before, if another. The head must be one of the domain's heads."""
    if ref is None:
        return zoo.pin_head(domain, None)
    head = zoo.get(ref, kind="head")
    if head.domain != domain:
        raise ZooError(f"head {head.name or head.short_id} is for domain {head.domain!r}, not {domain!r}")
    if all(h.id != head.id for h in current_heads(zoo, domain)):
        raise ZooError(
            f"head {head.short_id} ranks an older catalog of {domain}: pin one of its current heads "
            f"(`st2si zoo ls --domain {domain}`)"
        )
    return zoo.pin_head(domain, head)


def id_only(head: Artifact) -> bool:
    """Whether the head reads item IDs only (an in-tool SASRec): the reference the LM heads are shown against."""
    from st2si_cli.heads.registry import REGISTRY

    hm = HeadMeta.of(head)
    kind = next((k for k in REGISTRY if k.name == hm.kind), None)
    return kind is not None and kind.id_only(hm.train)


def lm_over_id_only(zoo: Zoo, domain: str, head: Artifact | None = None) -> str | None:
    """ "LM over ID-only: +x% NDCG@10 on validation (HEAD v vs REF r)": `head` (default: the best LM
    head on validation) against the best ID-only head of the domain's current catalog; None where the
    domain has no ID-only head with validation metrics, no LM head with them, or `head` is ID-only."""
    heads = current_heads(zoo, domain)
    ref = best_on_validation([h for h in heads if id_only(h)])
    lm = head if head is not None else best_on_validation([h for h in heads if not id_only(h)])
    if ref is None or lm is None or id_only(lm) or valid_score(lm) is None:
        return None
    v, r = valid_score(lm), valid_score(ref)
    assert v is not None and r is not None
    gain = f"{(v / r - 1) * 100:+.1f}%" if r > 0 else ("+inf%" if v > 0 else "+0.0%")
    return (
        f"LM over ID-only: {gain} {METRIC} on validation "
        f"({lm.name or lm.short_id} {v:.4f} vs {ref.name or ref.short_id} {r:.4f})"
    )


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
