"""Conflict statistics and gradient surgery (SPEC §1 steps 3–4) over many layers at once.

``conflict_stats(cur, prev)`` → float64 tensor (L, 3) of per-layer [D_ℓ, N_p,ℓ, N_c,ℓ] with
D_ℓ = ⟨G_cur,ℓ, G_prev,ℓ⟩, N_p,ℓ = ‖G_prev,ℓ‖², N_c,ℓ = ‖G_cur,ℓ‖². ``prev=None`` gives D = N_p = 0.
The global figures are the column sums; per-module surgery uses the rows.

``surgery_(cur, prev, gammas)`` → in place: G_cur,ℓ += γ_ℓ · G_prev,ℓ.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import dispatch

# Elements per float64 chunk in the reference: bounds its temporary memory to 2 × 32 MiB whatever the layer.
_CHUNK = 1 << 22


def _check_pairs(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> None:
    if prev is None:
        return
    if len(cur) != len(prev):
        raise ValueError(f"conflict ops need as many replay tensors as current ones ({len(prev)} vs {len(cur)})")
    for i, (c, p) in enumerate(zip(cur, prev)):
        if c.shape != p.shape:
            raise ValueError(f"tensor {i}: current gradient shape {tuple(c.shape)} != replay {tuple(p.shape)}")


@dispatch.register("conflict_stats", "torch")
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


@dispatch.register("surgery", "torch")
def surgery_torch(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    g = gammas.detach().to("cpu", torch.float64).tolist()
    for c, p, gamma in zip(cur, prev, g):
        if gamma != 0.0:
            c.add_(p, alpha=gamma)


def conflict_stats(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-layer [D, N_p, N_c] in float64, shape (L, 3), on the device of ``cur``."""
    if len(cur) == 0:
        raise ValueError("conflict_stats needs at least one layer")
    _check_pairs(cur, prev)
    return dispatch.call("conflict_stats", cur[0].device, list(cur), None if prev is None else list(prev))


def surgery_(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas) -> None:
    """In place: ``cur[ℓ] += gammas[ℓ] * prev[ℓ]`` for every layer (one γ per layer, float64)."""
    _check_pairs(cur, prev)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    if gammas.numel() != len(cur):
        raise ValueError(f"surgery_ needs one gamma per layer ({gammas.numel()} for {len(cur)} layers)")
    if len(cur) == 0 or not bool((gammas != 0).any()):
        return
    dispatch.call("surgery", cur[0].device, list(cur), list(prev), gammas)
