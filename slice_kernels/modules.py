"""Model introspection shared by every method: which modules are linear maps, their weights in (out, in)
orientation, target resolution by PEFT's matching rules, and discovery of PEFT LoRA layers.

Orientation: transformers' ``Conv1D`` (GPT-2) stores Wᵀ, (in, out); everything in this package works on
(out, in) matrices, so ``weight_out_in`` hands out a transposed view for it.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .errors import SliceInitError
from .sharded_guard import dtensor_types

# PEFT's own LoRA sub-modules (lora_A, lora_B, lora_dropout, lora_embedding_*): never targets themselves.
_LORA_INTERNAL = re.compile(r"(^|\.)lora_[A-Za-z_]+(\.|$)")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing: no Conv1D layers can exist
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    c = _conv1d_type()
    return c is not None and isinstance(module, c)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' Conv1D: the layers the package adapts."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) orientation (a view; Conv1D stores (in, out))."""
    return module.weight.T if is_conv1d(module) else module.weight


# Path components that only wrappers insert, wherever they sit: torch.compile's OptimizedModule (also per block,
# as accelerate's regional compilation does), FSDP1's and activation checkpointing's wrappers.
_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


# what peft.PeftModel puts before the wrapped model's module names
PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A module name without what wrappers add: leading "module." (DDP/DataParallel; only leading, since a model
    may name a child "module") and the torch.compile / FSDP / checkpoint-wrapper components ("_orig_mod.") at any
    depth. A name from ``compile(DDP(model))``, ``DDP(compile(model))`` or the bare model is the same."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_PARTS]
    while parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def matches(pattern: str, name: str, *, regex: bool = True) -> bool:
    """PEFT's ``target_modules`` rule for one pattern: the whole name or a dotted suffix of it; with ``regex``
    also a regular expression matching the whole name (PEFT applies that to a target given as one string)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    if not regex:
        return False
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module cannot be a target, or None when it can (a dense floating-point Linear/Conv1D)."""
    kind = type(module).__name__
    if isinstance(module, nn.Embedding) or "Embedding" in kind:
        return f"{kind} is an embedding; SLICE initializes linear maps only (nn.Linear, transformers Conv1D)"
    if not is_linear(module):
        return f"{kind} is not nn.Linear or transformers Conv1D"
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return f"{kind} has no 2-D weight"
    if is_quantized(module):
        return quantized_reason(module)
    return None


def is_quantized(module: nn.Module) -> bool:
    """A quantized layer: bitsandbytes' marker ``quant_state`` on the module (PEFT's LoRA-GA check) or on its
    weight (``Params4bit``), a non-floating weight (int8), or a tensor subclass as weight (torchao, HQQ)."""
    w = getattr(module, "weight", None)
    if hasattr(module, "quant_state") or (w is not None and hasattr(w, "quant_state")):
        return True
    plain = (nn.Parameter, torch.Tensor, *dtensor_types())  # FSDP2's sharded weights are full-precision DTensors
    return isinstance(w, torch.Tensor) and (not w.is_floating_point() or type(w) not in plain)


def quantized_reason(module: nn.Module) -> str:
    w = getattr(module, "weight", None)
    return (
        f"{type(module).__name__} is quantized ({type(w).__name__}, {getattr(w, 'dtype', None)}): the init needs "
        f"full-precision gradients of W and writes W − s·B·A back, which a quantized weight can hold only "
        f"up to its rounding (the model would not equal the original at initialization). Initialize the "
        f"full-precision model instead (docs/peft_compat.md, 'Quantized models')"
    )


# module types PEFT's LoRA adapts but SLICE's init does not (PEFT's LoRA-GA gives them its ordinary init)
PEFT_ORDINARY_LORA = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _refuse_unsupported(found: Mapping[str, nn.Module], skip: bool = False) -> dict[str, nn.Module]:
    """``found`` without the modules that cannot be targets. A quantized layer is always an error (PEFT's LoRA-GA
    refuses it too); with ``skip`` the others (embeddings, Conv2d, ...) are dropped with a warning naming them, as
    PEFT's LoRA-GA skips what it cannot initialize, unless nothing remains."""
    quantized = [n for n, m in found.items() if is_quantized(m)]
    if quantized:
        raise SliceInitError(
            f"{len(quantized)} target layer(s) are quantized, e.g. {quantized[0]!r}: "
            f"{quantized_reason(found[quantized[0]])}. Quantized: {quantized[:5]}{'…' if len(quantized) > 5 else ''}"
        )
    bad = {n: why for n, why in ((n, unsupported_reason(m)) for n, m in found.items()) if why}
    # only layers PEFT itself wraps with an ordinary LoRA are skipped; any other module PEFT would refuse later,
    # in the middle of get_peft_model, so it stays an error here
    unskippable = [n for n in bad if not isinstance(found[n], PEFT_ORDINARY_LORA)]
    if skip and bad and len(bad) < len(found) and not unskippable:
        warnings.warn(
            f"skipping {len(bad)} module(s) matched by target_modules that SLICE cannot initialize: "
            + "; ".join(f"{n!r} ({bad[n]})" for n in list(bad)[:5])
            + ("…" if len(bad) > 5 else "")
            + ". PEFT still wraps them with its ordinary LoRA init (zero update at init, no offset); pass "
            "strict_targets=True to make this an error",
            stacklevel=3,
        )
        return {n: m for n, m in found.items() if n not in bad}
    if bad:
        first = next(iter(bad))
        raise SliceInitError(
            f"{len(bad)} target layer(s) cannot be initialized, e.g. {first!r}: {bad[first]}. Remove "
            f"{sorted(bad)[:5]}{'…' if len(bad) > 5 else ''} from target_modules"
            + (" (no supported layer remains)." if len(bad) == len(found) else ".")
        )
    return dict(found)


def _is_resolved(t) -> bool:
    return isinstance(t, Mapping) and all(isinstance(m, nn.Module) for m in t.values())


def _lora_config_targets(model: nn.Module, lora_config) -> dict[str, nn.Module]:
    # PEFT's own matcher, so "all-linear", exclude_modules, layers_to_transform and the per-architecture
    # default for target_modules=None select exactly the modules get_peft_model will wrap
    from peft.tuners.lora import LoraModel
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    cfg = copy.deepcopy(lora_config)
    if cfg.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = LoraModel.target_module_mapping.get(model_type)
        if default is None:
            raise SliceInitError(
                f"LoraConfig.target_modules is None and PEFT has no default targets for model type "
                f"{model_type!r}; set target_modules, e.g. ['q_proj', 'v_proj']"
            )
        cfg.target_modules = set(default)
    cfg = _maybe_include_all_linear_layers(cfg, model)
    found = {n: m for n, m in model.named_modules() if n and LoraModel._check_target_module_exists(cfg, n)}
    if not found:
        raise SliceInitError(
            f"LoraConfig.target_modules={lora_config.target_modules!r} matches no module of "
            f"{type(model).__name__}; list the names with model.named_modules()"
        )
    if isinstance(cfg.target_modules, (list, set, tuple)):
        missing = sorted(k for k in cfg.target_modules if not any(matches(k, n, regex=False) for n in found))
        if missing:
            raise SliceInitError(
                f"target module(s) {missing} match no module of {type(model).__name__} (others "
                f"matched); fix or drop them so every listed target gets an adapter"
            )
    return found


def resolve_targets(model: nn.Module, target_modules, *, skip_unsupported: bool = False) -> dict[str, nn.Module]:
    """Module name -> module, in the model's order, for ``target_modules``:

    * a list of names (each the whole module name or a dotted suffix, as PEFT matches a list);
    * a regex string (full match over the module name, as PEFT matches a string);
    * a ``peft.LoraConfig`` (PEFT's own rules: "all-linear", exclude_modules, layers_to_transform, and the
      per-architecture default when its target_modules is None);
    * a dict of modules keyed by name (returned as it is).

    Raises ``SliceInitError`` when nothing matches, when a listed name matches nothing, or when a matched
    layer cannot be adapted (embeddings, quantized, non-Linear/Conv1D). ``skip_unsupported``: drop matched
    layers that cannot be adapted (not quantized ones) with a warning, as PEFT's LoRA-GA does; an error still
    when none remains.
    """
    if _is_resolved(target_modules):
        return dict(target_modules)
    if hasattr(target_modules, "peft_type") and hasattr(target_modules, "target_modules"):
        found = _lora_config_targets(model, target_modules)
        return _refuse_unsupported(found, skip_unsupported)
    if target_modules is None or (not isinstance(target_modules, str) and len(list(target_modules)) == 0):
        raise SliceInitError("target_modules is empty: name the linear layers to initialize, e.g. ['q_proj', 'v_proj']")
    named = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    if isinstance(target_modules, str):
        found = {n: m for n, m in named.items() if n and re.fullmatch(target_modules, n)}
        if not found:
            raise SliceInitError(
                f"target_modules regex {target_modules!r} matches no module of "
                f"{type(model).__name__}; list the module names with model.named_modules()"
            )
    else:
        for key in list(target_modules):
            hits = {n: m for n, m in named.items() if matches(key, n, regex=False)}
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if is_linear(m)})
                raise SliceInitError(
                    f"target module {key!r} matches no module of {type(model).__name__}; its linear layers are "
                    f"named {leaves[:12]}: fix the name (the whole module name or a dotted suffix, e.g. "
                    f"{','.join(leaves[:2])}) or drop it"
                )
            found.update(hits)
    found = _refuse_unsupported(found, skip_unsupported)
    order = {n: i for i, n in enumerate(named)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[0]]))


def base_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{logical module name: linear module} for the model's own linears, PEFT's LoRA internals excluded; a
    layer wrapped by PEFT keeps its unwrapped name (``.base_layer`` removed)."""
    out = {}
    for name, mod in model.named_modules():
        if not is_linear(mod) or _LORA_INTERNAL.search(name):
            continue
        logical = name[: -len(".base_layer")] if name.endswith(".base_layer") else name
        out[logical] = mod
    return out


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    """(name, module, adapter) for every PEFT LoRA layer of ``model`` with an active adapter; the name is
    the one from ``model.named_modules()``."""
    for name, mod in model.named_modules():
        lora_A = getattr(mod, "lora_A", None)
        if not isinstance(lora_A, nn.ModuleDict):
            continue
        active = getattr(mod, "active_adapters", None) or [getattr(mod, "active_adapter", "default")]
        if isinstance(active, str):
            active = [active]
        for ad in active:
            if ad in lora_A:
                yield name, mod, ad


def lora_factors(mod: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B m×r, A r×n, scaling) of one PEFT LoRA layer in (out, in) orientation.

    PEFT stores lora_A as (r, in_features) and lora_B as (out_features, r) for every base layer, Conv1D
    included (``fan_in_fan_out`` only transposes B·A into Conv1D's storage), so B·A is already (out, in)."""
    return mod.lora_B[adapter].weight, mod.lora_A[adapter].weight, float(mod.scaling[adapter])
