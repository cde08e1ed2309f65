"""The recipe `st2si adapt --domain D` runs when no `--head` is given: what won on our data, each stage
a head of its own, the final choice made on validation only.

Stages, in order of value per minute:
  1. `sasrec-s0`: the sequence adapter on item IDs only (SASRec inside the tool): cheap and strong;
  2. `ilp-sweep`: the paper's ILP over the LM's features, a small grid swept on validation;
  3. `sasrec-s1`, ...: more ID-only adapters (other seeds) for the ensemble;
  4. `adapter-s0`: the sequence adapter over the LM's features (`--head adapter`), seed 0, last: it
     costs more than an ID-only one; it is tried, and validation decides whether it earns a place;
then, in seconds, `id-only`: the ensemble of the ID-only adapters (the reference of the same size),
`recipe`: the ILP fused with that ensemble, and `lm-adapter`: the ILP fused with the same ensemble
in which `adapter-s0` takes the place of its ID-only twin `sasrec-s0` (same size, same seeds), each
weight chosen on validation (w = 0 is the adapters alone, w = 1 the ILP alone). Of all of them the
best on validation is the result.

A budget bounds the training: no epoch or sweep trial starts past it (the first stage always trains
one epoch, so a head comes out), a stage cut by it keeps its best epoch (stored with `cut_by_budget`), stages not reached are skipped. Every finished stage is in the
zoo, so a rerun (after a kill, or with a larger budget) reuses it; an adapter cut by the budget
continues from its stored best epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from st2si_cli import DEFAULT_BACKBONE
from st2si_cli.progress import Reporter
from st2si_cli.recipe.settings import RecipeStages, adapter_config, adapter_plan
from st2si_cli.zoo.meta import HeadMeta, Inputs
from st2si_cli.zoo.store import Artifact, Zoo

RECIPE_VERSION = 3  # 2: the adapter over the LM's features as a last stage; 3: patience x user noise


@dataclass
class StageOutcome:
    key: str  # sasrec-s0, ilp-sweep, ..., adapter-s0, id-only, recipe, lm-adapter
    status: str  # trained | reused | continued | cut | skipped | fused
    head: Artifact | None = None
    seconds: float = 0.0

    @property
    def valid_ndcg10(self) -> float | None:
        if self.head is None:
            return None
        value = HeadMeta.of(self.head).metrics.valid.get("NDCG@10")
        return float(value) if isinstance(value, int | float) else None


@dataclass
class RecipeResult:
    stages: list[StageOutcome] = field(default_factory=list)
    chosen: Artifact | None = None  # the best on validation of every stage
    fusion: Artifact | None = None  # the better on validation of `recipe` and `lm-adapter`
    reference: Artifact | None = None  # the ID-only ensemble of the same adapters
    train_seconds: float = 0.0  # this run's training, every stage (reused ones cost nothing)
    features_seconds: float = 0.0  # this run's wait for features (0 when cached)
    features_pass_seconds: float | None = None  # how long the cached pass took when it was computed
    plan: dict[str, Any] = field(default_factory=dict)
    worker: bool = False  # a torchrun worker rank: it computed its share of the features, nothing else

    def lm_share(self) -> float | None:
        """Relative validation NDCG@10 of the fusion over the ID-only ensemble (None without both)."""
        if self.fusion is None or self.reference is None:
            return None
        lm, ref = _valid(self.fusion), _valid(self.reference)
        return None if lm is None or not ref else lm / ref - 1.0


def _valid(head: Artifact) -> float | None:
    value = HeadMeta.of(head).metrics.valid.get("NDCG@10")
    return float(value) if isinstance(value, int | float) else None


class StageReporter(Reporter):
    """Forwards to the caller's reporter, with every epoch line saying the stage, elapsed and budget."""

    def __init__(self, inner: Reporter, label: str, t0: float, deadline: float | None) -> None:
        self.inner, self.label, self.t0, self.deadline = inner, label, t0, deadline

    def features_start(self, total_tokens: int, n_samples: int) -> None:
        self.inner.features_start(total_tokens, n_samples)

    def features_advance(self, tokens: int, samples: int) -> None:
        self.inner.features_advance(tokens, samples)

    def features_done(self) -> None:
        self.inner.features_done()

    def training_start(self, steps_per_epoch: int, max_epochs: int) -> None:
        self.inner.training_start(steps_per_epoch, max_epochs)

    def training_step(self, n: int) -> None:
        self.inner.training_step(n)

    def message(self, text: str) -> None:
        self.inner.message(f"[{self.label}] {text}")

    def epoch(self, record: dict[str, Any]) -> None:
        now = time.monotonic()
        left = "" if self.deadline is None else f", budget left {_clock(max(0.0, self.deadline - now))}"
        mark = "*" if record.get("improved") else " "
        loss = "-" if record.get("loss") is None else f"{record['loss']:.4f}"
        self.inner.message(
            f"[{self.label}] epoch {record['epoch']:3d}{mark} loss {loss}  valid NDCG@10 "
            f"{record['valid_NDCG@10']:.4f} (best epoch {record.get('best_epoch', '?')})  "
            f"{record['seconds']:.1f}s  elapsed {_clock(now - self.t0)}{left}"
        )


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run_recipe(
    zoo: Zoo,
    domain: str,
    *,
    backbone: str = DEFAULT_BACKBONE,
    text: Any = None,
    feature_opts: Any = None,
    stages: RecipeStages = RecipeStages(),
    budget_s: float | None = None,
    reporter: Reporter | None = None,
) -> RecipeResult:
    """Run the recipe on `domain` (see the module's text); every stage stored as a head named
    `DOMAIN/recipe-<stage>`, the fusion as `DOMAIN/recipe`. `budget_s` bounds the training (the
    feature pass is not counted: it is done once and cached). `stages`: seeds, sweep and the settings
    the stages start from (`RecipeStages`)."""
    from st2si_cli.adapt import FeatureOptions, get_features, read_dataset
    from st2si_cli.model.text import TextConfig
    from st2si_cli.zoo.meta import FeaturesMeta

    seeds, sweep_trials = stages.seeds, stages.sweep_trials
    if seeds < 1:
        raise ValueError("the recipe needs at least one ID-only adapter (seeds >= 1)")
    reporter = reporter or Reporter()
    text = text or TextConfig()
    dataset_art = zoo.get(domain, kind="dataset")
    ds = read_dataset(zoo, dataset_art.id)
    t0 = time.monotonic()
    feat_art, fs, bb_art = get_features(
        zoo, backbone, dataset_art, text, feature_opts or FeatureOptions(), reporter, ds=ds
    )
    result = RecipeResult(features_seconds=round(time.monotonic() - t0, 2))
    from st2si_cli.features.ranks import is_worker

    if is_worker():  # a torchrun rank other than 0: its share of the feature pass is done, rank 0 trains
        result.worker = True
        return result
    result.features_pass_seconds = (FeaturesMeta.of(feat_art).timings or {}).get("seconds")
    plan = adapter_plan(_count_windows(fs, ds), ds.n_users)
    result.plan = {
        "version": RECIPE_VERSION,
        "adapter": plan.record(),
        "seeds": seeds,
        "sweep": sweep_trials,
        "lm_adapter": stages.lm_adapter,
    }
    run = _Run(zoo, domain, ds, fs, feat_art, bb_art, dataset_art, text, reporter, budget_s)
    keys = ["sasrec-s0", "ilp-sweep", *[f"sasrec-s{k}" for k in range(1, seeds)]]
    if stages.lm_adapter:
        keys.append("adapter-s0")
    for k, key in enumerate(keys, 1):
        label = f"stage {k}/{len(keys)} {key}"
        if key == "ilp-sweep":
            from st2si_cli.heads.ilp import ILP

            cfg = stages.ilp_base or ILP.default_config()
            outcome = run.stage(key, label, ILP, cfg, {"sweep_trials": sweep_trials})
        else:
            from st2si_cli.heads.adapter import ADAPTER, SASREC

            use_text = key.startswith("adapter")
            seed = int(key.rsplit("-s", 1)[1])
            cfg = adapter_config(plan, seed, stages.adapter_base, use_text=use_text)
            outcome = run.stage(key, label, ADAPTER if use_text else SASREC, cfg, {})
        result.stages.append(outcome)
    _finish(run, result)
    result.train_seconds = round(sum(s.seconds for s in result.stages), 2)
    return result


def _count_windows(fs: Any, ds: Any) -> int:
    from st2si_cli.model.adapter import AdapterConfig
    from st2si_cli.train.adapter_data import training_windows, user_sequences

    return len(training_windows(user_sequences(fs, ds.sequences), AdapterConfig().max_len))


@dataclass
class _Run:
    zoo: Zoo
    domain: str
    ds: Any
    fs: Any
    feat_art: Artifact
    bb_art: Artifact
    dataset_art: Artifact
    text: Any
    reporter: Reporter
    budget_s: float | None
    t0: float = field(default_factory=time.monotonic)
    started: int = 0  # stages that trained in this run (the first always starts, so a head comes out)

    @property
    def deadline(self) -> float | None:
        return None if self.budget_s is None else self.t0 + self.budget_s

    def name(self, key: str) -> str:
        return f"{self.domain}/recipe" if key == "recipe" else f"{self.domain}/recipe-{key}"

    def stored(self, key: str, settings: dict[str, Any]) -> Artifact | None:
        """The newest head of this stage with these settings on this feature cache."""
        for head in self.zoo.ls(kind="head", domain=self.domain):  # newest first
            mark = head.meta.get("recipe") or {}
            if (
                mark.get("stage") == key
                and mark.get("settings") == settings
                and Inputs.of(head).first("features") == self.feat_art.id
            ):
                return head
        return None

    def stage(self, key: str, label: str, kind: Any, cfg: Any, options: dict[str, Any]) -> StageOutcome:
        from st2si_cli.adapt import store_trained
        from st2si_cli.heads.base import How
        from st2si_cli.heads.store import HeadOrigin, load_head_tensors

        settings = {"kind": kind.name, "train": cfg.to_dict(), **options}
        old = self.stored(key, settings)
        cut_before = old is not None and bool(old.meta.get("cut_by_budget"))
        if old is not None and not cut_before:
            self.reporter.message(f"[{label}] reused {old.name} ({old.short_id}), valid NDCG@10 {_fmt(old)}")
            return StageOutcome(key, "reused", old)
        deadline = self.deadline
        first = self.started == 0
        if deadline is not None and time.monotonic() > deadline and not first:
            self.reporter.message(f"[{label}] skipped: the budget is spent")
            return StageOutcome(key, "skipped", old)
        start = None
        if cut_before and not options.get("sweep_trials"):
            start = load_head_tensors(self.zoo, old)
            self.reporter.message(f"[{label}] continues {old.name} from its best epoch (cut by the budget)")
        else:
            self.reporter.message(f"[{label}] training")
        self.started += 1
        s0 = time.monotonic()
        trained = kind.train(
            self.fs,
            self.ds,
            cfg,
            reporter=StageReporter(self.reporter, label, self.t0, deadline),
            how=How(options.get("sweep_trials"), deadline, start),
        )
        seconds = round(time.monotonic() - s0, 2)
        origin = HeadOrigin(self.domain, self.bb_art, self.dataset_art, self.text, self.name(key))
        head = store_trained(
            self.zoo, trained, origin, self.feat_art, {}, {"recipe": {"stage": key, "settings": settings}}
        )
        status = (
            "cut" if head.meta.get("cut_by_budget") else ("continued" if start is not None else "trained")
        )
        self.reporter.message(f"[{label}] {status}: {head.name}, valid NDCG@10 {_fmt(head)} ({seconds:.0f}s)")
        return StageOutcome(key, status, head, seconds)


def _fmt(head: Artifact) -> str:
    value = _valid(head)
    return "-" if value is None else f"{value:.4f}"


def _finish(run: _Run, result: RecipeResult) -> None:
    """The ID-only ensemble, the fusions, and the choice among every stage on validation."""
    from st2si_cli.heads.fusion import fuse_heads

    heads = {s.key: s.head for s in result.stages if s.head is not None}
    adapters = [h for k, h in heads.items() if k.startswith("sasrec")]
    ilp = heads.get("ilp-sweep")
    lm_adapter = heads.get("adapter-s0")

    def fused(key: str, parts: list[Artifact], with_ilp: Artifact | None) -> Artifact:
        s0 = time.monotonic()
        head = fuse_heads(run.zoo, with_ilp, parts, name=run.name(key))
        result.stages.append(StageOutcome(key, "fused", head, time.monotonic() - s0))
        return head

    if adapters:
        result.reference = fused("id-only", adapters, None)
    lm_fusions = []
    if adapters and ilp is not None:
        lm_fusions.append(fused("recipe", adapters, ilp))
    if lm_adapter is not None and ilp is not None:
        # the same size and seeds as the ID-only reference: adapter-s0 in the place of sasrec-s0
        twin = heads.get("sasrec-s0")
        parts = [lm_adapter, *(h for h in adapters if h is not twin)]
        lm_fusions.append(fused("lm-adapter", parts, ilp))
    # the LM side of "LM over ID-only": the better of the fusions on validation (the first of equals)
    result.fusion = max(lm_fusions, key=lambda h: _valid(h) or 0.0, default=None)
    scored = [s for s in result.stages if s.head is not None and s.valid_ndcg10 is not None]
    # the best on validation; among equals the later stage (a fusion contains its parts as w = 0 or 1)
    best = max(reversed(scored), key=lambda s: s.valid_ndcg10 or 0.0, default=None)
    result.chosen = best.head if best is not None else None
