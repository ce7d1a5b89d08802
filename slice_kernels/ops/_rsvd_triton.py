"""Triton kernel of the randomized SVD's floored, shifted batched Cholesky (``rsvd.py`` registers it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


@triton.jit
def _cholesky_floored_kernel(gram, work, R, floored, q, rel_shift, rel_floor, QP: tl.constexpr, BI: tl.constexpr):
    # One program per matrix, the algorithm of csrc/cpu/rsvd.cpp. The Schur complement lives in `work`
    # (global scratch), updated BI rows at a time, so registers hold BI×QP values whatever q is (q = 256
    # at r = 64); debug_barrier orders the program's own stores before the next column reads them.
    b = tl.program_id(0).to(tl.int64)
    base = b * q * q
    offs = tl.arange(0, QP)
    cm = offs < q
    diag = tl.load(gram + base + offs * q + offs, mask=cm, other=0.0)
    shift = rel_shift * tl.sum(diag, 0)
    top = tl.max(diag, 0) + shift
    floor = tl.where(top > 0.0, rel_floor * top, 1.0)  # Y = 0: R = I, Q = 0
    for i0 in range(0, q, BI):  # work = gram + shift·I
        ii = i0 + tl.arange(0, BI)
        m2 = (ii[:, None] < q) & cm[None, :]
        tile = tl.load(gram + base + ii[:, None] * q + offs[None, :], mask=m2, other=0.0)
        tile += tl.where(ii[:, None] == offs[None, :], shift, 0.0)
        tl.store(work + base + ii[:, None] * q + offs[None, :], tile, mask=m2)
    tl.debug_barrier()
    n_floor = tl.sum(tl.zeros([QP], dtype=tl.int32), 0)
    for j in range(0, q):
        rowj = tl.load(work + base + j * q + offs, mask=cm, other=0.0)
        d = tl.sum(tl.where(offs == j, rowj, 0.0), 0)
        low = (d <= floor) | (d != d)  # d != d: NaN
        n_floor += low.to(tl.int32)
        r = tl.sqrt(tl.where(low, floor, d))
        # a floored row is noise: kept out of R (see csrc/cpu/rsvd.cpp), the column stands alone
        rr = tl.where((offs > j) & cm, rowj / r, 0.0)
        rr = tl.where(low, 0.0, rr)
        tl.store(R + base + j * q + offs, tl.where(offs == j, r, rr), mask=cm)
        for i0 in range(j + 1, q, BI):
            ii = i0 + tl.arange(0, BI)
            im = ii < q
            rri = tl.load(work + base + j * q + ii, mask=im, other=0.0) / r
            m2 = im[:, None] & cm[None, :]
            ptr = work + base + ii[:, None] * q + offs[None, :]
            tile = tl.load(ptr, mask=m2, other=0.0)
            tl.store(ptr, tile - rri[:, None] * rr[None, :], mask=m2)
        tl.debug_barrier()
    tl.store(floored + b, n_floor)


def cholesky_shifted(gram: torch.Tensor, rel_shift: float, rel_floor: float):
    b, q, _ = gram.shape
    R = torch.zeros_like(gram)
    work = torch.empty_like(gram)
    floored = torch.empty(b, dtype=torch.int32, device=gram.device)
    qp = max(32, triton.next_power_of_2(q))
    bi = 32 if dispatch.interpreting() else max(1, min(32, 4096 // qp))
    _cholesky_floored_kernel[(b,)](gram, work, R, floored, q, float(rel_shift), float(rel_floor), QP=qp, BI=bi)
    return R, floored
