"""A Llama-family backbone straight from its folder, for inference: no transformers import.

`recommend` needs one packed forward (`model/fast.py`) and the tokenizer, nothing else that
transformers builds. Here the weights are memory-mapped from the safetensors file(s) (pages are read
on first use and shared with the page cache, not copied; new memory holds only the fused q|k|v
matrices, gate|up where the two are not neighbours in the file, and weights stored in another dtype
than the one asked for) and the tokenizer is the `tokenizers` one from `tokenizer.json`. The result equals
what `AutoModel`/`AutoTokenizer` give: the same weights in the same dtype, the same RoPE tables,
the same token IDs (tests/test_fast_start.py).

`load_fast` returns None whenever the folder is not a plain case it handles (another family, a
RoPE variant, a sliding window, biases it does not know, tokenizer settings transformers would
apply on top of tokenizer.json, weights that are not safetensors): the caller then loads through
transformers as before. `ST2SI_NO_FAST_LOAD=1` in the environment takes that path always (to compare the
two, as bench/first_line.py does).
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# safetensors dtype names -> torch dtype attribute names (only the float types a backbone stores)
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# tokenizer_config classes whose tokenizer is tokenizer.json as is (no normaliser or
# pre-tokeniser rewritten on load)
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_TOKENIZER_KEYS_REFUSED = ("add_prefix_space", "legacy", "from_slow", "add_bos_token", "add_eos_token")


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class FastTokenizer:
    """The slice of a Hugging Face fast tokenizer st2si uses for inference, on `tokenizers` alone:
    `tok(text or texts, add_special_tokens=False)["input_ids"]`, the special-token IDs, the vocabulary."""

    def __init__(self, tokenizer: Any, special: dict[str, str | None]):
        self._tok = tokenizer
        self.pad_token, self.eos_token, self.unk_token = (special.get(k) for k in ("pad", "eos", "unk"))

    @classmethod
    def from_folder(cls, folder: Path) -> FastTokenizer | None:
        """None where transformers would build the tokenizer differently from tokenizer.json."""
        if not (folder / "tokenizer.json").is_file() or not (folder / "tokenizer_config.json").is_file():
            return None
        if (folder / "special_tokens_map.json").exists() or (folder / "added_tokens.json").exists():
            return None
        cfg = _read_json(folder / "tokenizer_config.json")
        if not isinstance(cfg, dict) or cfg.get("tokenizer_class") not in _PLAIN_TOKENIZERS:
            return None
        if any(k in cfg for k in _TOKENIZER_KEYS_REFUSED) or cfg.get("extra_special_tokens"):
            return None
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        for tid, added in (cfg.get("added_tokens_decoder") or {}).items():  # must be in tokenizer.json
            if tok.token_to_id(_token_text(added) or "") != int(tid):
                return None
        special = {k: _token_text(cfg.get(f"{k}_token")) for k in ("pad", "eos", "unk", "bos")}
        for text in special.values():
            if text is not None and tok.token_to_id(text) is None:
                return None
        return cls(tok, special)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        if isinstance(text, str):
            return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}
        encs = self._tok.encode_batch(list(text), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs]}

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        tid = self._tok.token_to_id(token)
        return self.unk_token_id if tid is None else tid

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _safetensors_files(folder: Path) -> list[Path] | None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        return [folder / n for n in names] or None
    single = folder / "model.safetensors"
    return [single] if single.is_file() else None


def read_safetensors_header(f: BinaryIO) -> tuple[dict[str, Any], int]:
    """(tensor name -> {"dtype", "shape", "data_offsets"}, byte offset of the data) of the safetensors
    file open in `f` (read from its start; `__metadata__` left out). No torch: the numpy path reads it too."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    return {k: v for k, v in header.items() if k != "__metadata__"}, 8 + n


def mmap_safetensors(path: Path) -> dict[str, Any]:
    """Every tensor of a safetensors file as a CPU tensor over a private read-only-in-practice
    memory map of the file (copy on write: nothing is read until used, nothing is copied)."""
    import torch

    with open(path, "rb") as f:
        header, base = read_safetensors_header(f)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    flat = torch.frombuffer(mm, dtype=torch.uint8)  # one storage: neighbours in the file stay neighbours
    out: dict[str, Any] = {}
    for name, info in header.items():
        dtype = getattr(torch, _DTYPES[info["dtype"]])  # KeyError: a dtype this loader leaves alone
        lo, hi = info["data_offsets"]
        shape = info["shape"]
        if hi == lo:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + lo) % dtype.itemsize:  # misaligned (safetensors aligns; a foreign writer may not)
            out[name] = torch.frombuffer(mm, dtype=dtype, count=(hi - lo) // dtype.itemsize, offset=base + lo)
            out[name] = out[name].view(shape)
        else:
            out[name] = flat[base + lo : base + hi].view(dtype).view(shape)
    return out


def _rope_theta(cfg: dict[str, Any]) -> float | None:
    """RoPE base of a plain ('default') RoPE config; None for scaled variants."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        if params.get("rope_type", "default") != "default" or set(params) - {"rope_type", "rope_theta"}:
            return None
        return float(params["rope_theta"])
    if cfg.get("rope_scaling"):
        return None
    return float(cfg.get("rope_theta", 10000.0))


@dataclass
class PlainLlama:
    """What a plain Llama folder gives the fast loaders: its config.json, RoPE base and safetensors files."""

    cfg: dict[str, Any]
    rope_theta: float
    files: list[Path]
    tokenizer: FastTokenizer


def plain_llama(folder: Path, device: str, query: str) -> PlainLlama | None:
    """The checks of `load_fast` before the weights (no torch): None unless `folder` is a plain Llama
    case on the CPU (see the module), `ST2SI_NO_FAST_LOAD` unset. The numpy path (`model/np_forward.py`)
    takes the same folders."""
    if device != "cpu" or query == "new" or sys.byteorder != "little":
        return None
    if os.environ.get("ST2SI_NO_FAST_LOAD"):
        return None
    cfg = _read_json(folder / "config.json")
    if not isinstance(cfg, dict) or cfg.get("model_type") != "llama":
        return None
    if (
        cfg.get("hidden_act", "silu") != "silu"
        or cfg.get("sliding_window")
        or cfg.get("pretraining_tp", 1) != 1
    ):
        return None
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        return None
    theta = _rope_theta(cfg)
    files = _safetensors_files(folder)
    if theta is None or files is None:
        return None
    tokenizer = FastTokenizer.from_folder(folder)
    if tokenizer is None:
        return None
    return PlainLlama(cfg, theta, files, tokenizer)


def load_fast(folder: Path, dtype: Any, device: str, query: str) -> tuple[Any, FastTokenizer] | None:
    """(PackedLlama, FastTokenizer) of a plain Llama folder on the CPU, or None (see the module)."""
    from st2si_cli.model.fast import PackedLlama

    plain = plain_llama(folder, device, query)
    if plain is None:
        return None
    cfg, theta, files, tokenizer = plain.cfg, plain.rope_theta, plain.files, plain.tokenizer
    weights: dict[str, Any] = {}
    try:
        for path in files:
            weights.update(mmap_safetensors(path))
    except KeyError:
        return None
    if any(k.startswith("model.") for k in weights):
        weights = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
    try:
        packed = PackedLlama.from_weights(cfg, weights, dtype, theta)
    except KeyError:  # a weight under another name: not the plain layout
        return None
    return packed, tokenizer


__all__ = [
    "FastTokenizer",
    "PlainLlama",
    "load_fast",
    "mmap_safetensors",
    "plain_llama",
    "read_safetensors_header",
]
