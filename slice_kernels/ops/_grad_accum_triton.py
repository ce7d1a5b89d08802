"""Triton kernel of the gradient accumulation ``acc += alpha · grad`` (``grad_accum.py`` registers it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


@triton.jit
def _axpy_kernel(acc, grad, n, alpha, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # 64-bit offsets: MLP weights of large models pass 2³¹ elements
    o = pid * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    g = tl.load(grad + o, mask=m, other=0.0).to(tl.float32)
    a = tl.load(acc + o, mask=m, other=0.0)
    tl.store(acc + o, a + alpha * g, mask=m)


def accumulate_(acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
    """``acc`` float32 contiguous; ``grad`` any float dtype, contiguous, same number of elements."""
    n = acc.numel()
    block = 64 if dispatch.interpreting() else 4096
    _axpy_kernel[(triton.cdiv(n, block),)](acc, grad, n, float(alpha), BLOCK=block)
