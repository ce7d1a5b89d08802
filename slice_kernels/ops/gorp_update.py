"""GORP step epilogue (SPEC §4): orthogonalization residual, Adam moments, normalized update, parameter update.

``gorp_update_(g, proj, exp_avg, exp_avg_sq, *, param=None, out=None, beta1, beta2, eps, bc1, bc2,
step_size=0.0, decay=1.0)`` computes, element by element and in one pass over memory:

    g'  = g − proj                          (proj = S·Sᵀ·g from two skinny GEMMs, or None)
    m  ← β1·m + (1 − β1)·g'
    v  ← β2·v + (1 − β2)·g'²
    u   = (m / bc1) / (√(v / bc2) + eps)     (bc1 = 1 − β1^t, bc2 = 1 − β2^t)
    out ← u                                  (when ``out`` is given)
    param ← decay·param − step_size·u        (when ``param`` is given; decay = 1 − lr·wd, step_size = lr·scale)

Why this split: the projections (G·Qᵀ, Sᵀ·g, S·(Sᵀg)) and the lift-back (u·Q) are skinny GEMMs that BLAS /
cuBLAS already run near their roofline, and the lift-back with the parameter update is one ``addmm`` with
beta = decay and alpha = −step_size (BLAS's own epilogue). What is left — the subtraction, both moment
updates, the bias-corrected normalization and, for matrices that need no lift (LoRA A, plain AdamW groups),
the parameter update — is memory-bound elementwise work that eager torch spreads over ~10 kernels with
temporaries; here it is one read of each input and one write of each output.

Dtypes: g, proj, exp_avg, exp_avg_sq and out share one floating dtype (float32 in training, float64 in the
tests); param has that dtype or is bfloat16 with float32 state (loaded, upcast, updated in float32, rounded
on store). Other combinations run on the torch reference (``gorp_update_`` routes them there).
"""
from __future__ import annotations

import torch

from .. import dispatch

OP = "gorp_update"


@dispatch.register(OP, "torch")
def gorp_update_torch(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay):
    gp = g if proj is None else g - proj
    exp_avg.mul_(beta1).add_(gp, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(gp, gp, value=1.0 - beta2)
    u = (exp_avg / bc1) / ((exp_avg_sq / bc2).sqrt_().add_(eps))
    if out is not None:
        out.copy_(u)
    if param is not None:
        p = param.to(u.dtype)
        p.mul_(decay).add_(u, alpha=-step_size)
        param.copy_(p)


# ---------------------------------------------------------------- triton
try:  # the package must import without triton
    import triton
    import triton.language as tl

    @triton.jit
    def _gorp_update_kernel(
        g_ptr, proj_ptr, m_ptr, v_ptr, p_ptr, out_ptr, numel,
        beta1, omb1, beta2, omb2, eps, bc1, bc2, step_size, decay, sc_ptr,
        HAS_PROJ: tl.constexpr, HAS_PARAM: tl.constexpr, HAS_OUT: tl.constexpr, BF16_BY_HAND: tl.constexpr,
        SCALARS_FROM_PTR: tl.constexpr, BLOCK: tl.constexpr,
    ):
        if SCALARS_FROM_PTR:
            # float64 state: Triton passes Python floats as float32, which would round β, eps and the bias
            # corrections; read them from a float64 tensor instead
            beta1 = tl.load(sc_ptr + 0)
            omb1 = tl.load(sc_ptr + 1)
            beta2 = tl.load(sc_ptr + 2)
            omb2 = tl.load(sc_ptr + 3)
            eps = tl.load(sc_ptr + 4)
            bc1 = tl.load(sc_ptr + 5)
            bc2 = tl.load(sc_ptr + 6)
            step_size = tl.load(sc_ptr + 7)
            decay = tl.load(sc_ptr + 8)
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
        if HAS_PROJ:
            g = g - tl.load(proj_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        m = beta1 * m + omb1 * g
        v = beta2 * v + omb2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        u = (m / bc1) / (tl.sqrt(v / bc2) + eps)
        if HAS_OUT:
            tl.store(out_ptr + offs, u, mask=mask)
        if HAS_PARAM:
            # bf16 parameters: upcast, update in the state's precision, round once on store
            p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(u.dtype)
            p = decay * p - step_size * u
            if BF16_BY_HAND:
                # The interpreter truncates float32 → bfloat16 (GPUs round to nearest even): round by hand,
                # on the bits, so the interpreted kernel rounds like the GPU one. (Finite values only, which
                # is all an optimizer step may produce.)
                bits = p.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + offs, bits.to(tl.uint16), mask=mask)
            else:
                tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    @dispatch.register(OP, "triton")
    def gorp_update_triton(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay):
        n = g.numel()
        block = 1024
        grid = (triton.cdiv(n, block),)
        # 1 - beta on the host in double: in float32, 1 - 0.999 is off by 5e-5 relative
        scalars = [float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps), float(bc1),
                   float(bc2), float(step_size), float(decay)]
        from_ptr = g.dtype == torch.float64
        sc = torch.tensor(scalars, dtype=torch.float64, device=g.device) if from_ptr else g
        _gorp_update_kernel[grid](
            g, proj if proj is not None else g, exp_avg, exp_avg_sq,
            param if param is not None else g, out if out is not None else g, n, *scalars, sc,
            SCALARS_FROM_PTR=from_ptr,
            HAS_PROJ=proj is not None, HAS_PARAM=param is not None, HAS_OUT=out is not None,
            BF16_BY_HAND=param is not None and param.dtype == torch.bfloat16 and g.dtype == torch.float32
            and dispatch.interpreting(),
            BLOCK=block,
        )

except ImportError:  # pragma: no cover - exercised only where triton is absent
    pass


# ---------------------------------------------------------------- native (csrc/cpu, csrc/cuda_glue)
def _native(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay):
    from .. import _ext

    _ext.native(OP)(
        g, proj, exp_avg, exp_avg_sq, param, out,
        float(beta1), float(beta2), float(eps), float(bc1), float(bc2), float(step_size), float(decay),
    )


dispatch.register(OP, "cpp", native_op=OP)(_native)
dispatch.register(OP, "cuda", native_op=OP)(_native)


# ---------------------------------------------------------------- public entry
def _kernel_dtypes_ok(state_dtype: torch.dtype, param: torch.Tensor | None) -> bool:
    if state_dtype not in (torch.float32, torch.float64):
        return False
    return param is None or param.dtype == state_dtype or (
        param.dtype == torch.bfloat16 and state_dtype == torch.float32
    )


def gorp_update_(
    g: torch.Tensor,
    proj: torch.Tensor | None,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    param: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    beta1: float,
    beta2: float,
    eps: float,
    bc1: float,
    bc2: float,
    step_size: float = 0.0,
    decay: float = 1.0,
) -> None:
    """In place on exp_avg, exp_avg_sq and (when given) param and out; see the module docstring."""
    shape, dt, dev = g.shape, g.dtype, g.device
    named = {"proj": proj, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "param": param, "out": out}
    for name, t in named.items():
        if t is None:
            continue
        if t.shape != shape:
            raise ValueError(f"gorp_update_: {name} has shape {tuple(t.shape)}, the gradient {tuple(shape)}")
        if t.device != dev:
            raise ValueError(f"gorp_update_: {name} is on {t.device}, the gradient on {dev}; move it first")
        if not t.is_contiguous():
            raise ValueError(f"gorp_update_: {name} must be contiguous (call .contiguous() on it)")
        if name != "param" and t.dtype != dt:
            raise ValueError(f"gorp_update_: {name} is {t.dtype} but the gradient is {dt}; state shares one dtype")
    if not g.is_contiguous():
        raise ValueError("gorp_update_: the gradient must be contiguous (call .contiguous() on it)")
    if param is None and out is None:
        raise ValueError("gorp_update_: give param= (apply the step) and/or out= (receive the update)")
    if not (0.0 < bc1 <= 1.0 and 0.0 < bc2 <= 1.0):
        raise ValueError(f"gorp_update_: bias corrections must lie in (0, 1], got bc1={bc1}, bc2={bc2}")
    args = (g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay)
    if not _kernel_dtypes_ok(dt, param) and dispatch.forced_backend() is None:
        gorp_update_torch(*args)  # e.g. float16 parameters: the kernels are built for f32/f64/bf16 only
        return
    dispatch.call(OP, dev, *args)
