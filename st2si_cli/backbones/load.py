"""Loading a backbone from the zoo for feature extraction or tuning: dtype and device choice, the
query token [Q] added to the tokenizer and embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from st2si_cli.backbones import hf
from st2si_cli.errors import St2siError, ZooError
from st2si_cli.zoo.store import Artifact, Zoo


@dataclass
class Backbone:
    """A loaded base model (no LM head) with its tokenizer."""

    model: Any  # transformers PreTrainedModel returning last_hidden_state
    tokenizer: Any
    hidden_size: int
    artifact_id: str
    name: str | None
    dtype: Any  # torch.dtype
    packed_only: bool = False  # `model` is a PackedLlama (inference features only, no transformers module)
    _st2si: Any = field(default=None, init=False, repr=False)

    def st2si(self) -> Any:
        """The ST2SI module around this backbone, without an ILP: `hidden_at(samples)` for features."""
        if self._st2si is None and self.packed_only:
            from st2si_cli.model.fast import PackedST2SI

            self._st2si = PackedST2SI(self.model)
        if self._st2si is None:
            from st2si_cli.model.st2si import ST2SI
            from st2si_cli.model.text import pad_token_id

            self._st2si = ST2SI(self.model, None, pad_id=pad_token_id(self.tokenizer))
        return self._st2si

    def hidden_states(self, input_ids: Any) -> Any:
        """[B, L] token IDs, right padded -> [B, L, d] last hidden states.

        Right padding with pure causal attention needs no mask: a real token never attends to the
        pads after it, and positions start at 0 for every row, so features equal unpadded ones.
        """
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def resolve_dtype(dtype: str, device: str = "cpu") -> Any:
    """'auto' -> bf16 where the device computes it natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs), else fp32."""
    import torch

    if dtype in ("fp32", "float32"):
        return torch.float32
    if dtype in ("bf16", "bfloat16"):
        return torch.bfloat16
    if dtype in ("fp16", "float16"):
        return torch.float16
    if dtype != "auto":
        raise St2siError(f"unknown dtype {dtype!r} (auto, bf16, fp16, fp32)")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def device_problem(device: str) -> str | None:
    """Why torch cannot compute on `device` here (a CUDA device without a CUDA build or a visible GPU,
    a GPU index out of range, MPS missing); None: it can, or `device` is not a GPU."""
    import torch

    if device.startswith("cuda"):
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"CUDA is not available in this torch build (torch {torch.__version__}, CPU only): use --device cpu"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"CUDA is not available: torch {torch.__version__} sees no GPU on this machine; use --device cpu"
        _, _, n = device.partition(":")
        if n.isdigit() and int(n) >= count:
            return f"{device} is not a GPU here: torch sees {count} (cuda:0 to cuda:{count - 1})"
    elif device == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine or in this torch build: use --device cpu"
    return None


def check_device(device: str) -> None:
    """A St2siError (one line) when torch cannot compute on `device` here."""
    why = device_problem(device)
    if why is not None:
        raise St2siError(why)


def load_backbone(
    zoo: Zoo,
    ref: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    query: str = "dot",
    inference_only: bool = False,
) -> Backbone:
    """Load a backbone artifact from the zoo as a base model in eval mode.

    `inference_only`: the caller needs only `st2si().hidden_at` under inference mode and the tokenizer;
    a plain Llama folder is then loaded without transformers (`backbones/fast_load.py`: weights
    memory-mapped, the same features and token IDs), anything else as below.
    """
    if inference_only and device == "cpu":
        fast = _load_inference_only(zoo, ref, dtype, query)
        if fast is not None:
            return fast

    from st2si_cli.backbones.hf import quiet_transformers

    quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    check_device(device)
    art = zoo.get(ref, kind="backbone")
    folder = zoo.view(art)
    torch_dtype = resolve_dtype(dtype, device)
    hf.refuse_custom_code(folder)
    with removed_while_loading(zoo, art, folder):
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModel.from_pretrained(
            folder, dtype=torch_dtype, attn_implementation="sdpa", trust_remote_code=False
        )
    if query == "new":
        add_query_token(model, tokenizer)
    model.to(device).eval()
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        hidden_size=int(
            model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
        ),
        artifact_id=art.id,
        name=art.name,
        dtype=torch_dtype,
    )


def _load_inference_only(zoo: Zoo, ref: str, dtype: str, query: str) -> Backbone | None:
    import os

    from st2si_cli.backbones.fast_load import load_fast

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    art = zoo.get(ref, kind="backbone")
    folder = zoo.view(art)
    torch_dtype = resolve_dtype(dtype, "cpu")
    hf.refuse_custom_code(folder)
    with removed_while_loading(zoo, art, folder):
        got = load_fast(folder, torch_dtype, "cpu", query)
    if got is None:
        return None
    packed, tokenizer = got
    return Backbone(
        model=packed,
        tokenizer=tokenizer,
        hidden_size=int(packed.embed.shape[1]),
        artifact_id=art.id,
        name=art.name,
        dtype=torch_dtype,
        packed_only=True,
    )


def add_query_token(model: Any, tokenizer: Any) -> int:
    """Add a new [Q] token; its embedding starts at the mean of the existing ones (deterministic)."""
    import torch

    from st2si_cli.model.text import NEW_QUERY_TOKEN

    if NEW_QUERY_TOKEN in tokenizer.get_vocab():
        return tokenizer.convert_tokens_to_ids(NEW_QUERY_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": [NEW_QUERY_TOKEN]})
    emb = model.get_input_embeddings()
    mean = emb.weight.detach().float().mean(0)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    tid = tokenizer.convert_tokens_to_ids(NEW_QUERY_TOKEN)
    with torch.no_grad():
        model.get_input_embeddings().weight[tid] = mean.to(model.get_input_embeddings().weight.dtype)
    return tid


# ---- building backbones into the zoo ------------------------------------------------------------


@contextmanager
def removed_while_loading(zoo: Zoo, art: Artifact, folder: Path) -> Iterator[None]:
    """A load that fails because `zoo rm` removed the backbone meanwhile: one line saying so."""
    try:
        yield
    except (OSError, ValueError):
        if zoo.find(art.id, kind="backbone") is None or not folder.is_dir():
            raise ZooError(
                f"backbone {art.name or art.short_id} was removed from the zoo while loading"
            ) from None
        raise
