"""Full-tuning settings, their checks, the run key, and what a run is fixed to once it starts."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from st2si_cli.errors import St2siError
from st2si_cli.model.text import TextConfig
from st2si_cli.progress import Reporter
from st2si_cli.zoo.store import Artifact, Zoo, canonical_json

if TYPE_CHECKING:
    from st2si_cli.pretrain.distributed import DistInfo

RUN_FORMAT = 1  # bump when checkpoints or the sample definition change
SAMPLINGS = ("all", "crop")
CACHE_DTYPES = ("bf16", "fp32")


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
    sampling: str = (
        "all"  # "all": every TRAIN query of each history; "crop": one random crop per user per epoch
    )
    multi_query: bool = True  # False: only the last query of each history trains (Table 3)
    alignment: bool = True  # False: no ID-alignment samples (Table 3)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 (else fp16 + loss scaler) on GPU, fp32 on CPU
    save_every: int = 0  # checkpoint every N optimizer steps (0: at epoch ends only); not part of the run key
    max_minutes: float = 0.0  # stop at the first validation point past this much training + validation time (0: no limit); not part of the run key
    eval_batch_tokens: int = 16384  # padded tokens per validation batch; not part of the run key
    eval_max_batch: int = 64
    tune_layers: int = 0  # 0: every layer (full tuning); K: only the top K layers, the final norm and the ILP
    activation_cache: bool = True  # top-K: cache the frozen layers' output once (False: run them each step)
    cache_dtype: str = "bf16"  # the activation cache's dtype: bf16 (half the disk) or fp32
    init_heads: tuple[str, ...] = ()  # ILP heads (names or IDs; IDs once the run starts) the ILP starts from
    valid_every: int = 0  # also validate every N optimizer steps within an epoch (0: at epoch ends only)
    dropout: float = 0.0  # residual dropout on the tuned layers' attention and MLP outputs (OPT's placement)
    lora: int = 0  # LoRA rank on the tuned layers' linear layers (0: the weights themselves train)
    head_lr: float | None = None  # the ILP's learning rate (None: lr)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_dict(self) -> dict[str, Any]:
        """The settings that change the result (the run key)."""
        d = self.to_dict()
        for k in ("save_every", "max_minutes", "eval_batch_tokens", "eval_max_batch"):
            d.pop(k)
        if not self.tune_layers:  # full tuning keeps the keys it had before top-K tuning existed
            for k in ("tune_layers", "activation_cache", "cache_dtype"):
                d.pop(k)
        elif not self.activation_cache:
            d.pop("cache_dtype")
        if not self.init_heads:  # a random ILP keeps the keys it had before --init-head existed
            d.pop("init_heads")
        if not self.valid_every:  # validation at epoch ends only keeps the keys it had before
            d.pop("valid_every")
        for k, off in (("dropout", 0.0), ("lora", 0), ("head_lr", None)):  # off: the keys of before
            if d[k] == off:
                d.pop(k)
        return d


@dataclass
class RunSetup:
    """What a run is fixed to once it starts: inputs, settings, processes, where it stages, whom it tells.

    `pretrain` fills the fields with defaults as it goes (the key needs the DeepSpeed config, the
    staging folder the key); the loop and the storing only read it.
    """

    zoo: Zoo
    backbone: Artifact  # the source backbone
    datasets: list[Artifact]  # one per domain, in the order of the union item space
    text: TextConfig
    cfg: PretrainConfig
    info: DistInfo
    precision: str  # resolved: fp32, bf16 or fp16
    deepspeed: str | None = None  # the user's DeepSpeed spec (a preset or a JSON file); None: no DeepSpeed
    ds_config: dict[str, Any] | None = None  # the resolved DeepSpeed config
    key: str = ""  # run_key(...)
    stage: Path = field(default_factory=Path)  # the staging folder: checkpoints, state.json, best weights
    out: str | None = None  # the name of the stored backbone (None: default_out_name)
    reporter: Reporter = field(default_factory=Reporter)
    on_step: Callable[[dict[str, Any]], None] | None = (
        None  # after every optimizer step (tests stop runs here)
    )
    activations: dict[str, Any] | None = None  # top-K tuning: the activation cache's artifact, size and time
    final_eval: str = "whole forward"  # what the final metrics ran: "whole forward" or "activation cache"


def check_config(cfg: PretrainConfig, domains: Sequence[str]) -> None:
    if not domains:
        raise St2siError("give at least one domain")
    if len(set(domains)) != len(domains):
        raise St2siError("a domain is given twice")
    if cfg.sampling not in SAMPLINGS:
        raise St2siError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {cfg.sampling!r}")
    for k in ("batch_size", "grad_accum", "epochs", "patience"):
        if getattr(cfg, k) < 1:
            raise St2siError(f"{k} must be at least 1, not {getattr(cfg, k)}")
    if cfg.max_minutes < 0:
        raise St2siError(f"max_minutes must be >= 0 (0: no limit), not {cfg.max_minutes}")
    if cfg.save_every < 0:
        raise St2siError(f"save_every must be >= 0, not {cfg.save_every}")
    if cfg.valid_every < 0:
        raise St2siError(f"valid_every must be >= 0 (0: at epoch ends only), not {cfg.valid_every}")
    if cfg.tune_layers < 0:
        raise St2siError(f"tune_layers must be >= 0 (0: all layers), not {cfg.tune_layers}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise St2siError(f"dropout must be in [0, 1), not {cfg.dropout}")
    if cfg.lora < 0:
        raise St2siError(f"lora must be >= 0 (0: no LoRA), not {cfg.lora}")
    if cfg.lr < 0 or (cfg.head_lr is not None and cfg.head_lr < 0):
        raise St2siError(f"learning rates must be >= 0, not {cfg.lr} / {cfg.head_lr}")
    if cfg.cache_dtype not in CACHE_DTYPES:
        raise St2siError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, not {cfg.cache_dtype!r}")
    if cfg.tune_layers and cfg.activation_cache and cfg.sampling == "crop":
        raise St2siError(
            "--sampling crop draws new inputs every epoch, so their activations cannot be cached: "
            "add --no-activation-cache or use --sampling all"
        )


def run_key(
    bb: Artifact,
    datasets: Sequence[Artifact],
    text: TextConfig,
    cfg: PretrainConfig,
    world_size: int,
    ds_config: dict[str, Any] | None,
    precision: str,
) -> str:
    spec = {
        "format": RUN_FORMAT,
        "backbone": bb.id,
        "datasets": [a.id for a in datasets],
        "text": text.to_dict(),
        "config": cfg.result_dict(),
        "world_size": world_size,
        "deepspeed": ds_config,
        "precision": precision,
    }
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


def default_out_name(backbone: str, domains: Sequence[str], cfg: PretrainConfig, text: TextConfig) -> str:
    name = f"{backbone}-st2si-{'+'.join(domains)}"
    if cfg.tune_layers:
        name += f"-top{cfg.tune_layers}"
    if cfg.lora:
        name += f"-lora{cfg.lora}"
    for flag, on in (
        ("nomq", not cfg.multi_query),
        ("noalign", not cfg.alignment),
        ("crop", cfg.sampling == "crop"),
        ("newq", text.query == "new"),
    ):
        if on:
            name += f"-{flag}"
    return name
