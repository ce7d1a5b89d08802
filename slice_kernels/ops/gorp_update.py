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

from .. import dispatch, extension
from ..errors import InvalidArgumentError

GORP_UPDATE = dispatch.define("gorp_update")


@GORP_UPDATE.register("torch")
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


try:  # the package must import without triton
    from . import _gorp_update_triton as _tri

    GORP_UPDATE.register("triton")(_tri.gorp_update)
    gorp_update_triton = _tri.gorp_update
except ImportError:  # pragma: no cover - exercised only where triton is absent
    _tri = None


# ---------------------------------------------------------------- native (csrc/cpu, csrc/cuda_glue)
@GORP_UPDATE.register("cpp", native_op="gorp_update")
@GORP_UPDATE.register("cuda", native_op="gorp_update")
def gorp_update_native(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay):
    extension.native("gorp_update")(
        g,
        proj,
        exp_avg,
        exp_avg_sq,
        param,
        out,
        float(beta1),
        float(beta2),
        float(eps),
        float(bc1),
        float(bc2),
        float(step_size),
        float(decay),
    )


# ---------------------------------------------------------------- public entry
def _kernel_dtypes_ok(state_dtype: torch.dtype, param: torch.Tensor | None) -> bool:
    if state_dtype not in (torch.float32, torch.float64):
        return False
    return (
        param is None or param.dtype == state_dtype or (param.dtype == torch.bfloat16 and state_dtype == torch.float32)
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
            raise InvalidArgumentError(f"gorp_update_: {name} has shape {tuple(t.shape)}, the gradient {tuple(shape)}")
        if t.device != dev:
            raise InvalidArgumentError(f"gorp_update_: {name} is on {t.device}, the gradient on {dev}; move it first")
        if not t.is_contiguous():
            raise InvalidArgumentError(f"gorp_update_: {name} must be contiguous (call .contiguous() on it)")
        if name != "param" and t.dtype != dt:
            raise InvalidArgumentError(
                f"gorp_update_: {name} is {t.dtype} but the gradient is {dt}; state shares one dtype"
            )
    if not g.is_contiguous():
        raise InvalidArgumentError("gorp_update_: the gradient must be contiguous (call .contiguous() on it)")
    if param is None and out is None:
        raise InvalidArgumentError("gorp_update_: give param= (apply the step) and/or out= (receive the update)")
    if not (0.0 < bc1 <= 1.0 and 0.0 < bc2 <= 1.0):
        raise InvalidArgumentError(f"gorp_update_: bias corrections must lie in (0, 1], got bc1={bc1}, bc2={bc2}")
    args = (g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay)
    if not _kernel_dtypes_ok(dt, param) and dispatch.forced_backend() is None:
        gorp_update_torch(*args)  # e.g. float16 parameters: the kernels are built for f32/f64/bf16 only
        return
    GORP_UPDATE(dev, *args)
