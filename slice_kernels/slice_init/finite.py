"""The NaN/Inf check of the gradients that the collection and the init refuse."""

from __future__ import annotations

import math

import torch


def all_finite(x: torch.Tensor) -> bool:
    """True when no entry of ``x`` is NaN or ±Inf. A NaN or an infinity makes the sum non-finite, so a finite
    sum proves it in one read-only pass; a non-finite sum (a real NaN/Inf, or finite entries whose sum
    overflows) is settled by the exact elementwise check. ``torch.isfinite(x).all()`` alone would first write
    an m×n boolean tensor (benches/RESULTS.md has the cost)."""
    if math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())
