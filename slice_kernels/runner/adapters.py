"""Find target linears, install a PEFT LoRA adapter with given factors, and move weights in (out, in)."""
from __future__ import annotations

import torch
from torch import nn


def _is_conv1d(mod) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")  # transformers' GPT-2 Conv1D stores Wᵀ


def target_modules(model: nn.Module, suffixes) -> dict[str, nn.Module]:
    """Linear (or Conv1D) modules whose name ends with one of ``suffixes`` (PEFT's matching rule)."""
    out = {}
    for name, mod in model.named_modules():
        if not (isinstance(mod, nn.Linear) or _is_conv1d(mod)):
            continue
        if any(name == s or name.endswith("." + s) for s in suffixes):
            out[name] = mod
    if not out:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)})
        raise ValueError(
            f"no linear layer of the model matches the target modules {list(suffixes)}; this model's linear "
            f"layer names are {linears}: pass some of them (e.g. --targets {','.join(linears[:2])})"
        )
    return out


def target_weights(model: nn.Module, suffixes) -> dict[str, torch.Tensor]:
    """Weights in (out, in) orientation (views for nn.Linear, transposed views for Conv1D)."""
    return {n: (m.weight.T if _is_conv1d(m) else m.weight) for n, m in target_modules(model, suffixes).items()}


def install_lora(model: nn.Module, lora, A: dict, B: dict, weights: dict):
    """Wrap ``model`` with PEFT LoRA on the target modules and set A, B and the (absorbed) base weights."""
    from peft import LoraConfig, get_peft_model

    mods = target_modules(model, lora.target_modules)
    conv = any(_is_conv1d(m) for m in mods.values())
    cfg = LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, use_rslora=lora.use_rslora, target_modules=list(mods),
        lora_dropout=0.0, fan_in_fan_out=conv, bias="none",
    )
    with torch.random.fork_rng(devices=[]):  # PEFT's own init draws from the global RNG; we overwrite it
        peft_model = get_peft_model(model, cfg)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name in mods:
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A[name])
            layer.lora_B["default"].weight.copy_(B[name])
            base = layer.get_base_layer()
            base.weight.copy_(weights[name].T if _is_conv1d(base) else weights[name])
    return peft_model
