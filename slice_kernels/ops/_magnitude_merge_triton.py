"""Triton kernel of the PS-LoRA magnitude merge from factors (algorithm: ``magnitude_merge.py``).

One program per output tile: for each task k it forms s_k·B_k·A_k on the tile with ``tl.dot`` (the rank
padded to the largest task's, the unused columns masked), keeps the entry of strictly larger magnitude (ties
to the earliest task), then writes or adds the tile into ``out``. Arithmetic in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


@triton.jit
def _merge_kernel(
    B, A, offs, scal, out, m, n, Rt, K, ldo, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < m
    cmask = cols < n
    kr = tl.arange(0, RP)
    best = tl.zeros((BM, BN), tl.float32)
    best_abs = tl.full((BM, BN), -1.0, tl.float32)  # below any |·|: the first task always takes the tile
    for k in range(0, K):
        o0 = tl.load(offs + k)
        o1 = tl.load(offs + k + 1)
        s = tl.load(scal + k)
        kmask = kr < (o1 - o0)
        b = tl.load(B + rows[:, None] * Rt + (o0 + kr)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        a = tl.load(A + (o0 + kr)[:, None] * n + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0)
        cur = tl.dot(b.to(tl.float32), a.to(tl.float32), input_precision="ieee") * s
        take = tl.abs(cur) > best_abs
        best = tl.where(take, cur, best)
        best_abs = tl.where(take, tl.abs(cur), best_abs)
    # 64-bit row offsets: m·ldo passes 2³¹ for a 524288×4096 output (int32 would wrap to a negative address)
    ptr = out + rows[:, None].to(tl.int64) * ldo + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    if ACC:
        best += tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, best.to(out.dtype.element_ty), mask=mask)


def merge_factors_triton(B, A, offsets, scalings, out, accumulate):
    Bf, Af = B.float().contiguous(), A.float().contiguous()
    m, Rt = Bf.shape
    n = Af.shape[1]
    widths = [offsets[k + 1] - offsets[k] for k in range(len(scalings))]
    RP = max(16, triton.next_power_of_2(max(widths)))
    offs = torch.tensor(offsets, dtype=torch.int32, device=B.device)
    scal = torch.tensor(scalings, dtype=torch.float32, device=B.device)
    BM, BN = (32, 32) if dispatch.interpreting() else (64, 64)
    grid = (triton.cdiv(m, BM), triton.cdiv(n, BN))
    _merge_kernel[grid](
        Bf, Af, offs, scal, out, m, n, Rt, len(scalings), out.stride(0), ACC=bool(accumulate), BM=BM, BN=BN, RP=RP
    )
