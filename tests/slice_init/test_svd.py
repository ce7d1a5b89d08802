"""Randomized truncated SVD (SPEC §1 step 5) against the exact SVD, through init_from_gradients:
on matrices with a spectral gap and on real gradients of a tiny Llama."""

import pytest
import torch

from slice_kernels import SliceConfig, collect_gradients, dispatch, init_from_gradients
from slice_kernels.ops import rsvd
from tests.helpers import lm_batches, tiny_llama


def with_gap(m, n, k, gap, seed):
    """Top-k singular values 1.0 … 0.9, the rest ≤ 1/gap of that and decaying."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    top = torch.linspace(1.0, 0.9, k, dtype=torch.float64)
    tail = (0.9 / gap) * 0.97 ** torch.arange(min(m, n) - k, dtype=torch.float64)
    return (U * torch.cat([top, tail])) @ V.T


def top_k(G, k, how, niter=4, q=None, seed=0):
    G = G.float().unsqueeze(0)
    if how == "exact":
        return rsvd.exact_svd(G, k)
    omega = rsvd.sketch([rsvd.layer_seed(seed, "x")], G.shape[-1], q or min(2 * k, min(G.shape[-2:])), "cpu")
    return rsvd.randomized_svd(G, omega, k, niter)


def subspace_sin(U1, U2):
    """sin of the largest principal angle between span(U1) and span(U2): ‖(I − U2U2ᵀ)U1‖₂ (linear in the
    error, unlike √(1 − cos²), which turns float32 round-off of 1e-7 into 5e-4)."""
    U1, U2 = U1.double(), U2.double()
    return float(torch.linalg.matrix_norm(U1 - U2 @ (U2.T @ U1), ord=2))


@pytest.mark.parametrize("m, n", [(120, 70), (70, 120)])
def test_randomized_matches_exact_with_spectral_gap(m, n):
    k = 8
    G = with_gap(m, n, k, gap=10.0, seed=m)
    Ue, Se, Ve = top_k(G, k, "exact")
    Ur, Sr, Vr = top_k(G, k, "randomized")
    torch.testing.assert_close(Sr, Se, rtol=1e-5, atol=0)
    # the top-k block is clustered (1.0 … 0.9), so compare subspaces, then the sign convention per vector
    assert subspace_sin(Ur[0], Ue[0]) < 1e-4 and subspace_sin(Vr[0], Ve[0]) < 1e-4
    cos = (Ur[0] * Ue[0]).sum(0)
    assert (cos > 0.99).all()  # same vectors with the same sign: the convention makes them reproducible


def test_power_iterations_matter_without_gap():
    """Sanity of the comparison itself: with a flat spectrum and no power iterations the sketch is visibly
    worse than with 4, so the test above would notice a broken power loop."""
    G = with_gap(120, 70, 8, gap=1.2, seed=3)
    Ue, _, _ = top_k(G, 8, "exact")
    err0 = subspace_sin(top_k(G, 8, "randomized", niter=0)[0][0], Ue[0])
    err4 = subspace_sin(top_k(G, 8, "randomized", niter=4)[0][0], Ue[0])
    assert err4 < 0.5 * err0


def test_randomized_vs_exact_on_real_gradients():
    """Real gradients of a tiny Llama have no designed gap: the randomized factorization must capture the
    top-2r energy as well as the exact one (relative tail error within 1%) and the leading singular values."""
    model = tiny_llama()
    g = collect_gradients(model, ["q_proj", "down_proj", "v_proj"], lm_batches(2), steps=2)
    r = 4
    for name, G in g.items():
        Ue, Se, Ve = top_k(G, 2 * r, "exact")
        q = min(4 * r, min(G.shape))
        Ur, Sr, Vr = top_k(G, 2 * r, "randomized", q=q, seed=1)
        Gd = G.double()
        best = (Gd - Ue[0].double() @ torch.diag(Se[0].double()) @ Ve[0].double().T).norm()
        got = (Gd - Ur[0].double() @ (Ur[0].double().T @ Gd)).norm()
        assert got <= 1.01 * best, (name, float(got), float(best))
        torch.testing.assert_close(Sr[0, :r], Se[0, :r], rtol=1e-2, atol=0)


def test_sketch_is_seeded_per_layer_not_global_rng():
    a = rsvd.sketch([rsvd.layer_seed(0, "layer.a"), rsvd.layer_seed(0, "layer.b")], 30, 6, "cpu")
    torch.manual_seed(123)
    torch.randn(10)
    b = rsvd.sketch([rsvd.layer_seed(0, "layer.a"), rsvd.layer_seed(0, "layer.b")], 30, 6, "cpu")
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])
    assert not torch.equal(a, rsvd.sketch([rsvd.layer_seed(1, "layer.a"), rsvd.layer_seed(1, "layer.b")], 30, 6, "cpu"))


def test_init_exact_and_randomized_agree_on_gapped_gradients():
    gc = {"a": with_gap(60, 40, 8, gap=20.0, seed=1), "b": with_gap(40, 60, 8, gap=20.0, seed=2)}
    W = {n: 0.02 * torch.randn(*t.shape) for n, t in gc.items()}
    kw = dict(r=4, lora_alpha=2.0)
    with dispatch.use_backend("torch"):
        ex = init_from_gradients(W, gc, None, config=SliceConfig(svd="exact", scale="unit"), **kw)
        rn = init_from_gradients(W, gc, None, config=SliceConfig(svd="randomized", scale="unit"), **kw)
    for n in gc:
        # the top block is clustered: compare the slices' spans
        assert subspace_sin(rn.B[n], ex.B[n]) < 1e-3 and subspace_sin(rn.A[n].T, ex.A[n].T) < 1e-3


def test_init_sketch_is_seeded_by_seed_and_layer_name():
    """The randomized SVD inside init_from_gradients draws each layer's sketch from (seed, layer name): the same
    layer gives the same factors whatever other layers are batched with it, its position and the global RNG;
    another name or seed gives another sketch (visible with no power iteration on a flat spectrum)."""
    g = torch.Generator().manual_seed(0)
    G = {n: torch.randn(30, 20, generator=g) for n in ("a", "b")}
    W = {n: 0.02 * torch.randn(30, 20, generator=g) for n in G}
    cfg = SliceConfig(method="lora_ga", svd_niter=0, scale="unit")
    kw = dict(r=2, lora_alpha=2.0, config=cfg)
    with dispatch.use_backend("torch"):
        torch.manual_seed(1)
        both = init_from_gradients(W, G, None, **kw)
        torch.manual_seed(2)
        alone = init_from_gradients({"b": W["b"]}, {"b": G["b"]}, None, **kw)
        renamed = init_from_gradients({"c": W["b"]}, {"c": G["b"]}, None, **kw)
        reseeded = init_from_gradients(
            {"b": W["b"]},
            {"b": G["b"]},
            None,
            r=2,
            lora_alpha=2.0,
            config=SliceConfig(method="lora_ga", svd_niter=0, scale="unit", seed=5),
        )
    assert torch.equal(both.A["b"], alone.A["b"]) and torch.equal(both.B["b"], alone.B["b"])
    assert not torch.allclose(renamed.A["c"], alone.A["b"], atol=1e-3)
    assert not torch.allclose(reseeded.A["b"], alone.A["b"], atol=1e-3)
