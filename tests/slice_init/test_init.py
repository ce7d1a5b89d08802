"""SPEC §1 formulas of ``init_from_gradients``, each against an independent float64 computation here.

Gradients are passed in float64 with ``inplace_gradients=True`` where the test needs G̃: the surgery then
writes G̃ into the g_cur tensors, which the test reads back and compares with its own G_cur + γ·G_prev.
The SVD itself runs in float32 (as in production); comparisons of singular vectors use matrices with a
built-in spectral gap and a tolerance derived from float32 eps, σ₁ and that gap (Davis–Kahan).
The ops run on the torch reference backend here: this file pins the formulas; the fused backends are
compared with that reference in tests/ops/test_*.py (the native ones take float32, not these float64 inputs).
"""

import math
import warnings

import numpy as np
import pytest
import torch

from slice_kernels import (
    NonFiniteGradientError,
    SliceConfig,
    SliceInitError,
    dispatch,
    init_from_gradients,
    lora_scaling,
)

EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture(autouse=True)
def reference_backend():
    with dispatch.use_backend("torch"):
        yield


def gapped(m, n, spectrum, seed):
    """m×n float64 matrix with singular values ``spectrum`` (distinct, so vectors are well defined)."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ V.T


def layers(shapes, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": scale * torch.randn(m, n, generator=g, dtype=torch.float64) for i, (m, n) in enumerate(shapes)}


SHAPES = [(40, 24), (24, 40), (33, 33)]


def ref_svd(G):
    """float64 SVD with the sign convention (largest-|entry| of u_i positive), numpy so it is independent."""
    U, S, Vt = np.linalg.svd(G.numpy(), full_matrices=False)
    for i in range(U.shape[1]):
        j = np.argmax(np.abs(U[:, i]))
        if U[j, i] < 0:
            U[:, i] *= -1
            Vt[i, :] *= -1
    return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt.T.copy())


def vec_tol(S, k):
    """Bound for float32 singular vectors 0..k-1: eps32·σ₁ over the smallest gap among σ₀..σ_k."""
    top = S[: k + 1]  # σ_k exists unless k = min(m, n); the spectrum ends there and has no further gap
    gaps = (top[:-1] - top[1:]).abs().min().item()
    return 200 * EPS32 * S[0].item() / gaps


def globals64(gc, gp):
    D = sum(float((gc[n] * gp[n]).sum()) for n in gc)
    Np = sum(float((gp[n] ** 2).sum()) for n in gc)
    Nc = sum(float((gc[n] ** 2).sum()) for n in gc)
    return D, Np, Nc, D / math.sqrt(Np * Nc)


def weights_like(g, seed=7):
    gen = torch.Generator().manual_seed(seed)
    return {n: 0.05 * torch.randn(*t.shape, generator=gen, dtype=torch.float32) for n, t in g.items()}


def conflicting_pair(seed=0, sign=-1.0):
    """G_cur and G_prev with a prescribed sign of the global inner product."""
    gp = layers(SHAPES, seed=seed + 1)
    noise = layers(SHAPES, seed=seed + 2)
    gc = {n: sign * 0.5 * gp[n] + noise[n] for n in gp}
    return gc, gp


def run(gc, gp, r=4, **cfg):
    W = weights_like(gc)
    gc_copy = {n: t.clone() for n, t in gc.items()}
    cfg.setdefault("svd", "exact")
    res = init_from_gradients(W, gc_copy, gp, r=r, lora_alpha=2.0, config=SliceConfig(**cfg), inplace_gradients=True)
    return res, gc_copy, W


def test_gamma_with_conflict_global_and_orthogonality():
    gc, gp = conflicting_pair(sign=-1.0)
    D, Np, Nc, cos = globals64(gc, gp)
    assert D < 0
    res, gt, _ = run(gc, gp, projection_strength=1.0)
    gamma = -D / (Np + 1e-12)
    rep = res.report
    assert rep.gamma == pytest.approx(gamma, rel=1e-12)
    assert rep.cos == pytest.approx(cos, rel=1e-12)
    assert (rep.D, rep.Np, rep.Nc) == pytest.approx((D, Np, Nc), rel=1e-12)
    for n in gc:
        torch.testing.assert_close(gt[n], gc[n] + gamma * gp[n], rtol=1e-12, atol=1e-12)
        assert rep.layers[n]["gamma"] == pytest.approx(gamma, rel=1e-12)
        assert rep.layers[n]["grad_norm"] == pytest.approx(float(gt[n].norm()), rel=1e-9)
    # c = 1: ⟨G̃, G_prev⟩ = 0 summed over layers (global), though not layer by layer
    inner = sum(float((gt[n] * gp[n]).sum()) for n in gc)
    assert abs(inner) <= 1e-10 * math.sqrt(Nc * Np)
    per_layer = [abs(float((gt[n] * gp[n]).sum())) for n in gc]
    assert max(per_layer) > 1e-3 * math.sqrt(Nc * Np)


def test_no_conflict_means_no_surgery():
    gc, gp = conflicting_pair(sign=+1.0)
    D, Np, Nc, cos = globals64(gc, gp)
    assert D > 0 and cos > 0
    res, gt, _ = run(gc, gp)
    assert res.report.gamma == 0.0 and res.report.cos == pytest.approx(cos, rel=1e-12)
    for n in gc:
        assert torch.equal(gt[n], gc[n])


@pytest.mark.parametrize("c", [0.0, 0.3, 1.0])
def test_strength_c(c):
    gc, gp = conflicting_pair(sign=-1.0)
    D, Np, _, _ = globals64(gc, gp)
    res, gt, _ = run(gc, gp, projection_strength=c)
    gamma = -c * D / (Np + 1e-12)
    assert res.report.gamma == pytest.approx(gamma, rel=1e-12, abs=0.0)
    for n in gc:
        torch.testing.assert_close(gt[n], gc[n] + gamma * gp[n], rtol=1e-12, atol=1e-12)


def test_tau_gate():
    gc, gp = conflicting_pair(sign=+1.0)  # cos > 0: gated off at τ = 0
    D, Np, _, cos = globals64(gc, gp)
    on, gt_on, _ = run(gc, gp, conflict_threshold=min(cos + 0.01, 1.0))
    off, gt_off, _ = run(gc, gp, conflict_threshold=cos - 0.01)
    assert on.report.gamma == pytest.approx(-D / (Np + 1e-12), rel=1e-12)
    assert off.report.gamma == 0.0
    for n in gc:
        assert torch.equal(gt_off[n], gc[n])
        assert not torch.equal(gt_on[n], gc[n])


def test_per_module_scope():
    gc, gp = conflicting_pair(sign=-1.0)
    gc["l1"] = -gc["l1"] + 3 * gp["l1"]  # this layer agrees with the replay: its own γ is 0
    res, gt, _ = run(gc, gp, projection_scope="per_module")
    assert res.report.gamma is None
    for n in gc:
        D = float((gc[n] * gp[n]).sum())
        Np = float((gp[n] ** 2).sum())
        gamma = -D / (Np + 1e-12) if D < 0 else 0.0
        assert res.report.layers[n]["gamma"] == pytest.approx(gamma, rel=1e-12, abs=0.0)
        torch.testing.assert_close(gt[n], gc[n] + gamma * gp[n], rtol=1e-12, atol=1e-12)
        if D < 0:
            assert abs(float((gt[n] * gp[n]).sum())) <= 1e-10 * float(gc[n].norm() * gp[n].norm())
    assert res.report.layers["l1"]["gamma"] == 0.0


def spectra(k, top=10.0):
    return [top * 0.8**i for i in range(k)]


@pytest.mark.parametrize("direction", ["A2rBr", "ArB2r"])
@pytest.mark.parametrize("r", [1, 3, 12])  # 12: 2r = min(m, n) of (24, 40)
def test_directions_and_sign_convention(direction, r):
    shapes = [(40, 24), (24, 40), (31, 26)]
    gc = {f"l{i}": gapped(m, n, spectra(min(m, n)), seed=i) for i, (m, n) in enumerate(shapes)}
    W = weights_like(gc)
    res = init_from_gradients(
        W,
        gc,
        None,
        r=r,
        lora_alpha=2.0,
        config=SliceConfig(method="slice", svd="exact", scale="unit", direction=direction),
    )
    for n, G in gc.items():
        U, S, V = ref_svd(G)
        tol = vec_tol(S, 2 * r)
        if direction == "A2rBr":
            B_ref, A_ref = U[:, :r], V[:, r : 2 * r].T
        else:
            B_ref, A_ref = U[:, r : 2 * r], V[:, :r].T
        torch.testing.assert_close(res.B[n].double(), B_ref, rtol=0, atol=tol)
        torch.testing.assert_close(res.A[n].double(), A_ref, rtol=0, atol=tol)
        # sign convention, checked directly on the columns of B that are u_i
        if direction == "A2rBr":
            cols = res.B[n]
            assert (cols.gather(0, cols.abs().argmax(0, keepdim=True)) > 0).all()


def test_sign_convention_on_randomized_svd_too():
    gc = {"a": gapped(50, 30, spectra(30), seed=3)}
    res = init_from_gradients(
        weights_like(gc),
        gc,
        None,
        r=4,
        lora_alpha=2.0,
        config=SliceConfig(method="lora_ga", svd="randomized", scale="unit"),
    )
    U, S, V = ref_svd(gc["a"])
    # lora_ga keeps SliceConfig's direction (default A2rBr); the gap (ratio 0.8) makes 4 power iterations exact
    # to well below the 1e-4 tolerance.
    torch.testing.assert_close(res.B["a"].double(), U[:, :4], rtol=0, atol=1e-4)
    torch.testing.assert_close(res.A["a"].double(), V[:, 4:8].T, rtol=0, atol=1e-4)


def dense_var(B, A):
    return float(torch.var((B.double() @ A.double()).reshape(-1), unbiased=True))


@pytest.mark.parametrize("r", [1, 5, 12])
def test_variance_scale(r):
    gc = {f"l{i}": gapped(m, n, spectra(min(m, n)), seed=i) for i, (m, n) in enumerate([(40, 24), (24, 40)])}
    W = weights_like(gc)
    res = init_from_gradients(W, gc, None, r=r, lora_alpha=2.0, config=SliceConfig(svd="exact", scale="variance"))
    unit = init_from_gradients(W, gc, None, r=r, lora_alpha=2.0, config=SliceConfig(svd="exact", scale="unit"))
    for n in gc:
        m, nn_ = W[n].shape
        rho = math.log(max(2, r)) / math.log(max(2, min(m, nn_)))
        var_w = float(torch.var(W[n].double().reshape(-1), unbiased=True))
        assert dense_var(res.B[n], res.A[n]) == pytest.approx(rho * var_w, rel=1e-4)
        beta = (rho * var_w / dense_var(unit.B[n], unit.A[n])) ** 0.25
        torch.testing.assert_close(res.A[n].double(), beta * unit.A[n].double(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(res.B[n].double(), beta * unit.B[n].double(), rtol=1e-5, atol=1e-7)


def test_stable_and_unit_scales():
    gc = {f"l{i}": gapped(m, n, spectra(min(m, n)), seed=i) for i, (m, n) in enumerate([(40, 24), (24, 40)])}
    W = weights_like(gc)
    st = init_from_gradients(
        W, gc, None, r=3, lora_alpha=2.0, config=SliceConfig(svd="exact", scale="stable", stable_gamma=9.0)
    )
    un = init_from_gradients(W, gc, None, r=3, lora_alpha=2.0, config=SliceConfig(svd="exact", scale="unit"))
    for n in gc:
        f = W[n].shape[0] ** 0.25 / 3.0
        torch.testing.assert_close(st.A[n], f * un.A[n], rtol=1e-6, atol=0)
        torch.testing.assert_close(st.B[n], f * un.B[n], rtol=1e-6, atol=0)
        # unit: orthonormal slices of the SVD
        torch.testing.assert_close(un.B[n].T @ un.B[n], torch.eye(3), rtol=0, atol=1e-5)
        torch.testing.assert_close(un.A[n] @ un.A[n].T, torch.eye(3), rtol=0, atol=1e-5)


def test_lora_ga_peft_preset_formula():
    gc = {f"l{i}": gapped(m, n, spectra(min(m, n)), seed=i) for i, (m, n) in enumerate([(40, 24), (24, 40)])}
    W = weights_like(gc)
    r = 4
    res = init_from_gradients(W, gc, None, r=r, lora_alpha=2.0, config=SliceConfig(method="lora_ga_peft", svd="exact"))
    for n, G in gc.items():
        U, S, V = ref_svd(G)
        m = G.shape[0]
        B_ref = U[:, r : 2 * r] @ torch.diag(S[r : 2 * r]) * (m**0.25 / 4.0)
        tol = vec_tol(S, 2 * r)
        assert res.A[n].dtype == W[n].dtype
        torch.testing.assert_close(res.A[n].double(), V[:, :r].T, rtol=0, atol=tol)
        torch.testing.assert_close(res.B[n].double(), B_ref, rtol=0, atol=tol * float(S[0]) * m**0.25)


@pytest.mark.parametrize("use_rslora", [True, False])
def test_absorb(use_rslora):
    gc, gp = conflicting_pair(sign=-1.0)
    W = weights_like(gc)
    res = init_from_gradients(W, gc, gp, r=3, lora_alpha=5.0, use_rslora=use_rslora, config=SliceConfig(svd="exact"))
    s = 5.0 / math.sqrt(3) if use_rslora else 5.0 / 3
    assert res.scaling == pytest.approx(s) == lora_scaling(3, 5.0, use_rslora)
    for n in gc:
        ref = W[n].double() - s * res.B[n].double() @ res.A[n].double()
        torch.testing.assert_close(res.weights[n].double(), ref, rtol=0, atol=4 * EPS32 * float(ref.abs().max()))
        assert not torch.equal(res.weights[n], W[n])  # a fresh tensor; the input is untouched
    assert all(torch.equal(W[n], weights_like(gc)[n]) for n in gc)


def test_absorb_bf16_uses_adapter_dtype_first():
    gc = {"a": gapped(40, 24, spectra(24), seed=1)}
    W = {"a": weights_like(gc)["a"].to(torch.bfloat16)}
    res = init_from_gradients(
        W, gc, None, r=4, lora_alpha=2.0, config=SliceConfig(svd="exact"), adapter_dtype=torch.bfloat16
    )
    assert res.A["a"].dtype == res.B["a"].dtype == torch.bfloat16 == res.weights["a"].dtype
    ref = (W["a"].float() - res.scaling * res.B["a"].float() @ res.A["a"].float()).to(torch.bfloat16)
    assert torch.equal(res.weights["a"], ref)


def test_slice_at_task_one_equals_lora_ga():
    gc, gp = conflicting_pair(sign=-1.0)
    W = weights_like(gc)
    kw = dict(r=4, lora_alpha=2.0)
    a = init_from_gradients(W, gc, None, config=SliceConfig(method="slice"), **kw)
    b = init_from_gradients(W, gc, None, config=SliceConfig(method="lora_ga"), **kw)
    c0 = init_from_gradients(W, gc, gp, config=SliceConfig(method="slice", projection_strength=0.0), **kw)
    empty = init_from_gradients(W, gc, {}, config=SliceConfig(method="slice"), **kw)
    for n in gc:
        for x in (b, c0, empty):
            assert torch.equal(a.A[n], x.A[n]) and torch.equal(a.B[n], x.B[n])
            assert torch.equal(a.weights[n], x.weights[n])


def test_loram_dst_bases_and_variance():
    W = weights_like({"a": torch.zeros(30, 20), "b": torch.zeros(20, 30)})
    r = 4
    res = init_from_gradients(W, None, None, r=r, lora_alpha=2.0, config=SliceConfig(method="loram"))
    for n, w in W.items():
        m, nn_ = w.shape
        A0 = torch.tensor(
            [
                [math.sqrt(2 / (nn_ + 1)) * math.sin((k + 1) * (i + 1) * math.pi / (nn_ + 1)) for i in range(nn_)]
                for k in range(r)
            ],
            dtype=torch.float64,
        )
        B0 = torch.tensor(
            [
                [math.sqrt(2 / (m + 1)) * math.sin((i + 1) * (k + 1) * math.pi / (m + 1)) for k in range(r)]
                for i in range(m)
            ],
            dtype=torch.float64,
        )
        rho = math.log(r) / math.log(min(m, nn_))
        beta = (rho * float(torch.var(w.double().reshape(-1))) / dense_var(B0, A0)) ** 0.25
        torch.testing.assert_close(res.A[n].double(), beta * A0, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res.B[n].double(), beta * B0, rtol=1e-6, atol=1e-7)


def test_lora_baseline_is_peft_default():
    W = weights_like({"a": torch.zeros(30, 20)})
    res = init_from_gradients(W, None, None, r=4, lora_alpha=2.0, config=SliceConfig(method="lora", seed=3))
    assert torch.equal(res.B["a"], torch.zeros(30, 4))
    assert res.A["a"].abs().max() <= 1 / math.sqrt(20) and res.A["a"].std() > 0.2 / math.sqrt(20)
    assert torch.equal(res.weights["a"], W["a"])
    again = init_from_gradients(W, None, None, r=4, lora_alpha=2.0, config=SliceConfig(method="lora", seed=3))
    assert torch.equal(res.A["a"], again.A["a"])  # seeded per layer, not from the global RNG


def test_zero_gradient_layer_gets_vanilla_init_and_warning():
    gc = {"a": gapped(30, 20, spectra(20), seed=1), "z": torch.zeros(20, 30, dtype=torch.float64)}
    W = weights_like(gc)
    with pytest.warns(UserWarning, match="exactly zero gradient"):
        res = init_from_gradients(W, gc, None, r=4, lora_alpha=2.0, config=SliceConfig())
    assert torch.equal(res.B["z"], torch.zeros(20, 4)) and res.A["z"].abs().sum() > 0
    assert torch.equal(res.weights["z"], W["z"])
    assert not torch.equal(res.weights["a"], W["a"])


@pytest.mark.parametrize("where", ["g_cur", "g_prev"])
def test_non_finite_gradient_names_layer_and_modifies_nothing(where):
    gc, gp = conflicting_pair(sign=-1.0)
    bad = gc if where == "g_cur" else gp
    bad["l2"][3, 4] = float("nan")
    before = {n: t.clone() for n, t in gc.items()}
    with pytest.raises(NonFiniteGradientError, match="'l2'") as ei:
        init_from_gradients(weights_like(gc), gc, gp, r=2, lora_alpha=2.0, config=SliceConfig(), inplace_gradients=True)
    assert ei.value.layer == "l2"
    assert ("replay" in ei.value.source) == (where == "g_prev")
    for n in gc:  # bit for bit, NaN included: the in-place surgery never ran
        torch.testing.assert_close(gc[n], before[n], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("method", ["slice", "lora_ga", "loram"])
def test_rank_too_large_names_layer(method):
    gc = layers([(40, 24), (10, 40)])
    W = weights_like(gc)
    r = 6 if method != "loram" else 11
    with pytest.raises(SliceInitError, match=r"'l1'.*\(10, 40\)"):
        init_from_gradients(W, gc, None, r=r, lora_alpha=2.0, config=SliceConfig(method=method))


def test_lora_baseline_accepts_any_rank_as_peft():
    W = weights_like({"a": torch.zeros(6, 10)})
    res = init_from_gradients(W, None, None, r=8, lora_alpha=2.0, config=SliceConfig(method="lora"))
    assert res.A["a"].shape == (8, 10) and torch.equal(res.B["a"], torch.zeros(6, 8))
    assert torch.equal(res.weights["a"], W["a"])


def test_replay_for_other_layers_is_refused():
    gc, gp = conflicting_pair()
    gp["extra"] = gp.pop("l1")
    with pytest.raises(SliceInitError, match=r"replay gradients.*missing \['l1'\].*extra \['extra'\]"):
        init_from_gradients(weights_like(gc), gc, gp, r=2, lora_alpha=2.0, config=SliceConfig())


def test_surgery_overflow_is_reported_not_factorized():
    gc = {"a": torch.full((8, 6), 1e30, dtype=torch.float32)}
    gp = {"a": torch.full((8, 6), -1e-20, dtype=torch.float32)}  # D < 0, N_p ≈ 5e-39: γ ≈ 2e49
    with pytest.raises(NonFiniteGradientError, match="surgery result"):
        init_from_gradients(weights_like(gc), gc, gp, r=2, lora_alpha=2.0, config=SliceConfig(eps=0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_is_exact_where_the_fast_sum_is_not(dtype):
    """all_finite (the surgery's and the gradient collection's check) answers from a sum when it can: a sum of
    finite entries that overflows must not count as non-finite, and +Inf with -Inf (a NaN sum) must."""
    from slice_kernels.slice_init import all_finite

    big = torch.finfo(dtype).max
    x = torch.zeros(5, 7, dtype=dtype)
    assert all_finite(x) and all_finite(torch.empty(0, 3, dtype=dtype))
    x[1, 2], x[3, 4] = big, big  # finite entries, an infinite sum
    assert not math.isfinite(float(x.sum())) and all_finite(x)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        y = x.clone()
        y.view(-1)[: len(bad)] = torch.tensor(bad, dtype=dtype)
        assert not all_finite(y), bad


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_zero_replay_gradient_with_eps_zero_and_positive_tau(scope):
    """τ > 0 gates the surgery on for cos = 0; with ε = 0 and a zero replay gradient, γ = −c·0/0 must be 0
    (nothing to project out), not a ZeroDivisionError."""
    gc, gp = conflicting_pair(sign=-1.0)
    gp["l1"] = torch.zeros_like(gp["l1"])
    if scope == "global":
        gp = {n: torch.zeros_like(t) for n, t in gp.items()}
    res, gt, _ = run(gc, gp, projection_scope=scope, eps=0.0, conflict_threshold=0.5)
    assert res.report.layers["l1"]["gamma"] == 0.0
    assert torch.equal(gt["l1"], gc["l1"])
    if scope == "per_module":  # the other layers still get their own γ = −D/N_p
        D = float((gc["l0"] * gp["l0"]).sum())
        assert res.report.layers["l0"]["gamma"] == pytest.approx(-D / float((gp["l0"] ** 2).sum()), rel=1e-12)


def test_parameters_as_weights_give_plain_tensors():
    """Passing the model's nn.Parameters (not detached) is natural: the absorbed W and the factors come back as
    plain tensors with no autograd history, and the parameters are untouched."""
    lin = torch.nn.Linear(12, 20)
    w0 = lin.weight.detach().clone()
    gc = {"a": gapped(20, 12, spectra(12), seed=4).float()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Converting a tensor with requires_grad=True to a scalar"
        res = init_from_gradients({"a": lin.weight}, gc, None, r=2, lora_alpha=2.0, config=SliceConfig())
    for t in (res.weights["a"], res.A["a"], res.B["a"]):
        assert not t.requires_grad and t.grad_fn is None
    assert torch.equal(lin.weight, w0)
    torch.testing.assert_close(res.weights["a"] + res.scaling * res.B["a"] @ res.A["a"], w0, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("method", ["slice", "lora_ga", "loram", "lora"])
def test_non_finite_weight_names_layer_and_modifies_nothing(method, bad):
    """A NaN/Inf weight used to give NaN factors (the variance scale reads Var(W)); now every method refuses it
    up front, naming the layer, with the inputs untouched (the in-place surgery never ran)."""
    gc, gp = conflicting_pair(sign=-1.0)
    W = weights_like(gc)
    W["l1"][2, 3] = bad
    before = {n: t.clone() for n, t in gc.items()}
    with pytest.raises(SliceInitError, match=r"layer 'l1': the weight has non-finite .*model's weights are non-finite"):
        init_from_gradients(W, gc, gp, r=2, lora_alpha=2.0, config=SliceConfig(method=method), inplace_gradients=True)
    assert all(torch.equal(gc[n], before[n]) for n in gc)
