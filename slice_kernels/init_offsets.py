"""Init offsets of LoRA layers: the initial product s₀·B₀·A₀ that a data-driven init (SLICE, LoRA-GA, LoRAM)
absorbed into the base weight, so that W_absorbed + s·B·A equals the original W at initialization.

Such an adapter changes the model by s·B·A − s₀·B₀·A₀, not by s·B·A, and everything that reasons about the task
update (PS-LoRA's history and stability loss) needs B₀, A₀ and s₀. The init writes them here once
(``attach_init_offset``); readers ask ``init_offset(layer, adapter)`` or ``init_offsets(model)``.

Storage: two non-persistent buffers on the PEFT LoRA layer, so they follow ``.to(device)``/``.to(dtype)`` and
DDP/torch.compile wrappers like the adapter weights, but never enter ``state_dict()`` and so never PEFT's
``save_pretrained`` adapter file (which must hold the plain adapter, for PEFT's own loading and conversion).
The absorb's scaling s₀ is a Python float kept beside them. The offsets live in the process only: a model
reloaded from disk has none (pass them explicitly, e.g. ``ParameterStabilityLoss(init_offsets=...)``).

This module sits at the top of the package because two methods use it: ``slice_init`` writes, ``ps_lora`` reads.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InvalidArgumentError, SliceInitError
from .modules import canonical_name, lora_layers

# instance attribute (not a buffer, not in state_dict): {adapter: (B buffer name, A buffer name, s₀)}
_REGISTRY = "_slice_init_offsets"
_COUNTER = "_slice_init_offsets_count"


def _buffer_names(layer: nn.Module, adapter: str) -> tuple[str, str]:
    # buffer names cannot contain '.', adapter names may ("a.b" and "a_b" would collide): a per-layer counter
    # that only grows keeps every pair of names distinct
    index = layer.__dict__.get(_COUNTER, 0)
    layer.__dict__[_COUNTER] = index + 1
    safe = adapter.replace(".", "_")
    return f"slice_init_B0_{index}_{safe}", f"slice_init_A0_{index}_{safe}"


def attach_init_offset(layer: nn.Module, adapter: str, B0: torch.Tensor, A0: torch.Tensor, scaling: float) -> None:
    """Record that ``scaling``·B0·A0 was absorbed into ``layer``'s base weight for ``adapter`` (B0 m×r, A0 r×n,
    (out, in) orientation, as PEFT's lora_B / lora_A weights). Replaces an earlier record of that adapter."""
    lora_A = getattr(layer, "lora_A", None)
    if not isinstance(lora_A, nn.ModuleDict) or adapter not in lora_A:
        raise SliceInitError(f"attach_init_offset: {type(layer).__name__} has no LoRA adapter named {adapter!r}")
    if B0.dim() != 2 or A0.dim() != 2 or B0.shape[1] != A0.shape[0]:
        raise SliceInitError(
            f"attach_init_offset: B0 {tuple(B0.shape)} and A0 {tuple(A0.shape)} are not m×r and r×n factors"
        )
    detach_init_offset(layer, adapter)
    registry = layer.__dict__.setdefault(_REGISTRY, {})
    b_name, a_name = _buffer_names(layer, adapter)
    layer.register_buffer(b_name, B0.detach().clone(), persistent=False)
    layer.register_buffer(a_name, A0.detach().clone(), persistent=False)
    registry[adapter] = (b_name, a_name, float(scaling))


def detach_init_offset(layer: nn.Module, adapter: str) -> None:
    """Forget ``adapter``'s offset on ``layer`` (no-op when there is none)."""
    registry = layer.__dict__.get(_REGISTRY, {})
    entry = registry.pop(adapter, None)
    if entry is not None:
        for name in entry[:2]:
            layer._buffers.pop(name, None)


def init_offset(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(B₀, A₀, s₀) absorbed into ``layer``'s base weight for ``adapter``, or None (vanilla LoRA: no offset)."""
    entry = layer.__dict__.get(_REGISTRY, {}).get(adapter)
    if entry is None:
        return None
    b_name, a_name, s0 = entry
    return layer._buffers[b_name], layer._buffers[a_name], s0


def init_offsets(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{canonical layer name: (B₀, A₀, s₀)} for every active LoRA layer of ``model`` that carries an offset;
    names without DDP/torch.compile wrapper prefixes (``modules.canonical_name``)."""
    out = {}
    for name, mod, ad in lora_layers(model):
        off = init_offset(mod, ad)
        if off is not None:
            out[canonical_name(name)] = off
    return out


def effective_factors(B: torch.Tensor, A: torch.Tensor, offset=None, scaling: float | None = None):
    """Factors of the update an adapter makes to W, in the adapter's own scaling s: (B, A) with no offset, else
    ([B, −(s₀/s)·B₀], [A; A₀]), so that s·B_eff·A_eff = s·B·A − s₀·B₀·A₀ (rank 2r, no m×n tensor).

    ``offset`` is (B₀, A₀) (taken at s₀ = s) or (B₀, A₀, s₀); ``scaling`` is the adapter's current s (needed only
    when s₀ is given and differs, e.g. after PEFT's ``set_scale``)."""
    if offset is None:
        return B, A
    if len(offset) == 3:
        B0, A0, s0 = offset
    elif len(offset) == 2:
        (B0, A0), s0 = offset, None
    else:
        raise InvalidArgumentError(f"an init offset is (B0, A0) or (B0, A0, s0), got a sequence of {len(offset)}")
    if (
        B0.dim() != 2
        or A0.dim() != 2
        or B0.shape[0] != B.shape[0]
        or A0.shape[1] != A.shape[1]
        or (B0.shape[1] != A0.shape[0])
    ):
        raise InvalidArgumentError(
            f"init offset B0 {tuple(B0.shape)}, A0 {tuple(A0.shape)} does not fit the adapter's B {tuple(B.shape)}, "
            f"A {tuple(A.shape)}: it was recorded for another layer or model"
        )
    B0 = B0.to(B)
    if s0 is not None and scaling is not None and float(s0) != float(scaling):
        if float(scaling) == 0.0:
            raise InvalidArgumentError(
                "effective_factors: the adapter's scaling is 0 but its init offset was absorbed at "
                f"s0={s0}; the update s·BA − s0·B0A0 has no factor form in the scaling 0"
            )
        B0 = B0 * (float(s0) / float(scaling))
    return torch.cat([B, -B0], dim=1), torch.cat([A, A0.to(A)], dim=0)
