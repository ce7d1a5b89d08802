"""Triton kernels of the PS-LoRA sign-consistency loss (algorithm: ``slice_kernels/ops/sign_loss.py``).

Three kernels, all in float32 whatever the input dtype (the interpreter gets bf16 arithmetic wrong, and a GPU
kernel should accumulate in float32 anyway):

* forward: one program per (row block, segment); it walks the segment's column tiles, forms ΔW = s·B·A and H
  tiles with ``tl.dot`` (or loads H / its bits), reduces the loss summand, and writes one partial sum (added on
  the host in float64 in a fixed order: deterministic);
* dB: one program per (row block, segment), dB_rows = s·Σ_cols G·Aᵀ over the segment's column tiles (on the
  training path it also reduces the loss, one partial per program, so loss + gradients take two kernels);
* dA: one program per (column block, segment), dA_cols = s·Σ_rows Bᵀ·G over the segment's row tiles.
G = ∂L/∂ΔW is recomputed from the tiles in each backward kernel instead of being stored (m×n).

Segments: with the primary blocks alone as the grid (64 programs at m = 4096) most of an H100's 132 SMs would
idle, so the walked tiles are split into S contiguous segments of whole tiles
(grid axis 1; ``_segments`` picks S for about 2 programs per SM, at least 4 tiles a segment, S = 1 when the
primary grid is already that large; the CUDA kernels split the same way). With S > 1, dB (dA) segments write
their own slice of a float32 (S, m, r) ((S, r, n)) workspace, added by a fixed-order ``.sum(0)``: no atomics,
O((m+n)·r·S) extra memory, never m×n; with S = 1 they write the gradient directly. Results change by float32
reassociation only. The launchers take ``segments=`` to force S (tests).

Tiles, history-rank chunks and warps come from the registers and spills of the sm_90 cubins (``_TILES``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .. import dispatch
from ..errors import InvalidArgumentError


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow at either end.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _h_tile(
    H1,
    H2,
    rows,
    cols,
    rmask,
    cmask,
    n,
    R,
    sh1,
    KIND: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RHP: tl.constexpr,
    PREC: tl.constexpr,
):
    if KIND == 0:
        # H = Bh·Ah walked over the history rank R in chunks of RHP: R grows with every task (2r per task on
        # the slice+ps path), and one (BM, R) × (R, BN) dot would exceed registers and shared memory on a GPU
        # from R ≈ 300 on. The chunks of Bh are re-read per tile (BM×RHP floats, L2-resident).
        h = tl.zeros((BM, BN), tl.float32)
        for k0 in range(0, R, RHP):
            kh = k0 + tl.arange(0, RHP)
            km = kh < R
            bh = tl.load(H1 + rows[:, None] * R + kh[None, :], mask=rmask[:, None] & km[None, :], other=0.0).to(
                tl.float32
            )
            ah = tl.load(H2 + kh[:, None] * n + cols[None, :], mask=km[:, None] & cmask[None, :], other=0.0)
            h += tl.dot(bh, ah.to(tl.float32), input_precision=PREC)
    elif KIND == 1:
        # 64-bit row offsets here only: the dense H (m·n) and its bits are the operands that can pass 2³¹
        h = tl.load(
            H1 + rows[:, None].to(tl.int64) * sh1 + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
    else:
        byte = tl.load(
            H1 + rows[:, None].to(tl.int64) * sh1 + (cols // 8)[None, :], mask=rmask[:, None] & cmask[None, :], other=0
        ).to(tl.int32)
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
def _segment(tiles, SEG):
    """[t0, t1): the tiles of this program's segment (program_id(1) of SEG), contiguous, sizes differing by at
    most one, none empty when SEG <= tiles (``_segments`` guarantees it); the CUDA kernels split the same way."""
    s = tl.program_id(1).to(tl.int64)  # s·tiles passes 2³¹ for a forced S in the thousands at 10⁶ tiles
    return (s * tiles // SEG).to(tl.int32), ((s + 1) * tiles // SEG).to(tl.int32)


@triton.jit
def _b_rows(B, rows, rmask, kr, r):
    """Rows ``rows`` of B (m×r, row-major), the rank padded to len(kr) with zeros, in float32."""
    return tl.load(B + rows[:, None] * r + kr[None, :], mask=rmask[:, None] & (kr[None, :] < r), other=0.0).to(
        tl.float32
    )


@triton.jit
def _a_cols(A, cols, cmask, kr, n, r):
    """Columns ``cols`` of A (r×n, row-major), the rank padded to len(kr) with zeros, in float32."""
    return tl.load(A + kr[:, None] * n + cols[None, :], mask=(kr[:, None] < r) & cmask[None, :], other=0.0).to(
        tl.float32
    )


@triton.jit
def _fwd_kernel(
    A,
    B,
    H1,
    H2,
    partial,
    m,
    n,
    r,
    R,
    sh1,
    scaling,
    alpha_l,
    inv_rms,
    SEG,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    RHP: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (row blocks, SEG): each program walks one segment of the column tiles; partial[row block·SEG + segment]
    pid = tl.program_id(0)
    t0, t1 = _segment(tl.cdiv(n, BN), SEG)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < m
    kr = tl.arange(0, RP)
    b = _b_rows(B, rows, rmask, kr, r)
    acc = tl.zeros((BM, BN), tl.float32)
    for j0 in range(t0 * BN, t1 * BN, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < n
        a = _a_cols(A, cols, cmask, kr, n, r)
        d = tl.dot(b, a, input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        f = _summand(d, h, alpha_l, inv_rms, KIND, MODE)
        acc += tl.where(rmask[:, None] & cmask[None, :], f, 0.0)
    tl.store(partial + pid * SEG + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _dB_kernel(
    A,
    B,
    H1,
    H2,
    grad,
    dB,
    partial,
    m,
    n,
    r,
    R,
    sh1,
    scaling,
    alpha_l,
    inv_rms,
    inv_mn,
    SEG,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    RHP: tl.constexpr,
    PREC: tl.constexpr,
    LOSS: tl.constexpr,
):
    # grid (row blocks, SEG). dB: the gradient itself when SEG = 1, else the (SEG, m, r) workspace, segment s
    # writing dB + s·m·r. LOSS: also reduce the loss summand of this (row block, segment) into
    # partial[row block·SEG + segment] (the one-pass training path).
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    t0, t1 = _segment(tl.cdiv(n, BN), SEG)
    rows = pid * BM + tl.arange(0, BM)
    rmask = rows < m
    kr = tl.arange(0, RP)
    bmask = rmask[:, None] & (kr[None, :] < r)
    b = _b_rows(B, rows, rmask, kr, r)
    gs = tl.load(grad).to(tl.float32) * inv_mn * scaling
    acc = tl.zeros((BM, RP), tl.float32)
    lacc = tl.zeros((BM, BN), tl.float32)
    for j0 in range(t0 * BN, t1 * BN, BN):
        cols = j0 + tl.arange(0, BN)
        cmask = cols < n
        a = _a_cols(A, cols, cmask, kr, n, r)
        d = tl.dot(b, a, input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        valid = rmask[:, None] & cmask[None, :]
        if LOSS:
            lacc += tl.where(valid, _summand(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        g = tl.where(valid, _derivative(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        acc += tl.dot(g, tl.trans(a), input_precision=PREC)
    out = dB + seg.to(tl.int64) * m * r
    tl.store(out + rows[:, None] * r + kr[None, :], acc * gs, mask=bmask)
    if LOSS:
        tl.store(partial + pid * SEG + seg, tl.sum(tl.sum(lacc, axis=1), axis=0))


@triton.jit
def _dA_kernel(
    A,
    B,
    H1,
    H2,
    grad,
    dA,
    m,
    n,
    r,
    R,
    sh1,
    scaling,
    alpha_l,
    inv_rms,
    inv_mn,
    SEG,
    KIND: tl.constexpr,
    MODE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    RP: tl.constexpr,
    RHP: tl.constexpr,
    PREC: tl.constexpr,
):
    # grid (column blocks, SEG), each program walking one segment of the row tiles. dA: the gradient itself
    # when SEG = 1, else the (SEG, r, n) workspace, segment s writing dA + s·r·n.
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    t0, t1 = _segment(tl.cdiv(m, BM), SEG)
    cols = pid * BN + tl.arange(0, BN)
    cmask = cols < n
    kr = tl.arange(0, RP)
    amask = (kr[:, None] < r) & cmask[None, :]
    a = _a_cols(A, cols, cmask, kr, n, r)
    gs = tl.load(grad).to(tl.float32) * inv_mn * scaling
    acc = tl.zeros((RP, BN), tl.float32)
    for i0 in range(t0 * BM, t1 * BM, BM):
        rows = i0 + tl.arange(0, BM)
        rmask = rows < m
        b = _b_rows(B, rows, rmask, kr, r)
        d = tl.dot(b, a, input_precision=PREC) * scaling
        h = _h_tile(H1, H2, rows, cols, rmask, cmask, n, R, sh1, KIND, BM, BN, RHP, PREC)
        g = tl.where(rmask[:, None] & cmask[None, :], _derivative(d, h, alpha_l, inv_rms, KIND, MODE), 0.0)
        acc += tl.dot(tl.trans(b), g, input_precision=PREC)
    out = dA + seg.to(tl.int64) * r * n
    tl.store(out + kr[:, None] * n + cols[None, :], acc * gs, mask=amask)


# Tiles (BM, BN) and warps of each kernel on a GPU, the largest that do not spill in the sm_90 cubins (the fp32
# dots lower to unrolled FMAs; the figures are in benches/RESULTS.md, tests/backends/test_triton_compile.py checks them).
# The walked side is the one to shrink: the primary side (rows of fwd/dB, columns of dA) sets the grid, and
# segments make up for a smaller one; the gradient accumulators grow with the rank, hence narrower tiles there.
_TILES = {"fwd": (64, 32), "dB": (64, 32), "dA": (32, 32)}
_TILES_WIDE_RANK = {"fwd": (64, 32), "dB": (32, 32), "dA": (16, 32)}  # padded rank ≥ 256
_WARPS = 8


# Precision of the fp32 dots. "ieee" (the default): FMAs on CUDA cores, the precision the tests' 1e-5 contract was
# checked with. "tf32x3": each dot as three TF32 tensor-core products (hi·hi + hi·lo + lo·hi), near-fp32
# accuracy on the tensor cores: an opt-in experiment for a GPU run (SLICE_KERNELS_TRITON_DOT=tf32x3). The
# interpreter ignores the precision, so its accuracy is tested only on a GPU
# (tests/ops/test_sign_loss.py::test_triton_tf32x3_dots_keep_the_contract, marked gpu), its speed by
# benches/bench_ps_lora.py (a "fused[triton,tf32x3]" column), and its registers and spills on sm_90 by
# tests/backends/test_triton_compile.py. Plain "tf32" is not offered: 10-bit mantissas cannot keep 1e-5.
DOT_PRECISION_ENV = "SLICE_KERNELS_TRITON_DOT"
DOT_PRECISIONS = ("ieee", "tf32x3")


def _dot_precision() -> str:
    prec = os.environ.get(DOT_PRECISION_ENV, "ieee")
    if prec not in DOT_PRECISIONS:
        raise InvalidArgumentError(
            f"sign loss, triton backend: {DOT_PRECISION_ENV}={prec!r} is not one of {DOT_PRECISIONS}; "
            f"unset it for the default (ieee)"
        )
    return prec


def _tiles(kernel: str, r: int) -> tuple[int, int]:
    """(BM, BN) of ``kernel`` at rank ``r``; 32×32 under the interpreter (its cost grows with the tile count of
    small tests)."""
    if dispatch.interpreting():
        return 32, 32
    return (_TILES_WIDE_RANK if _pad(r) >= 256 else _TILES)[kernel]


# Segments (see the module doc): the walked tiles of a primary program split into S contiguous runs, one
# program each (grid axis 1), so small grids still fill the SMs.
_MIN_TILES_PER_SEGMENT = 4  # a segment re-loads its program's B rows / A columns: amortize that over its tiles
_MAX_GRID_AXIS1 = 65535  # CUDA's limit on grid axis 1
# SM count where no CUDA device can be asked: under the interpreter, and for meta tensors (the sm_90 compile of
# tests/backends/test_triton_compile.py, which must see the launches an H100 gets). 132 = an H100 SXM's SMs.
_DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _DEFAULT_SMS


def _segments(primary: int, tiles: int, sms: int, forced: int | None = None) -> int:
    """S for ``primary`` programs that each walk ``tiles`` tiles: about 2 programs per SM in all
    (S = ceil(2·sms / primary)), at most one segment per ``_MIN_TILES_PER_SEGMENT`` tiles, S = 1 when the primary
    grid already reaches 2·sms. ``forced`` (tests) replaces the heuristic; every S is clamped to [1, tiles]. The
    CUDA launcher's ``choose_segments`` (csrc/cuda/sign_loss.cu) is the same function."""
    if forced is not None:
        S = forced
    else:
        target = 2 * max(1, sms)
        S = 1 if primary == 0 or primary >= target else -(-target // primary)
        S = min(S, tiles // _MIN_TILES_PER_SEGMENT)
    return max(1, min(S, tiles, _MAX_GRID_AXIS1))


def _check_segments(segments) -> None:
    if segments is not None and (isinstance(segments, bool) or not isinstance(segments, int) or segments < 1):
        raise InvalidArgumentError(
            f"sign loss, triton backend: segments must be a positive int or None (the heuristic), got {segments!r}"
        )


def _pad(x: int) -> int:
    return max(16, triton.next_power_of_2(max(1, x)))


def _rank_chunk(R: int) -> int:
    """Width of the history-rank chunks of the factor form: 16, the smallest ``tl.dot`` width. Wider chunks
    do the same FMAs with fewer loop trips but spill on sm_90 (benches/RESULTS.md); small tests still walk
    several chunks."""
    return 16


def _max_gpu_rank(kind: int) -> int:
    """Largest padded rank RP the GPU kernels take. Their shared memory grows with the rank (the fp32 dots,
    lowered to FMAs, stage their operands there) against an H100's 232448 B per block, and a launch past it
    fails with "out of resources" (the per-form figures are in benches/RESULTS.md). The limits are the ones
    checked so far, not raised untested; the cuda backend takes any rank."""
    return 128 if kind == 1 else 256


def fits_gpu(r: int, kind: int) -> bool:
    """Whether these kernels take rank ``r`` with history form ``kind`` (always, under the interpreter)."""
    return dispatch.interpreting() or _pad(r) <= _max_gpu_rank(kind)


def _prep(A, B, H1, H2, kind):
    r = B.shape[1]
    if not fits_gpu(r, kind):
        form = {0: "factor", 1: "dense", 2: "bit"}[kind]
        raise InvalidArgumentError(
            f"sign loss, triton backend: rank r={r} with a {form} history needs more shared memory "
            f"than a GPU block has (at most r={_max_gpu_rank(kind)}); use the cuda backend (the "
            f"default on CUDA tensors when slice_kernels._C is built) or SLICE_KERNELS_BACKEND=torch"
        )
    A, B = A.float().contiguous(), B.float().contiguous()
    if kind == 0:
        H1, H2 = H1.float().contiguous(), H2.float().contiguous()
        R = H1.shape[1]
    else:
        H1 = H1.contiguous()  # bits, or the dense H in its own dtype: the kernel upcasts each tile on load
        H2 = H1  # unused pointer
        R = 1
    return A, B, H1, H2, R


def sign_loss_fwd_triton(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, *, segments=None):
    """``segments``: force S for every kernel of the call (tests; clamped to each kernel's tile count)."""
    out_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    _check_segments(segments)
    prec = _dot_precision()
    A_, B_, H1, H2, R = _prep(A, B, H1, H2, kind)
    m, r = B_.shape
    n = A_.shape[1]
    BM, BN = _tiles("fwd", r)
    rows = triton.cdiv(m, BM)
    S = _segments(rows, triton.cdiv(n, BN), _sm_count(A.device), segments)
    partial = torch.empty(rows * S, dtype=torch.float32, device=A.device)
    _fwd_kernel[(rows, S)](
        A_,
        B_,
        H1,
        H2,
        partial,
        m,
        n,
        r,
        R,
        H1.stride(0),
        float(scaling),
        float(alpha_l),
        float(inv_rms),
        S,
        KIND=kind,
        MODE=mode,
        BM=BM,
        BN=BN,
        RP=_pad(r),
        RHP=_rank_chunk(R),
        PREC=prec,
        num_warps=_WARPS,
    )
    return (partial.double().sum() / (m * n)).to(out_dtype)


def _gradients(A_, B_, H1, H2, R, g, kind, mode, scaling, alpha_l, inv_rms, segments, prec, loss=False):
    """dA, dB (float32) from the dB kernel and the dA kernel, each split into its own S segments, and with
    ``loss`` the dB kernel's loss partials too (one per (row block, segment); else None). With S > 1 the
    segments' slices of a workspace are added by ``.sum(0)``, a fixed-order reduction (no atomics:
    deterministic)."""
    m, r = B_.shape
    n = A_.shape[1]
    sms = _sm_count(A_.device)
    (BM_b, BN_b), (BM_a, BN_a) = _tiles("dB", r), _tiles("dA", r)
    rows_b, cols_a = triton.cdiv(m, BM_b), triton.cdiv(n, BN_a)
    s_dB = _segments(rows_b, triton.cdiv(n, BN_b), sms, segments)
    s_dA = _segments(cols_a, triton.cdiv(m, BM_a), sms, segments)
    dB = torch.empty((s_dB, m, r) if s_dB > 1 else (m, r), dtype=torch.float32, device=A_.device)
    dA = torch.empty((s_dA, r, n) if s_dA > 1 else (r, n), dtype=torch.float32, device=A_.device)
    partial = torch.empty(rows_b * s_dB, dtype=torch.float32, device=A_.device) if loss else None
    common = dict(KIND=kind, MODE=mode, RP=_pad(r), RHP=_rank_chunk(R), PREC=prec, num_warps=_WARPS)
    args = (m, n, r, R, H1.stride(0), float(scaling), float(alpha_l), float(inv_rms), 1.0 / (m * n))
    _dB_kernel[(rows_b, s_dB)](
        A_, B_, H1, H2, g, dB, partial if loss else dB, *args, s_dB, LOSS=loss, BM=BM_b, BN=BN_b, **common
    )
    _dA_kernel[(cols_a, s_dA)](A_, B_, H1, H2, g, dA, *args, s_dA, BM=BM_a, BN=BN_a, **common)
    return (dA.sum(0) if s_dA > 1 else dA), (dB.sum(0) if s_dB > 1 else dB), partial


def sign_loss_bwd_triton(grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, *, segments=None):
    _check_segments(segments)
    prec = _dot_precision()
    A_, B_, H1, H2, R = _prep(A, B, H1, H2, kind)
    g = grad.float().reshape(1).contiguous()
    dA, dB, _ = _gradients(A_, B_, H1, H2, R, g, kind, mode, scaling, alpha_l, inv_rms, segments, prec)
    return dA.to(A.dtype), dB.to(B.dtype)


def sign_loss_fwd_bwd_triton(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, *, segments=None):
    """The training path: the dB kernel also reduces the loss, so loss + gradients take two kernels, not three
    (plus the workspace sums when split)."""
    out_dtype = torch.float64 if A.dtype == torch.float64 else torch.float32
    _check_segments(segments)
    prec = _dot_precision()
    A_, B_, H1, H2, R = _prep(A, B, H1, H2, kind)
    m, n = B_.shape[0], A_.shape[1]
    g = torch.ones(1, dtype=torch.float32, device=A.device)
    dA, dB, partial = _gradients(A_, B_, H1, H2, R, g, kind, mode, scaling, alpha_l, inv_rms, segments, prec, loss=True)
    loss = (partial.double().sum() / (m * n)).to(out_dtype)
    return loss, dA.to(A.dtype), dB.to(B.dtype)
