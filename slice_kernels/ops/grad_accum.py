"""Gradient accumulation for collection (SPEC §1 steps 1–2): ``acc += alpha · grad`` with a float32
accumulator whatever the gradient's dtype, called from a post-accumulate-grad hook so the parameter's
``.grad`` can be released at once.
"""
from __future__ import annotations

import torch

from .. import dispatch


@dispatch.register("grad_accumulate", "torch")
def grad_accumulate_torch(acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
    acc.add_(grad.to(acc.dtype), alpha=alpha)


def accumulate_(acc: torch.Tensor, grad: torch.Tensor, alpha: float = 1.0) -> None:
    """In place: ``acc += alpha * grad`` (acc float32 on grad's device, same shape)."""
    if acc.dtype != torch.float32:
        raise ValueError(f"gradient accumulators are float32, got {acc.dtype}")
    if acc.shape != grad.shape:
        raise ValueError(f"accumulator shape {tuple(acc.shape)} != gradient shape {tuple(grad.shape)}")
    if acc.device != grad.device:
        raise ValueError(f"accumulator on {acc.device} but gradient on {grad.device}; offload after accumulating")
    dispatch.call("grad_accumulate", grad.device, acc, grad, float(alpha))
