"""gorp_update: every backend against the torch reference computed in float64."""

import pytest
import torch

from slice_kernels import dispatch
from slice_kernels.ops.gorp_update import GORP_UPDATE as OP
from slice_kernels.ops.gorp_update import gorp_update_, gorp_update_torch
from tests.helpers import backends_for

# awkward sizes: not block multiples, m ≠ n, a single element, a vector (biases and norms go through here)
SHAPES = [(37, 5), (5, 37), (1, 1), (129, 3), (1100,)]
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8)


def _inputs(shape, dtype, seed, with_proj=True, param_dtype=None, step=3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(shape, generator=gen, dtype=torch.float64)
    g, proj, m = r(), 0.3 * r(), 0.1 * r()
    v = r() ** 2 * 0.01
    p = r()
    bc = dict(bc1=1 - 0.9**step, bc2=1 - 0.999**step)
    t = {k: x.to(dtype) for k, x in dict(g=g, proj=proj, m=m, v=v).items()}
    t["p"] = p.to(param_dtype or dtype)
    if not with_proj:
        t["proj"] = None
    return t, bc


def _run(backend, t, bc, *, want_param, want_out, step_size=1e-2, decay=0.999):
    m, v = t["m"].clone(), t["v"].clone()
    p = t["p"].clone() if want_param else None
    out = torch.empty_like(t["g"]) if want_out else None
    with dispatch.use_backend(backend):
        gorp_update_(t["g"], t["proj"], m, v, param=p, out=out, step_size=step_size, decay=decay, **HP, **bc)
    return m, v, p, out


def _reference64(t, bc, **kw):
    t64 = {k: (None if x is None else x.double()) for k, x in t.items()}
    return _run("torch", t64, bc, **kw)


@pytest.mark.parametrize("backend", backends_for(OP))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_proj", [True, False])
@pytest.mark.parametrize("outputs", ["param", "out", "both"])
def test_float64_matches_reference(backend, shape, with_proj, outputs):
    t, bc = _inputs(shape, torch.float64, seed=hash((shape, with_proj)) % 1000, with_proj=with_proj)
    kw = dict(want_param=outputs in ("param", "both"), want_out=outputs in ("out", "both"))
    got, ref = _run(backend, t, bc, **kw), _run("torch", t, bc, **kw)
    for a, b in zip(got, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("backend", backends_for(OP))
@pytest.mark.parametrize("shape", [(37, 5), (129, 3)])
def test_float32_relative_error(backend, shape):
    t, bc = _inputs(shape, torch.float32, seed=7)
    kw = dict(want_param=True, want_out=True)
    ref = _reference64(t, bc, **kw)
    got = _run(backend, t, bc, **kw)
    torch_f32 = _run("torch", t, bc, **kw)
    for a, b, c in zip(got, ref, torch_f32):
        # No accumulation, but m = β1·m + (1 − β1)·g' can cancel, so a single element may lose relative
        # accuracy (and at 1-ulp level the kernels' FMAs round differently from torch's two passes): hence
        # normwise bounds, 1e-5 relative and no worse than 2× float32 torch's own error.
        err = (a.double() - b).norm()
        assert err <= 1e-5 * b.norm()
        assert err <= 2 * (c.double() - b).norm() + 1e-12 * b.norm()


@pytest.mark.parametrize("backend", backends_for(OP))
def test_bfloat16_param_with_float32_state(backend):
    t, bc = _inputs((53, 19), torch.float32, seed=11, param_dtype=torch.bfloat16)
    kw = dict(want_param=True, want_out=False, step_size=0.05)
    ref = _reference64(t, bc, **kw)[2]
    torch_err = (_run("torch", t, bc, **kw)[2].double() - ref).abs().max()
    got = _run(backend, t, bc, **kw)[2]
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= 2 * torch_err


def test_reference_is_adam():
    """The reference itself against Adam's textbook formulas, written out independently."""
    t, bc = _inputs((6, 4), torch.float64, seed=3)
    m, v, p, out = _run("torch", t, bc, want_param=True, want_out=True, step_size=0.01, decay=0.99)
    gp = t["g"] - t["proj"]
    m_ref = 0.9 * t["m"] + 0.1 * gp
    v_ref = 0.999 * t["v"] + 0.001 * gp**2
    u = (m_ref / bc["bc1"]) / ((v_ref / bc["bc2"]).sqrt() + 1e-8)
    torch.testing.assert_close(m, m_ref, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(v, v_ref, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(out, u, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(p, 0.99 * t["p"] - 0.01 * u, rtol=1e-14, atol=1e-16)


def test_bad_inputs_are_named():
    g = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        gorp_update_(g, None, torch.zeros(4, 3), torch.zeros(3, 4), out=torch.zeros(4, 3), bc1=0.1, bc2=0.1, **HP)
    with pytest.raises(ValueError, match="param= .* out="):
        gorp_update_(g, None, torch.zeros(4, 3), torch.zeros(4, 3), bc1=0.1, bc2=0.1, **HP)
    with pytest.raises(ValueError, match="exp_avg is torch.float64"):
        gorp_update_(
            g, None, torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3), out=g.clone(), bc1=0.1, bc2=0.1, **HP
        )


def test_float16_param_falls_back_to_reference():
    t, bc = _inputs((9, 7), torch.float32, seed=5, param_dtype=torch.float16)
    m, v = t["m"].clone(), t["v"].clone()
    p = t["p"].clone()
    gorp_update_(t["g"], t["proj"], m, v, param=p, step_size=0.01, decay=1.0, **HP, **bc)
    m2, v2, p2 = t["m"].clone(), t["v"].clone(), t["p"].clone()
    gorp_update_torch(t["g"], t["proj"], m2, v2, p2, None, 0.9, 0.999, 1e-8, bc["bc1"], bc["bc2"], 0.01, 1.0)
    assert torch.equal(p, p2) and p.dtype == torch.float16


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for(OP, "cuda"))
@pytest.mark.parametrize("shape", [(37, 5), (4099, 3), (1,)])
def test_cuda_float64_matches_reference(backend, shape):
    t, bc = _inputs(shape, torch.float64, seed=1)
    t = {k: (None if x is None else x.cuda()) for k, x in t.items()}
    kw = dict(want_param=True, want_out=True)
    for a, b in zip(_run(backend, t, bc, **kw), _run("torch", t, bc, **kw)):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", backends_for(OP, "cuda"))
def test_cuda_bfloat16_param(backend):
    t, bc = _inputs((4099, 19), torch.float32, seed=2, param_dtype=torch.bfloat16)
    t = {k: (None if x is None else x.cuda()) for k, x in t.items()}
    kw = dict(want_param=True, want_out=False, step_size=0.05)
    ref = _reference64(t, bc, **kw)[2]
    torch_err = (_run("torch", t, bc, **kw)[2].double() - ref).abs().max()
    assert (_run(backend, t, bc, **kw)[2].double() - ref).abs().max() <= 2 * torch_err
