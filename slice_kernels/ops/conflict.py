"""Conflict statistics and gradient surgery (SPEC §1 steps 3–4) over many layers at once.

``conflict_stats(cur, prev)`` → float64 tensor (L, 3) of per-layer [D_ℓ, N_p,ℓ, N_c,ℓ] with
D_ℓ = ⟨G_cur,ℓ, G_prev,ℓ⟩, N_p,ℓ = ‖G_prev,ℓ‖², N_c,ℓ = ‖G_cur,ℓ‖². ``prev=None`` gives D = N_p = 0.
The global figures are the column sums; per-module surgery uses the rows.

``surgery_(cur, prev, gammas)`` → in place: G_cur,ℓ += γ_ℓ · G_prev,ℓ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import dispatch, extension
from ..errors import InvalidArgumentError

try:  # Triton is optional: the package imports (and the other backends run) without it
    from . import _conflict_triton as _tri
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _tri = None

CONFLICT_STATS = dispatch.define("conflict_stats")
SURGERY = dispatch.define("surgery")

# Elements per float64 chunk in the reference: bounds its temporary memory to 2 × 32 MiB whatever the layer.
_CHUNK = 1 << 22


def _check_pairs(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> None:
    # One device for every tensor: the fused kernels take raw addresses from one table in one launch, so a
    # tensor on another device would be read through a foreign pointer (illegal address, or garbage).
    dev = cur[0].device if len(cur) else None
    for what, ts in (("current", cur), ("replay", prev or [])):
        for i, t in enumerate(ts):
            if t.device != dev:
                raise InvalidArgumentError(
                    f"conflict ops: {what} gradient {i} is on {t.device} but current gradient 0 is on "
                    f"{dev}; move every gradient to one device first (e.g. .to('{dev}'))"
                )
    if prev is None:
        return
    if len(cur) != len(prev):
        raise InvalidArgumentError(
            f"conflict ops need as many replay tensors as current ones ({len(prev)} vs {len(cur)})"
        )
    for i, (c, p) in enumerate(zip(cur, prev)):
        if c.shape != p.shape:
            raise InvalidArgumentError(
                f"tensor {i}: current gradient shape {tuple(c.shape)} != replay {tuple(p.shape)}"
            )


@CONFLICT_STATS.register("torch")
def conflict_stats_torch(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
    out = torch.zeros(len(cur), 3, dtype=torch.float64, device=cur[0].device)
    for i, c in enumerate(cur):
        cf = c.reshape(-1)
        pf = prev[i].reshape(-1) if prev is not None else None
        for s in range(0, cf.numel(), _CHUNK):
            c64 = cf[s : s + _CHUNK].double()
            out[i, 2] += torch.dot(c64, c64)
            if pf is not None:
                p64 = pf[s : s + _CHUNK].double()
                out[i, 0] += torch.dot(c64, p64)
                out[i, 1] += torch.dot(p64, p64)
    return out


@SURGERY.register("torch")
def surgery_torch(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    g = gammas.detach().to("cpu", torch.float64).tolist()
    for c, p, gamma in zip(cur, prev, g):
        if gamma != 0.0:
            c.add_(p, alpha=gamma)


def _as_f32(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # Gradients are float32 contiguous accumulators (SPEC §1); anything else is converted once here.
    return [t if (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous() for t in ts]


def _f32_work(cur: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, torch.Tensor]]]:
    """Buffers the fused kernels can update in place, and the (index, tensor) pairs to copy back: a
    non-float32 or non-contiguous gradient is updated through a float32 copy."""
    work, back = [], []
    for i, c in enumerate(cur):
        if c.dtype == torch.float32 and c.is_contiguous():
            work.append(c)
        else:
            work.append(c.float().contiguous())
            back.append((i, c))
    return work, back


def _surgery_in_f32(cur, prev, gammas, kernel) -> None:
    work, back = _f32_work(cur)
    kernel(work, _as_f32(prev), gammas)
    for i, c in back:
        c.copy_(work[i])


if _tri is not None:

    @CONFLICT_STATS.register("triton")
    def conflict_stats_triton(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
        return _tri.conflict_stats(_as_f32(cur), _as_f32(prev) if prev is not None else None)

    @SURGERY.register("triton")
    def surgery_triton(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
        _surgery_in_f32(cur, prev, gammas.detach().to(torch.float64), _tri.surgery_)


@CONFLICT_STATS.register("cpp", native_op="conflict_stats")
@CONFLICT_STATS.register("cuda", native_op="conflict_stats")
def conflict_stats_native(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
    return extension.native("conflict_stats")(_as_f32(cur), _as_f32(prev) if prev is not None else [])


# cpp runs only when forced: measured slower than torch's float32 add_ on CPU (benches/RESULTS.md); it stays
# as the CPU mirror of the CUDA kernel.
@SURGERY.register("cpp", native_op="surgery_", auto=False)
@SURGERY.register("cuda", native_op="surgery_")
def surgery_native(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    _surgery_in_f32(cur, prev, gammas.detach().to("cpu", torch.float64).contiguous(), extension.native("surgery_"))


def _has_float64(*lists) -> bool:
    return any(t.dtype == torch.float64 for ts in lists if ts is not None for t in ts)


def conflict_stats(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-layer [D, N_p, N_c] in float64, shape (L, 3), on the device of ``cur``.

    The fused kernels load float32 (the accumulators' dtype); float64 inputs always go to the torch
    reference, whatever backend is selected, because a float64 caller is asking for float64 accuracy.
    """
    if len(cur) == 0:
        raise InvalidArgumentError("conflict_stats needs at least one layer")
    _check_pairs(cur, prev)
    prev = None if prev is None else list(prev)
    if _has_float64(cur, prev):
        return conflict_stats_torch(list(cur), prev)
    return CONFLICT_STATS(cur[0].device, list(cur), prev)


def surgery_(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas) -> None:
    """In place: ``cur[ℓ] += gammas[ℓ] * prev[ℓ]`` for every layer (one γ per layer, float64)."""
    _check_pairs(cur, prev)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    if gammas.numel() != len(cur):
        raise InvalidArgumentError(f"surgery_ needs one gamma per layer ({gammas.numel()} for {len(cur)} layers)")
    bad = (~torch.isfinite(gammas)).nonzero().flatten().tolist()
    if bad:  # a NaN/Inf γ would spread into every entry of the layer (NaN·0 is NaN), on every backend
        i = bad[0]
        raise InvalidArgumentError(
            f"surgery_: gammas[{i}] = {float(gammas[i])} is not finite ({len(bad)} non-finite of {len(cur)}); "
            f"nothing was modified. Pass finite gammas: γ = −c·D / (N_p + ε) is finite for finite gradients, so "
            f"check the gradients behind the conflict statistics (conflict_stats) and recompute γ"
        )
    if len(cur) == 0 or not bool((gammas != 0).any()):
        return
    if _has_float64(cur, prev):  # float64 stays float64 (see conflict_stats)
        return surgery_torch(list(cur), list(prev), gammas)
    SURGERY(cur[0].device, list(cur), list(prev), gammas)
