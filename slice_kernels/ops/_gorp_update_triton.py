"""Triton kernel of the GORP step epilogue (``gorp_update.py`` registers it)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


@triton.jit
def _gorp_update_kernel(
    g_ptr,
    proj_ptr,
    m_ptr,
    v_ptr,
    p_ptr,
    out_ptr,
    numel,
    beta1,
    omb1,
    beta2,
    omb2,
    eps,
    bc1,
    bc2,
    step_size,
    decay,
    sc_ptr,
    HAS_PROJ: tl.constexpr,
    HAS_PARAM: tl.constexpr,
    HAS_OUT: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
    SCALARS_FROM_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
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


def gorp_update(g, proj, exp_avg, exp_avg_sq, param, out, beta1, beta2, eps, bc1, bc2, step_size, decay):
    n = g.numel()
    block = 1024
    grid = (triton.cdiv(n, block),)
    # 1 - beta on the host in double: in float32, 1 - 0.999 is off by 5e-5 relative
    scalars = [
        float(beta1),
        1.0 - float(beta1),
        float(beta2),
        1.0 - float(beta2),
        float(eps),
        float(bc1),
        float(bc2),
        float(step_size),
        float(decay),
    ]
    from_ptr = g.dtype == torch.float64
    sc = torch.tensor(scalars, dtype=torch.float64, device=g.device) if from_ptr else g
    _gorp_update_kernel[grid](
        g,
        proj if proj is not None else g,
        exp_avg,
        exp_avg_sq,
        param if param is not None else g,
        out if out is not None else g,
        n,
        *scalars,
        sc,
        SCALARS_FROM_PTR=from_ptr,
        HAS_PROJ=proj is not None,
        HAS_PARAM=param is not None,
        HAS_OUT=out is not None,
        BF16_BY_HAND=param is not None
        and param.dtype == torch.bfloat16
        and g.dtype == torch.float32
        and dispatch.interpreting(),
        BLOCK=block,
    )
