"""What moves in `pretrain`, and how: residual dropout, LoRA on the tuned layers, a learning rate of
the ILP's own.

Three of the differences between the authors' full tuning and ours (issue: tuning must help):

- **Dropout** (`--dropout P`). The authors tune OPT-125m, which drops 10% of every attention and MLP
  output before the residual add, in train mode. Llama (SmolLM2) has no dropout. `add_dropout` puts
  OPT's placement on any decoder: a forward hook on each tuned layer's attention output projection and
  MLP output projection, `F.dropout(out, P, module.training)`. Hooks are not weights: nothing is stored
  differently, and in eval mode (validation, the activation cache, every later use) they do nothing.
- **LoRA** (`--lora R`, with `peft`): every linear layer of the tuned layers gets a rank-R update
  `W + (alpha/R) B A` (B starts at 0, so step 0 is the frozen model); only A, B and the ILP train.
  `merge_lora` folds B A into W in a state dict, so the stored backbone is a plain one: `adapt`,
  `eval` and `recommend` read it as any other.
- **The ILP's learning rate** (`--head-lr`): random item rows want a larger step than pretrained
  layers; `param_groups` gives the ILP its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from st2si_cli.errors import St2siError
from st2si_cli.model.layers import decoder_stack

# (attention output, MLP output) projections, relative to a decoder layer: Llama/Qwen/Gemma, OPT
_OUTPUTS = (("self_attn.o_proj", "mlp.down_proj"), ("self_attn.out_proj", "fc2"))
LORA_ALPHA_PER_RANK = 2  # alpha = 2 R (TALLRec's r 8 / alpha 16): the update's scale is 2


def _output_projections(layer: nn.Module) -> list[nn.Module]:
    for names in _OUTPUTS:
        try:
            return [layer.get_submodule(n) for n in names]
        except AttributeError:
            continue
    raise St2siError(
        f"--dropout does not know where {type(layer).__name__}'s attention and MLP outputs are "
        f"(looked for {', '.join(' and '.join(n) for n in _OUTPUTS)})"
    )


def add_dropout(backbone: nn.Module, p: float, first_layer: int = 0) -> list[Any]:
    """Dropout p on the attention and MLP outputs of layers first_layer.. (before the residual add);
    returns the hook handles."""
    if p <= 0:
        return []

    def drop(module: nn.Module, _args: Any, out: Tensor) -> Tensor:
        return nn.functional.dropout(out, p, module.training)

    layers = decoder_stack(backbone)[2]
    return [
        m.register_forward_hook(drop) for layer in layers[first_layer:] for m in _output_projections(layer)
    ]


def lora_targets(backbone: nn.Module, first_layer: int = 0) -> list[str]:
    """Full names (in `backbone`) of every nn.Linear inside layers first_layer.."""
    parent, attr, layers = decoder_stack(backbone)
    prefix = next(n for n, m in backbone.named_modules() if m is layers)
    out = []
    for i in range(first_layer, len(layers)):
        for name, mod in layers[i].named_modules():
            if isinstance(mod, nn.Linear):
                out.append(f"{prefix}.{i}.{name}")
    return out


def add_lora(backbone: nn.Module, rank: int, first_layer: int = 0) -> None:
    """LoRA of rank `rank` on every linear layer of layers first_layer.. (in place); every other backbone
    weight stops training."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # pragma: no cover - peft is a dependency
        raise St2siError("--lora needs the peft package: pip install 'st2si[lora]'") from e
    targets = lora_targets(backbone, first_layer)
    if not targets:
        raise St2siError("--lora: no linear layer to adapt in the tuned layers")
    config = LoraConfig(
        r=rank, lora_alpha=LORA_ALPHA_PER_RANK * rank, lora_dropout=0.0, target_modules=targets
    )
    inject_adapter_in_model(config, backbone)
    for name, param in backbone.named_parameters():
        param.requires_grad_(".lora_" in name)


def merge_lora(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with LoRA (peft's names: X.base_layer.weight, X.lora_A.default.weight, ...) as the
    plain one it stands for: X.weight = W + (alpha/R) B A, LoRA entries gone. Unchanged without LoRA."""
    scale = LORA_ALPHA_PER_RANK  # alpha / R
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            stem, _, leaf = key.rpartition(".base_layer.")
            if leaf == "weight":
                a = state[f"{stem}.lora_A.default.weight"].float()
                b = state[f"{stem}.lora_B.default.weight"].float()
                value = (value.float() + scale * (b @ a)).to(value.dtype)
            key = f"{stem}.{leaf}"
        out[key] = value
    return out


def param_groups(module: nn.Module, lr: float, head_lr: float | None) -> list[dict[str, Any]]:
    """The trainable parameters as AdamW groups: the ILP at `head_lr` (when given), the rest at `lr`."""
    ilp = getattr(module, "ilp", None)
    head = [p for p in (ilp.parameters() if ilp is not None else ()) if p.requires_grad]
    ids = {id(p) for p in head}
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids]
    if head_lr is None:
        return [{"params": rest + head, "lr": lr}]
    return [g for g in ({"params": rest, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def trainable_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = ["add_dropout", "add_lora", "lora_targets", "merge_lora", "param_groups", "trainable_count"]
