"""Triton kernels of the PS-LoRA sign-consistency loss (algorithm: ``slice_kernels/ops/sign_loss.py``).

Three kernels, all in float32 whatever the input dtype (the interpreter gets bf16 arithmetic wrong, and a GPU
kernel should accumulate in float32 anyway):

* forward: one program per row block; it walks the column blocks, forms ΔW = s·B·A and H tiles with
  ``tl.dot`` (or loads H / its bits), reduces the loss summand, and writes one partial sum (added on the
  host in a fixed order: deterministic);
* dB: one program per row block, dB_rows = s·Σ_cols G·Aᵀ (on the training path it also reduces the loss,
  so loss + gradients take two kernels);
* dA: one program per column block, dA_cols = s·Σ_rows Bᵀ·G.
G = ∂L/∂ΔW is recomputed from the tiles in each backward kernel instead of being stored (m×n).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow at either end.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1,
            KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, RHP: tl.constexpr, PREC: tl.constexpr):
    if KIND == 0:
        # H = Bh·Ah walked over the history rank R in chunks of RHP: R grows with every task (2r per task on
        # the slice+ps path), and one (BM, R) × (R, BN) dot would exceed registers and shared memory on a GPU
        # from R ≈ 300 on. The chunks of Bh are re-read per tile (BM×RHP floats, L2-resident).
        h = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, R, RHP):
            kh = k0 + tl.arange(0, RHP)
            km = kh < R
            bh = tl.load(H1 + rows[:, None] * R + kh[None, :], mask=rmask[:, None] & km[None, :],
                         other=0.0).to(tl.float32)
            ah = tl.load(H2 + kh[:, None] * n + cols[None, :], mask=km[:, None] & cmask[None, :], other=0.0)
            h += tl.dot(bh, ah.to(tl.float32), input_precision=PREC)
    elif KIND == 1:
        # 64-bit row offsets here only: the dense H (m·n) and its bits are the operands that can pass 2³¹
        h = tl.load(H1 + rows[:, None].to(tl.int64) * sh1 + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
    else:
        byte = tl.load(H1 + rows[:, None].to(tl.int64) * sh1 + (cols // 8)[None, :],
                       mask=rmask[:, None] & cmask[None, :], other=0).to(tl.int32)
        bit = (byte >> (cols % 8)[None, :]) & 1
        h = bit.to(tl.float32) * 2.0 - 1.0
    return h


@triton.jit
def _history_sign(h, alpha_l, KIND: tl.constexpr):
    """tanh(α·H) of the tanh mode; a bit history already holds sign(H) = ±1, used as is (SPEC §3)."""
    if KIND == 2:
        t = h
    else:
        t = _tanh(alpha_l * h)
    return t


@triton.jit
def _summand(d, h, alpha_l, inv_rms, KIND: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        t = _history_sign(h, alpha_l, KIND)
        f = 1.0 - _tanh(alpha_l * d) * t
    else:
        sg = tl.where(h > 0, 1.0, tl.where(h < 0, -1.0, 0.0))
        v = -sg * d
        f = tl.where(v > 0, v * inv_rms, 0.0)
    return f


@triton.jit
def _derivative(d, h, alpha_l, inv_rms, KIND: tl.constexpr, MODE: tl.constexpr):
    if MODE == 0:
        t = _history_sign(h, alpha_l, KIND)
        td = _tanh(alpha_l * d)
        g = -alpha_l * (1.0 - td * td) * t
    else:
        sg = tl.where(h > 0, 1.0, tl.where(h < 0, -1.0, 0.0))
        g = tl.where(-sg * d > 0, -sg * inv_rms, 0.0)
    return g


@triton.jit
def _fwd_kernel(A, B, H1, H2, partial, m, n, r, R, sh1, scaling, alpha_l, inv_rms,
                KIND: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                RP: tl.constexpr, RHP: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < m
    kr = tl.arange(0, RP)
    b = tl.load(B + rows[:, None] * r + kr[None, :], mask=rmask[:, None] & (kr[None, :] < r), other=0.0).to(tl.float32)
    acc = tl.zeros((BM, BN), tl.float32)
    for j0 in range(0, n, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < n
        a = tl.load(A + kr[:, None] * n + cols[None, :], mask=(kr[:, None] < r) & cmask[None, :], other=0.0)
        d = tl.dot(b, a.to(tl.float32), input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        f = _summand(d, h, alpha_l, inv_rms, KIND, MODE)
        acc += tl.where(rmask[:, None] & cmask[None, :], f, 0.0)
    tl.store(partial + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _dB_kernel(A, B, H1, H2, grad, dB, partial, m, n, r, R, sh1, scaling, alpha_l, inv_rms, inv_mn,
               KIND: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               RP: tl.constexpr, RHP: tl.constexpr, PREC: tl.constexpr, LOSS: tl.constexpr):
    # LOSS: also reduce the loss summand of this row block into partial[pid] (the one-pass training path)
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < m
    kr = tl.arange(0, RP)
    bmask = rmask[:, None] & (kr[None, :] < r)
    b = tl.load(B + rows[:, None] * r + kr[None, :], mask=bmask, other=0.0).to(tl.float32)
    gs = tl.load(grad).to(tl.float32) * inv_mn * scaling
    acc = tl.zeros((BM, RP), tl.float32)
    lacc = tl.zeros((BM, BN), tl.float32)
    for j0 in range(0, n, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < n
        a = tl.load(A + kr[:, None] * n + cols[None, :], mask=(kr[:, None] < r) & cmask[None, :], other=0.0).to(tl.float32)
        d = tl.dot(b, a, input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        valid = rmask[:, None] & cmask[None, :]
        if LOSS:
            lacc += tl.where(valid, _summand(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        g = tl.where(valid, _derivative(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        acc += tl.dot(g, tl.trans(a), input_precision=PREC)
    tl.store(dB + rows[:, None] * r + kr[None, :], acc * gs, mask=bmask)
    if LOSS:
        tl.store(partial + pid, tl.sum(tl.sum(lacc, axis=1), axis=0))


@triton.jit
def _dA_kernel(A, B, H1, H2, grad, dA, m, n, r, R, sh1, scaling, alpha_l, inv_rms, inv_mn,
               KIND: tl.constexpr, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               RP: tl.constexpr, RHP: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < n
    kr = tl.arange(0, RP)
    amask = (kr[:, None] < r) & cmask[None, :]
    a = tl.load(A + kr[:, None] * n + cols[None, :], mask=amask, other=0.0).to(tl.float32)
    gs = tl.load(grad).to(tl.float32) * inv_mn * scaling
    acc = tl.zeros((RP, BN), tl.float32)
    for i0 in range(0, m, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < m
        b = tl.load(B + rows[:, None] * r + kr[None, :], mask=rmask[:, None] & (kr[None, :] < r), other=0.0).to(tl.float32)
        d = tl.dot(b, a, input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        g = tl.where(rmask[:, None] & cmask[None, :], _derivative(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        acc += tl.dot(tl.trans(b), g, input_precision=PREC)
    tl.store(dA + kr[:, None] * n + cols[None, :], acc * gs, mask=amask)


# Warps of the backward kernels (dB, dA) on a GPU. Their fp32 dots lower to FMAs, and at the default 4 warps the
# sm_90 cubins spill 0.04–6.8 KB of stack per thread (cuobjdump, r = 64, triton 3.6 and 3.7.1); at 8 warps at
# most 0.65 KB. The forward kernel keeps 4: 8 warps did not reduce its spills consistently.
_BWD_WARPS = 8


def _pad(x: int) -> int:
    return max(16, triton.next_power_of_2(max(1, x)))


def _rank_chunk(R: int) -> int:
    """Width of the history-rank chunks of the factor form: 16 under the interpreter (so small tests walk
    several chunks), at most 64 on a GPU."""
    return 16 if dispatch.interpreting() else min(64, _pad(R))


def _max_gpu_rank(kind: int) -> int:
    """Largest padded rank RP the GPU kernels take. Their shared memory grows with the rank (the fp32 dots,
    lowered to FMAs, stage their operands there) against an H100's 232448 B per block, and a launch past it
    fails with "out of resources". Measured on sm_90 compiles (triton 3.6, tests/test_triton_compile.py):
    factors 196608 B at RP = 256, 327680 B at 512; a dense H, also staged, 245760 B (float32) at 256 and
    180224 B (float64) at 128; bits fit like factors."""
    return 128 if kind == 1 else 256


def fits_gpu(r: int, kind: int) -> bool:
    """Whether these kernels take rank ``r`` with history form ``kind`` (always, under the interpreter)."""
    return dispatch.interpreting() or _pad(r) <= _max_gpu_rank(kind)


def _prep(A, B, H1, H2, kind):
    r = B.shape[1]
    if not fits_gpu(r, kind):
        form = {0: "factor", 1: "dense", 2: "bit"}[kind]
        raise ValueError(f"sign loss, triton backend: rank r={r} with a {form} history needs more shared memory "
                         f"than a GPU block has (at most r={_max_gpu_rank(kind)}); use the cuda backend (the "
                         f"default on CUDA tensors when slice_kernels._C is built) or SLICE_KERNELS_BACKEND=torch")
    A, B = A.float().contiguous(), B.float().contiguous()
    if kind == 0:
        H1, H2 = H1.float().contiguous(), H2.float().contiguous()
        R = H1.shape[1]
    else:
        H1 = H1.contiguous()  # bits, or the dense H in its own dtype: the kernel upcasts each tile on load
        H2 = H1  # unused pointer
        R = 1
    blocks = (32, 32) if dispatch.interpreting() else (64, 64)
    return A, B, H1, H2, R, blocks


def sign_loss_fwd_triton(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    out_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A_, B_, H1, H2, R, (BM, BN) = _prep(A, B, H1, H2, kind)
    m, r = B_.shape
    n = A_.shape[1]
    grid = (triton.cdiv(m, BM),)
    partial = torch.empty(grid[0], dtype=torch.float32, device=A.device)
    _fwd_kernel[grid](A_, B_, H1, H2, partial, m, n, r, R, H1.stride(0), float(scaling), float(alpha_l),
                      float(inv_rms), KIND=kind, MODE=mode, BM=BM, BN=BN, RP=_pad(r), RHP=_rank_chunk(R), PREC="ieee")
    return (partial.double().sum() / (m * n)).to(out_dtype)


def sign_loss_bwd_triton(grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    A_, B_, H1, H2, R, (BM, BN) = _prep(A, B, H1, H2, kind)
    m, r = B_.shape
    n = A_.shape[1]
    g = grad.float().reshape(1).contiguous()
    dA = torch.empty_like(A_)
    dB = torch.empty_like(B_)
    common = dict(KIND=kind, MODE=mode, BM=BM, BN=BN, RP=_pad(r), RHP=_rank_chunk(R), PREC="ieee")
    args = (m, n, r, R, H1.stride(0), float(scaling), float(alpha_l), float(inv_rms), 1.0 / (m * n))
    _dB_kernel[(triton.cdiv(m, BM),)](A_, B_, H1, H2, g, dB, dB, *args, LOSS=False, num_warps=_BWD_WARPS, **common)
    _dA_kernel[(triton.cdiv(n, BN),)](A_, B_, H1, H2, g, dA, *args, num_warps=_BWD_WARPS, **common)
    return dA.to(A.dtype), dB.to(B.dtype)


def sign_loss_fwd_bwd_triton(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    """The training path: the dB kernel also reduces the loss, so loss + gradients take two kernels, not three."""
    out_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    A_, B_, H1, H2, R, (BM, BN) = _prep(A, B, H1, H2, kind)
    m, r = B_.shape
    n = A_.shape[1]
    g = torch.ones(1, dtype=torch.float32, device=A.device)
    dA = torch.empty_like(A_)
    dB = torch.empty_like(B_)
    partial = torch.empty(triton.cdiv(m, BM), dtype=torch.float32, device=A.device)
    common = dict(KIND=kind, MODE=mode, BM=BM, BN=BN, RP=_pad(r), RHP=_rank_chunk(R), PREC="ieee")
    args = (m, n, r, R, H1.stride(0), float(scaling), float(alpha_l), float(inv_rms), 1.0 / (m * n))
    _dB_kernel[(triton.cdiv(m, BM),)](A_, B_, H1, H2, g, dB, partial, *args, LOSS=True, num_warps=_BWD_WARPS, **common)
    _dA_kernel[(triton.cdiv(n, BN),)](A_, B_, H1, H2, g, dA, *args, num_warps=_BWD_WARPS, **common)
    loss = (partial.double().sum() / (m * n)).to(out_dtype)
    return loss, dA.to(A.dtype), dB.to(B.dtype)
