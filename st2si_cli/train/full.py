"""Full tuning (`st2si pretrain`): every backbone parameter and the ILP, multi-query input, ID alignment.

    datasets (one item space over their union) + backbone
        -> training samples: histories (every TRAIN query, or one random crop per user) + alignment
        -> AdamW, cosine schedule with warm-up, early stopping on validation NDCG@10, best weights kept
        -> a new backbone, one head per domain, and a "run" record in the zoo

One process, torch DDP or DeepSpeed (see `distributed.py`). Each global step takes `batch_size x
grad_accum x world_size` samples from one seeded shuffle that does not depend on the world size; each
rank gets a disjoint slice, and the loss is the mean over all query positions of the global step, so
2 ranks with batch b train exactly like 1 process with batch 2b (up to float summation order).

Resumable: checkpoints every `save_every` steps and at each epoch end go to `zoo.staging_dir("run-<key>")`
(key = hash of the config and inputs); `state.json` there names the last complete one and is replaced
atomically. Artifacts are put into the zoo only at the very end, by rank 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from st2si_cli import __version__
from st2si_cli.errors import St2siError
from st2si_cli.features import ALIGN, TEST, TRAIN, VALID, FeatureSet, Sample, build_samples, plan_batches
from st2si_cli.progress import Reporter
from st2si_cli.scoring import linear_cross_entropy, rank_rows
from st2si_cli.text import ItemTokenizer, TextConfig
from st2si_cli.train import distributed as dist
from st2si_cli.zoo.store import Artifact, Zoo, canonical_json

RUN_FORMAT = 1  # bump when checkpoints or the sample definition change
SAMPLINGS = ("all", "crop")


@dataclass
class PretrainConfig:
    """Full-tuning settings; defaults from the authors' runs (opt-125m, Table 2)."""

    lr: float = 5e-5  # AdamW, backbone and ILP alike
    weight_decay: float = 0.0
    warmup_steps: int = 100  # clipped to a tenth of the run for short runs
    epochs: int = 30  # most epochs; early stopping usually ends sooner
    patience: int = 5  # epochs without a better validation NDCG@10 before stopping
    batch_size: int = 16  # samples per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # 0 turns clipping off (the Hugging Face Trainer's default is 1.0)
    sampling: str = "all"  # "all": every TRAIN query of each history; "crop": one random crop per user per epoch
    multi_query: bool = True  # False: only the last query of each history trains (Table 3)
    alignment: bool = True  # False: no ID-alignment samples (Table 3)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 (else fp16 + loss scaler) on GPU, fp32 on CPU
    save_every: int = 0  # checkpoint every N optimizer steps (0: at epoch ends only); not part of the run key
    eval_batch_tokens: int = 16384  # padded tokens per validation batch; not part of the run key
    eval_max_batch: int = 64

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The settings that change the result (the run key)."""
        d = self.to_dict()
        for k in ("save_every", "eval_batch_tokens", "eval_max_batch"):
            d.pop(k)
        return d


# ---- the model -----------------------------------------------------------------------------------------


class ST2SI(nn.Module):
    """A decoder-only LM whose hidden state at each [Q] token goes through the ILP to score every item."""

    def __init__(self, backbone: nn.Module, n_items: int, seed: int = 0):
        super().__init__()
        self.backbone = backbone  # transformers base model (no LM head)
        cfg = backbone.config
        d = int(getattr(cfg, "hidden_size", 0) or cfg.d_model)
        self.ilp = nn.Linear(d, n_items, bias=False)  # item linear projection, [N, d]
        bound = 1.0 / d**0.5  # nn.Linear's default range, from our own generator (same on every rank)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.ilp.weight.copy_((torch.rand(n_items, d, generator=gen) * 2 - 1) * bound)

    split_by_length = True  # off under ZeRO-3, where every rank must run the same number of forwards

    def hidden_at(self, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor) -> Tensor:
        """input_ids [B, L] right padded; query_rows/cols [P] -> hidden states at the queries [P, d].

        A random batch mixes long histories with short alignment samples, so rows of very different
        lengths run as separate narrower forwards (same features: attention is causal, padding is on
        the right and a sample ends with its last query).
        """
        groups = self._length_groups(query_rows, query_cols, input_ids.shape[0]) if self.split_by_length else None
        if groups is None:
            h = self.backbone(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, d]
            return h[query_rows, query_cols]  # [P, d]
        out: Tensor | None = None
        for rows, width in groups:
            h = self.backbone(input_ids=input_ids[rows, :width], use_cache=False).last_hidden_state  # [b, w, d]
            where = torch.full((input_ids.shape[0],), -1, dtype=torch.long, device=input_ids.device)
            where[rows] = torch.arange(rows.numel(), device=input_ids.device)
            sel = torch.nonzero(where[query_rows] >= 0).flatten()  # the queries of these rows
            part = h[where[query_rows[sel]], query_cols[sel]]  # [p, d]
            if out is None:
                out = part.new_empty(query_rows.numel(), part.shape[1])
            out = out.index_put((sel,), part)
        return out

    @staticmethod
    def _length_groups(query_rows: Tensor, query_cols: Tensor, n_rows: int) -> list[tuple[Tensor, int]] | None:
        """Rows by length (a row ends at its last query), cut where a row is under half the group's width."""
        lengths = torch.zeros(n_rows, dtype=torch.long, device=query_rows.device)
        lengths = lengths.scatter_reduce(0, query_rows, query_cols + 1, reduce="amax").tolist()
        order = sorted(range(n_rows), key=lambda r: -lengths[r])
        groups: list[list[int]] = [[order[0]]]
        for r in order[1:]:
            if 2 * lengths[r] < lengths[groups[-1][0]]:
                groups.append([])
            groups[-1].append(r)
        if len(groups) == 1:
            return None
        device = query_rows.device
        return [(torch.tensor(sorted(g), dtype=torch.long, device=device), lengths[g[0]]) for g in groups]

    def forward(self, input_ids: Tensor, query_rows: Tensor, query_cols: Tensor,
                targets: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(logits [P, N], None) without targets; (None, mean cross-entropy over the P queries) with them.

        With targets the logits are never materialised whole: the CE runs in item chunks for big catalogs.
        """
        h = self.hidden_at(input_ids, query_rows, query_cols)  # [P, d]
        if targets is None:
            return self.ilp(h), None  # [P, N]
        return None, linear_cross_entropy(h, self.ilp.weight, targets)


def collate(samples: Sequence[Sample], pad_id: int, device: str | torch.device = "cpu") -> tuple[Tensor, ...]:
    """Samples -> (input_ids [B, L] right padded, query_rows [P], query_cols [P], targets [P])."""
    width = max(len(s.tokens) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, s in enumerate(samples):
        ids[r, : len(s.tokens)] = torch.tensor(s.tokens, dtype=torch.long)
        rows += [r] * len(s.query_pos)
        cols += s.query_pos
        targets += s.targets
    def as_long(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    return ids.to(device), as_long(rows), as_long(cols), as_long(targets)


# ---- data: one item space over the union of the domains -------------------------------------------------


@dataclass
class Corpus:
    """Tokenised domains with item IDs offset into one union space (domain k's items after domain k-1's)."""

    domains: list[str]
    datasets: list[Artifact]
    offsets: list[int]  # first union item ID of each domain
    sizes: list[int]  # items per domain
    itok: ItemTokenizer
    item_tokens: list[list[int]]  # union item ID -> text tokens (without [Q])
    train_items: list[list[int]]  # per history: union IDs of its training part (all but valid and test items)
    eval_samples: list[Sample]  # histories (VALID, TEST queries) then alignment samples, union IDs
    eval_domain: list[int]  # domain index of each eval sample

    @property
    def n_items(self) -> int:
        return sum(self.sizes)

    @property
    def pad_id(self) -> int:
        return self.itok.pad_id


def build_corpus(zoo: Zoo, datasets: Sequence[Artifact], tokenizer: Any, text: TextConfig) -> Corpus:
    from st2si_cli.data.prepare import load_dataset

    itok = ItemTokenizer.create(tokenizer, text)
    offsets, sizes, item_tokens, train_items, eval_samples, eval_domain = [], [], [], [], [], []
    histories, aligns = [], []
    for k, art in enumerate(datasets):
        ds = load_dataset(zoo, art.id)
        off = len(item_tokens)
        offsets.append(off)
        sizes.append(ds.n_items)
        toks = itok.encode_items(ds.items)
        item_tokens += toks
        train_items += [[off + i for i in seq[:-2]] for seq in ds.sequences]
        for s in build_samples(ds, itok, toks, alignment=True, every_position=False):
            shifted = Sample(s.tokens, s.query_pos, [off + t for t in s.targets], s.roles, s.owner)
            (aligns if s.roles == [ALIGN] else histories).append((shifted, k))
    for s, k in histories + aligns:
        eval_samples.append(s)
        eval_domain.append(k)
    return Corpus([a.name or a.id for a in datasets], list(datasets), offsets, sizes, itok, item_tokens,
                  train_items, eval_samples, eval_domain)


def _history_sample(itok: ItemTokenizer, item_tokens: list[list[int]], inputs: Sequence[int],
                    targets: Sequence[int], owner: int, multi_query: bool) -> Sample:
    """`T1 [Q] ... Tm [Q]` over the newest items that fit; query j predicts targets[j]."""
    m = itok.history_window([item_tokens[i] for i in inputs])
    tokens, qpos = itok.sequence([item_tokens[i] for i in inputs[len(inputs) - m:]])
    tgts = list(targets[len(targets) - m:])
    if not multi_query:
        qpos, tgts = qpos[-1:], tgts[-1:]
    return Sample(tokens, qpos, tgts, [TRAIN] * len(tgts), owner)


def epoch_samples(corpus: Corpus, cfg: PretrainConfig, epoch: int) -> list[Sample]:
    """The training samples of one epoch: one per history with a training position, then one per item.

    sampling "all": the history's whole training part, every query a training position (the paper's
    Eq. 3). sampling "crop" (the authors' code): per user, a target index `end` drawn uniformly from the
    training part (never its first item) and a start uniformly before it; the crop is the input and each
    query predicts the item after it. Seeded by (seed, epoch), the same on every rank.
    """
    itok, toks = corpus.itok, corpus.item_tokens
    rng = random.Random(cfg.seed * 1_000_003 + epoch)
    out: list[Sample] = []
    for u, items in enumerate(corpus.train_items):
        n = len(items)
        if n < 2:
            continue
        if cfg.sampling == "crop":
            end = rng.randint(1, n - 1)
            start = rng.randint(0, end - 1)
            out.append(_history_sample(itok, toks, items[start:end], items[start + 1 : end + 1], u, cfg.multi_query))
        else:
            out.append(_history_sample(itok, toks, items[:-1], items[1:], u, cfg.multi_query))
    if cfg.alignment:
        for i, ids in enumerate(toks):
            tokens = itok.alignment(ids)
            out.append(Sample(tokens, [len(tokens) - 1], [i], [ALIGN], i))
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shuffle: depends on (seed, epoch) only, never on the world size."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def split_even(items: Sequence[int], parts: int) -> list[list[int]]:
    """`parts` consecutive slices whose sizes differ by at most one (the first ones larger)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        size = q + (1 if p < r else 0)
        out.append(list(items[start : start + size]))
        start += size
    return out


def learning_rate_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base LR: linear warm-up, then cosine to 0 at `total_steps`.

    Warm-up is clipped to a tenth of the run, so a short run still spends most of its steps decaying.
    """
    warmup = min(warmup_steps, total_steps // 10)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


# ---- evaluation ----------------------------------------------------------------------------------------


def valid_view(s: Sample) -> Sample | None:
    """A history sample cut after its VALID query (what validation needs; causal, so the same feature)."""
    if VALID not in s.roles:
        return None
    j = s.roles.index(VALID)
    p = s.query_pos[j]
    return Sample(s.tokens[: p + 1], [p], [s.targets[j]], [VALID], s.owner)


@torch.no_grad()
def collect_features(module: ST2SI, samples: Sequence[Sample], *, pad_id: int, device: str, precision: str,
                     batch_tokens: int, max_batch: int, shard: tuple[int, int] = (0, 1),
                     equal_rounds: bool = False) -> dict[int, Tensor]:
    """Query features of this rank's share of `samples`: {sample index: [q, d] float32 on CPU}.

    Batches are planned over all samples (length-sorted) and dealt to ranks round-robin. With
    `equal_rounds` every rank runs the same number of forwards (ZeRO-3 gathers weights collectively).
    """
    rank, world = shard
    batches = plan_batches([len(s.tokens) for s in samples], batch_tokens, max_batch)
    rounds = -(-len(batches) // world)
    out: dict[int, Tensor] = {}
    for k in range(rounds):
        b = k * world + rank
        if b >= len(batches) and not equal_rounds:
            break
        idx = batches[b] if b < len(batches) else batches[0]
        ids, rows, cols, _ = collate([samples[i] for i in idx], pad_id, device)
        with dist.autocast(device, precision):
            h = module.hidden_at(ids, rows, cols).float().cpu()  # [P, d]
        if b >= len(batches):
            continue  # a filler forward
        start = 0
        for i in idx:
            q = len(samples[i].query_pos)
            out[i] = h[start : start + q]
            start += q
    return out


def validate(engine: dist.Engine, corpus: Corpus, valid_samples: list[Sample], info: dist.DistInfo,
             cfg: PretrainConfig, precision: str) -> dict[str, float]:
    """Validation NDCG@10 (and friends) over the union catalog, work shared by the ranks."""
    from st2si_cli.metrics import metrics_from_ranks

    engine.eval()
    module = engine.module
    feats = collect_features(module, valid_samples, pad_id=corpus.pad_id, device=info.device, precision=precision,
                             batch_tokens=cfg.eval_batch_tokens, max_batch=cfg.eval_max_batch,
                             shard=(info.rank, info.world_size), equal_rounds=engine.zero_stage == 3)
    with engine.gathered([module.ilp.weight]):
        weight = module.ilp.weight.detach().float().cpu()  # [N, d]
    mine = sorted(feats)
    ranks: list[int] = []
    if mine:
        h = torch.cat([feats[i] for i in mine])  # one VALID query per sample
        t = torch.tensor([valid_samples[i].targets[0] for i in mine])
        ranks = rank_rows(weight, h, t).tolist()
    gathered = dist.all_gather_objects(info, (mine, ranks))
    by_sample = {i: r for idx, rk in gathered for i, r in zip(idx, rk)}
    engine.train()
    return metrics_from_ranks([by_sample[i] for i in range(len(valid_samples))], (10,))


def final_metrics(module: ST2SI, corpus: Corpus, *, device: str, precision: str, cfg: PretrainConfig,
                  ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(union metrics, per-domain metrics) of the given weights: valid, test and text->ID accuracy.

    Per domain the head is its slice of the ILP, ranking that domain's items only (as `st2si eval` does).
    """
    from st2si_cli.train.head import alignment_accuracy, evaluate_split

    module.eval()
    samples = corpus.eval_samples
    feats = collect_features(module, samples, pad_id=corpus.pad_id, device=device, precision=precision,
                             batch_tokens=cfg.eval_batch_tokens, max_batch=cfg.eval_max_batch)
    weight = module.ilp.weight.detach().float().cpu()

    def feature_set(keep: Callable[[int], bool], offset: int) -> FeatureSet:
        idx = [i for i in range(len(samples)) if keep(i)]
        return FeatureSet(
            feats=torch.cat([feats[i] for i in idx]),
            targets=torch.tensor([t - offset for i in idx for t in samples[i].targets], dtype=torch.long),
            roles=torch.tensor([r for i in idx for r in samples[i].roles], dtype=torch.int8),
            owner=torch.tensor([samples[i].owner for i in idx for _ in samples[i].targets], dtype=torch.long),
            sample=torch.tensor([i for i in idx for _ in samples[i].targets], dtype=torch.long),
        )

    def metrics(w: Tensor, fs: FeatureSet) -> dict[str, Any]:
        return {"valid": evaluate_split(w, fs, VALID), "test": evaluate_split(w, fs, TEST),
                "alignment": alignment_accuracy(w, fs)}

    union = metrics(weight, feature_set(lambda i: True, 0))
    per_domain = {}
    for k, name in enumerate(corpus.domains):
        off, n = corpus.offsets[k], corpus.sizes[k]
        per_domain[name] = metrics(weight[off : off + n], feature_set(lambda i, k=k: corpus.eval_domain[i] == k, off))
    return union, per_domain


# ---- checkpoints and run state ---------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run is; `state.json` in the staging folder, replaced atomically after each checkpoint."""

    key: str
    epoch: int = 1  # the epoch to run next (or in progress)
    step: int = 0  # optimizer steps already done within it
    global_step: int = 0
    stopped: bool = False  # training is over: only the final evaluation and storing remain
    checkpoint: str | None = None  # folder under checkpoints/ holding the state at (epoch, step)
    best: dict[str, float] | None = None
    best_epoch: int = 0
    since_best: int = 0
    best_file: str | None = None  # best-<epoch>.safetensors: the best epoch's consolidated weights
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"train": 0.0, "valid": 0.0})
    world_size: int = 1

    def write(self, stage: Path) -> None:
        tmp = stage / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, stage / "state.json")

    @classmethod
    def read(cls, stage: Path) -> RunState | None:
        path = stage / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    if torch.cuda.is_available() and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(stage: Path, engine: dist.Engine, state: RunState, info: dist.DistInfo,
                    rank_extra: dict[str, Any], improved: bool) -> None:
    """All ranks: engine state, each rank's RNG and loss sums, the best weights if improved; then the pointer."""
    tag = f"step-{state.global_step:08d}"
    folder = stage / "checkpoints" / tag
    if info.is_main:
        shutil.rmtree(folder, ignore_errors=True)  # a half-written one from a killed attempt
        folder.mkdir(parents=True)
    dist.barrier(info)
    engine.save(folder, info)
    dist.torch_save_atomic({"rng": rng_state(), **rank_extra}, folder / f"rank-{info.rank}.pt")
    if improved:
        best = f"best-{state.best_epoch:04d}.safetensors"
        sd = engine.consolidated_state_dict(folder)
        if info.is_main:
            dist._write_safetensors(sd, stage / best)
        state.best_file = best
    dist.barrier(info)
    state.checkpoint = tag
    if info.is_main:
        state.write(stage)
        for old in (stage / "checkpoints").iterdir():
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        for old in stage.glob("best-*.safetensors"):
            if old.name != state.best_file:
                old.unlink(missing_ok=True)
    dist.barrier(info)


def load_rank_state(stage: Path, state: RunState, info: dist.DistInfo) -> dict[str, Any]:
    folder = stage / "checkpoints" / state.checkpoint
    path = folder / f"rank-{info.rank}.pt"
    return torch.load(path, weights_only=True)


# ---- backbones -------------------------------------------------------------------------------------------


def load_trainable(zoo: Zoo, art: Artifact, query: str) -> tuple[nn.Module, Any]:
    """The backbone's base model in fp32 (master weights) and its tokenizer, with [Q] added if asked."""
    from transformers import AutoModel, AutoTokenizer

    from st2si_cli.backbones import add_query_token
    from st2si_cli.hf import quiet_transformers

    quiet_transformers()
    folder = zoo.view(art)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    if query == "new":
        add_query_token(model, tokenizer)
    return model, tokenizer


def store_backbone(zoo: Zoo, art: Artifact, backbone_state: dict[str, Tensor], tokenizer: Any, query: str,
                   name: str, meta: dict[str, Any]) -> Artifact:
    """The tuned weights in the source backbone's own format (a causal LM folder; an untied LM head is kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from st2si_cli.backbones import add_query_token, save_backbone_folder

    folder = zoo.view(art)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if query == "new":
        add_query_token(model, AutoTokenizer.from_pretrained(folder))
    model.base_model.load_state_dict(backbone_state, strict=True)
    model.tie_weights()
    return save_backbone_folder(model, tokenizer, zoo, name, meta)


# ---- the run -----------------------------------------------------------------------------------------------


@dataclass
class PretrainResult:
    run: Artifact | None  # None on ranks other than 0
    backbone: Artifact | None
    heads: dict[str, Artifact]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def default_out_name(backbone: str, domains: Sequence[str], cfg: PretrainConfig, text: TextConfig) -> str:
    name = f"{backbone}-st2si-{'+'.join(domains)}"
    for flag, on in (("nomq", not cfg.multi_query), ("noalign", not cfg.alignment), ("crop", cfg.sampling == "crop"),
                     ("newq", text.query == "new")):
        if on:
            name += f"-{flag}"
    return name


def run_key(bb: Artifact, datasets: Sequence[Artifact], text: TextConfig, cfg: PretrainConfig, world_size: int,
            ds_config: dict[str, Any] | None, precision: str) -> str:
    spec = {"format": RUN_FORMAT, "backbone": bb.id, "datasets": [a.id for a in datasets], "text": text.to_dict(),
            "config": cfg.result_dict(), "world_size": world_size, "deepspeed": ds_config, "precision": precision}
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def pretrain(
    zoo: Zoo,
    domains: Sequence[str],
    *,
    backbone: str = "smollm2-135m",
    text: TextConfig | None = None,
    cfg: PretrainConfig | None = None,
    out: str | None = None,
    device: str = "auto",
    deepspeed: str | None = None,
    resume: bool = False,
    restart: bool = False,
    reporter: Reporter | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> PretrainResult:
    """Full tuning on one or more domains; stores a backbone, a head per domain and a run (rank 0).

    `deepspeed`: None (one process, or torch DDP under torchrun), a preset zero0..zero3, or a JSON file.
    `on_step(info)` runs after every optimizer step (and its checkpoint); raising from it stops the run
    the way a kill would (tests use this).
    """
    text = text or TextConfig()
    cfg = cfg or PretrainConfig()
    _check(cfg, domains)
    with dist.processes(device, use_deepspeed=deepspeed is not None) as info:
        reporter = reporter if (reporter is not None and info.is_main) else Reporter()
        return _pretrain(zoo, list(domains), backbone, text, cfg, out, info, deepspeed, resume, restart,
                         reporter, on_step)


def _check(cfg: PretrainConfig, domains: Sequence[str]) -> None:
    if not domains:
        raise St2siError("give at least one domain")
    if len(set(domains)) != len(domains):
        raise St2siError("a domain is given twice")
    if cfg.sampling not in SAMPLINGS:
        raise St2siError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {cfg.sampling!r}")
    for k in ("batch_size", "grad_accum", "epochs", "patience"):
        if getattr(cfg, k) < 1:
            raise St2siError(f"{k} must be at least 1, not {getattr(cfg, k)}")
    if cfg.save_every < 0:
        raise St2siError(f"save_every must be >= 0, not {cfg.save_every}")


def _pretrain(zoo: Zoo, domains: list[str], backbone: str, text: TextConfig, cfg: PretrainConfig, out: str | None,
              info: dist.DistInfo, ds_spec: str | None, resume: bool, restart: bool, reporter: Reporter,
              on_step: Callable[[dict[str, Any]], None] | None) -> PretrainResult:
    from st2si_cli.backbones import ensure_backbone

    t_start = time.time()
    if info.is_main:
        ensure_backbone(zoo, backbone)  # may build it; the other ranks wait and then read it
    dist.barrier(info)
    bb_art = zoo.get(backbone, kind="backbone")
    ds_arts = [zoo.get(d, kind="dataset") for d in domains]
    precision = dist.resolve_precision(cfg.precision, info.device)
    ds_config = None
    if ds_spec is not None:
        ds_config = dist.deepspeed_config(ds_spec, micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum,
                                          world_size=info.world_size, max_grad_norm=cfg.max_grad_norm,
                                          precision=precision)
    key = run_key(bb_art, ds_arts, text, cfg, info.world_size, ds_config, precision)
    stage = zoo.root / "tmp" / f"run-{key[:16]}"
    if info.is_main:
        zoo.staging_dir(stage.name)
    dist.barrier(info)

    state = RunState.read(stage)
    if state is not None and not resume:
        if not restart:
            raise St2siError(
                f"an interrupted run with these settings has a checkpoint (epoch {state.epoch}, step {state.step}): "
                "add --resume to continue it, or --restart to start over"
            )
        state = None
    dist.barrier(info)  # everyone has read the state before rank 0 may clear it
    if state is None:
        if info.is_main:
            for old in [stage / "checkpoints", *stage.glob("best-*"), stage / "state.json"]:
                shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        state = RunState(key=key, world_size=info.world_size)
    elif resume:
        reporter.message(f"Resuming run {key[:12]} at epoch {state.epoch}, step {state.step}"
                         + (" (training done: final evaluation)" if state.stopped else ""))
    dist.barrier(info)

    model, tokenizer = load_trainable(zoo, bb_art, text.query)
    corpus = build_corpus(zoo, ds_arts, tokenizer, text)
    n_train = len(epoch_samples(corpus, cfg, 1))
    if n_train == 0:
        raise St2siError("no training samples: every user needs at least 4 items (or keep the alignment samples)")
    per_step = cfg.batch_size * cfg.grad_accum * info.world_size
    steps_per_epoch = -(-n_train // per_step)
    total_steps = steps_per_epoch * cfg.epochs

    if not state.stopped:
        torch.manual_seed(cfg.seed)
        module = ST2SI(model, corpus.n_items, seed=cfg.seed).to(info.device)
        engine = _make_engine(module, cfg, info, ds_config, precision, total_steps)
        rank_extra = {"loss_sum": 0.0, "loss_count": 0, "tokens": 0}
        if state.checkpoint is not None:
            engine.load(stage / "checkpoints" / state.checkpoint)
            rank_state = load_rank_state(stage, state, info)
            set_rng_state(rank_state["rng"])
            rank_extra = {k: rank_state[k] for k in rank_extra}
        _train(engine, corpus, cfg, info, precision, state, stage, steps_per_epoch, rank_extra, reporter, on_step)
        del engine, module
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not info.is_main:
        return PretrainResult(None, None, {}, {}, state.history)
    return _finish(zoo, corpus, bb_art, ds_arts, tokenizer, text, cfg, out, info, ds_spec, ds_config, precision,
                   state, stage, steps_per_epoch, time.time() - t_start, reporter)


def _make_engine(module: ST2SI, cfg: PretrainConfig, info: dist.DistInfo, ds_config: dict[str, Any] | None,
                 precision: str, total_steps: int) -> dist.Engine:
    schedule = learning_rate_schedule(total_steps, cfg.warmup_steps)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ds_config is not None:
        return dist.DeepSpeedEngine(module, optimizer, schedule, info, ds_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return dist.PlainEngine(module, optimizer, scheduler, info, precision, cfg.max_grad_norm)


def _train(engine: dist.Engine, corpus: Corpus, cfg: PretrainConfig, info: dist.DistInfo, precision: str,
           state: RunState, stage: Path, steps_per_epoch: int, rank_extra: dict[str, Any], reporter: Reporter,
           on_step: Callable[[dict[str, Any]], None] | None) -> None:
    valid_samples = [v for s in corpus.eval_samples if (v := valid_view(s)) is not None]
    parts = info.world_size * cfg.grad_accum
    reporter.training_start(steps_per_epoch, cfg.epochs)
    if state.step:
        reporter.training_step(state.step)  # a resumed epoch's bar starts where it stopped
    engine.train()
    while not state.stopped:
        epoch = state.epoch
        e0 = mark = time.time()
        samples = epoch_samples(corpus, cfg, epoch)
        order = epoch_order(len(samples), cfg.seed, epoch)
        per_step = cfg.batch_size * parts
        for k in range(state.step, steps_per_epoch):
            batch = order[k * per_step : (k + 1) * per_step]  # this step's global batch
            n_global = sum(len(samples[i].targets) for i in batch)
            chunks = split_even(batch, parts)
            scale = dist.loss_scale(n_global, info, cfg.grad_accum, engine.deepspeed)
            for m in range(cfg.grad_accum):
                mine = chunks[m * info.world_size + info.rank]  # a disjoint slice per (micro-step, rank)
                real = bool(mine)
                mine = mine or batch[:1]  # an empty slice still joins the collective, with zero weight
                tensors = collate([samples[i] for i in mine], corpus.pad_id, info.device)
                n_local = int(tensors[3].numel())
                loss = engine.micro_step(tensors, scale * n_local if real else 0.0, boundary=m == cfg.grad_accum - 1)
                if real:
                    rank_extra["loss_sum"] += loss * n_local
                    rank_extra["loss_count"] += n_local
                    rank_extra["tokens"] += sum(len(samples[i].tokens) for i in mine)
            engine.step()
            state.step = k + 1
            state.global_step += 1
            reporter.training_step(1)
            if cfg.save_every and state.global_step % cfg.save_every == 0 and state.step < steps_per_epoch:
                state.seconds["train"] += time.time() - mark
                mark = time.time()
                save_checkpoint(stage, engine, state, info, rank_extra, improved=False)
            if on_step is not None:
                on_step({"epoch": epoch, "step": state.step, "global_step": state.global_step, "loss": loss,
                         "lr": engine.lr(), "module": engine.module})
        loss_sum, loss_count, tokens = dist.all_sum(
            info, [rank_extra["loss_sum"], rank_extra["loss_count"], rank_extra["tokens"]])
        train_seconds = time.time() - e0
        state.seconds["train"] += time.time() - mark
        v0 = time.time()
        valid = validate(engine, corpus, valid_samples, info, cfg, precision)
        valid_seconds = time.time() - v0
        state.seconds["valid"] += valid_seconds
        improved = state.best is None or valid["NDCG@10"] > state.best["NDCG@10"]
        if improved:
            state.best, state.best_epoch, state.since_best = valid, epoch, 0
        else:
            state.since_best += 1
        record = {"epoch": epoch, "loss": loss_sum / max(loss_count, 1), "steps": state.global_step,
                  "lr": engine.lr(), "tokens": int(tokens),
                  **{f"valid_{k}": v for k, v in valid.items() if k != "n_users"},
                  "train_seconds": round(train_seconds, 3), "valid_seconds": round(valid_seconds, 3),
                  "seconds": round(train_seconds + valid_seconds, 3)}
        state.history.append(record)
        state.epoch, state.step = epoch + 1, 0
        state.stopped = state.since_best >= cfg.patience or epoch >= cfg.epochs
        rank_extra.update(loss_sum=0.0, loss_count=0, tokens=0)
        save_checkpoint(stage, engine, state, info, rank_extra, improved=improved)
        reporter.epoch({**record, "best_epoch": state.best_epoch, "improved": improved})


def _finish(zoo: Zoo, corpus: Corpus, bb_art: Artifact, ds_arts: list[Artifact], tokenizer: Any, text: TextConfig,
            cfg: PretrainConfig, out: str | None, info: dist.DistInfo, ds_spec: str | None,
            ds_config: dict[str, Any] | None, precision: str, state: RunState, stage: Path, steps_per_epoch: int,
            elapsed: float, reporter: Reporter) -> PretrainResult:
    """Rank 0: best weights -> final metrics -> backbone, heads and run into the zoo; staging removed."""
    from safetensors.torch import load_file

    from st2si_cli.heads import save_head

    t0 = time.time()
    best = load_file(str(stage / state.best_file))
    model, _ = load_trainable(zoo, bb_art, text.query)
    module = ST2SI(model, corpus.n_items)
    module.load_state_dict(best)
    module.to(info.device)
    reporter.message(f"Evaluating the best epoch ({state.best_epoch}) on valid and test")
    union, per_domain = final_metrics(module, corpus, device=info.device, precision=precision, cfg=cfg)
    eval_seconds = time.time() - t0

    name = out or default_out_name(bb_art.name or bb_art.short_id, corpus.domains, cfg, text)
    # The non-default choices (what `st2si zoo ls --kind run` shows); `config` has every setting.
    flags = {"no-multi-query": not cfg.multi_query, "no-alignment": not cfg.alignment,
             "sampling": cfg.sampling if cfg.sampling != "all" else None,
             "query-token": text.query if text.query != "dot" else None,
             "deepspeed": (ds_spec if ds_spec in dist.ZERO_PRESETS else "json") if ds_spec else None,
             "world-size": info.world_size if info.world_size > 1 else None}
    inputs = {"backbone": bb_art.id, "datasets": [a.id for a in ds_arts]}
    config = {"train": cfg.to_dict(), "text": text.to_dict(), "precision": precision, "deepspeed": ds_config,
              "domains": corpus.domains, "offsets": corpus.offsets, "n_items": corpus.n_items,
              "steps_per_epoch": steps_per_epoch, "key": state.key}
    s0 = time.time()
    backbone_state = {k.removeprefix("backbone."): v for k, v in best.items() if k.startswith("backbone.")}
    new_bb = store_backbone(zoo, bb_art, backbone_state, tokenizer, text.query, name, {
        "source": {"type": "st2si-pretrain", "from": bb_art.id, "from_name": bb_art.name, "domains": corpus.domains},
        "inputs": inputs, "text": text.to_dict(), "query_token": text.query, "flags": flags,
        "metrics": union, "versions": {"torch": torch.__version__},
    })
    ilp = best["ilp.weight"]
    heads: dict[str, Artifact] = {}
    timings = {"total_seconds": round(elapsed + time.time() - t0, 2), "train_seconds": round(state.seconds["train"], 2),
               "valid_seconds": round(state.seconds["valid"], 2), "final_eval_seconds": round(eval_seconds, 2),
               "epochs": len(state.history),
               "epoch_seconds": round(sum(r["seconds"] for r in state.history) / max(1, len(state.history)), 2)}
    for k, (art, domain) in enumerate(zip(ds_arts, corpus.domains)):
        off, n = corpus.offsets[k], corpus.sizes[k]
        meta = {"method": "full", "dtype": "float32", "train": cfg.to_dict(), "metrics": per_domain[domain],
                "protocol": {"ties": "pessimistic", "mask_history": False, "ranking": "full"},
                "best_epoch": state.best_epoch, "history": state.history, "timings": timings,
                "pretrain": {"key": state.key, "domains": corpus.domains, "offset": off, "union_items": corpus.n_items},
                "inputs": {"source_backbone": bb_art.id}}
        heads[domain] = save_head(zoo, ilp[off : off + n], domain=domain, backbone=new_bb, dataset=art, text=text,
                                  meta=meta)
    timings["store_seconds"] = round(time.time() - s0, 2)
    meta = {"flags": flags, "config": config, "metrics": {**union, "domains": per_domain}, "history": state.history,
            "best_epoch": state.best_epoch, "timings": timings, "inputs": inputs, "world_size": info.world_size,
            "outputs": {"backbone": new_bb.id, "heads": {d: h.id for d, h in heads.items()}},
            "versions": {"st2si": __version__, "torch": torch.__version__}}
    run = zoo.put("run", {"run.json": json.dumps(meta, indent=1, sort_keys=True).encode()}, meta,
                  name=f"run/{name}", domain="+".join(corpus.domains))
    shutil.rmtree(stage, ignore_errors=True)
    return PretrainResult(run, new_bb, heads, union, state.history)


__all__ = [
    "Corpus",
    "PretrainConfig",
    "PretrainResult",
    "RunState",
    "ST2SI",
    "build_corpus",
    "collate",
    "epoch_order",
    "epoch_samples",
    "learning_rate_schedule",
    "pretrain",
    "split_even",
]
