"""conflict_stats and surgery_: every backend against the float64 torch reference (SPEC §1 steps 3–4)."""

import pytest
import torch

from slice_kernels import dispatch
from slice_kernels.errors import InvalidArgumentError
from slice_kernels.ops import conflict
from tests.helpers import backends_for

# Not multiples of any block or chunk; m ≠ n; a 1×1 layer; one layer spanning several Triton chunks.
SHAPES = [(37, 53), (300, 7), (1, 1), (129, 65)]


def _grads(seed, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cur = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    # correlated replay gradients, so D has both signs across layers and partly cancels
    prev = [(0.3 * c.float() + torch.randn(s, generator=g)).to(dtype) for c, s in zip(cur, shapes)]
    return cur, prev


def _ref64(cur, prev):
    return conflict.conflict_stats_torch(
        [c.double() for c in cur], None if prev is None else [p.double() for p in prev]
    )


@pytest.mark.parametrize("backend", backends_for("conflict_stats"))
@pytest.mark.parametrize("with_prev", [True, False])
def test_conflict_stats_matches_float64(backend, with_prev):
    cur, prev = _grads(0)
    prev = prev if with_prev else None
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev)
    ref = _ref64(cur, prev)
    assert got.dtype == torch.float64 and got.shape == (len(cur), 3)
    # float32 inputs, float64 products (exact) and sums: only float64 rounding remains
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    if not with_prev:
        assert bool((got[:, :2] == 0).all())


@pytest.mark.parametrize("backend", backends_for("conflict_stats"))
def test_conflict_stats_relative_1e10_on_a_large_input(backend):
    # 4M elements for the native/torch backends (≈1 s); the interpreted Triton kernel gets 32K.
    n = 1 << 22 if backend != "triton" else 1 << 15
    g = torch.Generator().manual_seed(1)
    cur = [torch.randn(n // 4, 4, generator=g) + 0.01, torch.randn(1000, 3, generator=g)]
    prev = [-0.999 * cur[0] + 1e-3 * torch.randn(n // 4, 4, generator=g), torch.randn(1000, 3, generator=g)]
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev).sum(0)
    ref = _ref64(cur, prev).sum(0)
    rel = ((got - ref).abs() / ref.abs()).max().item()
    assert rel <= 1e-10, rel


def _issue_size_pair(device):
    """100.6M float32 elements over five layers of Llama-3-8B shapes (one MLP, q, o, k, v; each one row or
    column short, so no size is a multiple of a block): the MLP pair is independent, so D ≈ √n is a near-total
    cancellation of terms summing to ≈ n in magnitude, where float32 partials would keep no correct digit; the
    attention pairs are anti-correlated (a real conflict)."""
    g = torch.Generator().manual_seed(7)
    shapes = [(14335, 4096), (4095, 4096), (4096, 4095), (1023, 4096), (1024, 4095)]
    cur = [torch.randn(s, generator=g) for s in shapes]
    prev = [torch.randn(shapes[0], generator=g)]
    prev += [torch.randn(s, generator=g).mul_(0.5).sub_(c) for c, s in zip(cur[1:], shapes[1:])]
    assert sum(c.numel() for c in cur) >= 100_000_000
    return [c.to(device) for c in cur], [p.to(device) for p in prev]


def _compensated_ref(cur, prev):
    """Float64 reference independent of every backend's summation order: float32 × float32 products are exact
    in float64, each 64K-element block is summed in float64, and the block sums are added exactly (fsum)."""
    import math

    rows = []
    for c, p in zip(cur, prev):
        cf, pf = c.reshape(-1), p.reshape(-1)
        parts = ([], [], [])
        for s in range(0, cf.numel(), 1 << 16):
            c64, p64 = cf[s : s + (1 << 16)].double(), pf[s : s + (1 << 16)].double()
            for acc, (x, y) in zip(parts, ((c64, p64), (p64, p64), (c64, c64))):
                acc.append(float(torch.dot(x, y)))
        rows.append([math.fsum(a) for a in parts])
    return torch.tensor(rows, dtype=torch.float64)


def _assert_issue_accuracy(got, ref):
    # per layer and for the global sums γ is computed from; 1e-10 relative is issue 4's bound
    for name, a, b in (("per layer", got, ref), ("global", got.sum(0), ref.sum(0))):
        rel = ((a - b).abs() / b.abs()).max().item()
        assert rel <= 1e-10, f"{name}: max relative error {rel:.2e}"


@pytest.mark.parametrize(
    "backend", [p for p in backends_for("conflict_stats") if p.values[0] not in ("torch", "triton")]
)
def test_conflict_stats_relative_1e10_on_100m_elements(backend):
    # Issue 4's accuracy bound at its size. torch is the float64 reference itself, and the interpreted Triton
    # kernel would take hours here (its summation scheme is checked at 32K above and at this size on a GPU).
    cur, prev = _issue_size_pair("cpu")
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev)
    _assert_issue_accuracy(got, _compensated_ref(cur, prev))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_conflict_stats_relative_1e10_on_100m_elements(backend):
    cur, prev = _issue_size_pair("cuda")
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev).cpu()
    _assert_issue_accuracy(got, _compensated_ref([c.cpu() for c in cur], [p.cpu() for p in prev]))


def test_conflict_stats_converts_non_float32_inputs():
    cur, prev = _grads(2, dtype=torch.bfloat16)
    got = conflict.conflict_stats(cur, prev)  # default backend (cpp when built)
    torch.testing.assert_close(got, _ref64(cur, prev), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", backends_for("surgery"))
def test_surgery_matches_float64(backend):
    cur, prev = _grads(3)
    gammas = torch.tensor([0.7, 0.0, -1.3, 2.5], dtype=torch.float64)
    exact = [c.double() + g * p.double() for c, p, g in zip(cur, prev, gammas.tolist())]
    torch_err = max(
        ((c.clone().add_(p, alpha=g)).double() - e).abs().max().item()
        for c, p, g, e in zip(cur, prev, gammas.tolist(), exact)
    )
    work = [c.clone() for c in cur]
    with dispatch.use_backend(backend):
        conflict.surgery_(work, prev, gammas)
    for w, c, e, g in zip(work, cur, exact, gammas.tolist()):
        if g == 0.0:
            assert torch.equal(w, c)
        else:
            assert (w.double() - e).abs().max().item() <= 2 * torch_err


@pytest.mark.parametrize("backend", backends_for("surgery"))
def test_surgery_updates_non_contiguous_and_bf16_in_place(backend):
    base = torch.randn(40, 30)
    cur = [base.t(), torch.randn(33, 5).to(torch.bfloat16)]  # a transposed view and a bf16 tensor
    prev = [torch.randn(30, 40), torch.randn(33, 5)]
    ref = [c.double() + 0.5 * p.double() for c, p in zip(cur, prev)]
    with dispatch.use_backend(backend):
        conflict.surgery_(cur, prev, [0.5, 0.5])
    assert (base.t().double() - ref[0]).abs().max() < 1e-5  # the view's storage was updated
    assert (cur[1].double() - ref[1]).abs().max() < 0.05  # bf16 rounding


def test_errors_name_the_tensor_and_modify_nothing():
    cur, prev = _grads(4)
    before = [c.clone() for c in cur]
    with pytest.raises(ValueError, match="tensor 1"):
        conflict.surgery_(cur, prev[:1] + [torch.zeros(2, 2)] + prev[2:], [1.0] * 4)
    with pytest.raises(ValueError, match="one gamma per layer"):
        conflict.surgery_(cur, prev, [1.0, 2.0])
    with pytest.raises(ValueError, match="as many replay tensors"):
        conflict.conflict_stats(cur, prev[:2])
    assert all(torch.equal(a, b) for a, b in zip(cur, before))


@pytest.mark.parametrize("backend", backends_for("surgery"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_surgery_refuses_a_non_finite_gamma_and_modifies_nothing(backend, bad):
    """A NaN/Inf γ used to be written into the gradients (NaN·0 is NaN, so even zero entries broke)."""
    cur, prev = _grads(6)
    before = [c.clone() for c in cur]
    with dispatch.use_backend(backend), pytest.raises(InvalidArgumentError, match=rf"gammas\[2\] = {bad}"):
        conflict.surgery_(cur, prev, [0.5, 0.0, bad, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(cur, before))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_match_the_float64_reference_on_gpu(backend):
    cur, prev = _grads(5, shapes=SHAPES + [(4096, 1031)])
    cur, prev = [c.cuda() for c in cur], [p.cuda() for p in prev]
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev).cpu()
        torch.testing.assert_close(got, _ref64([c.cpu() for c in cur], [p.cpu() for p in prev]), rtol=1e-12, atol=1e-12)
        gam = torch.tensor([0.7, 0.0, -1.3, 2.5, 0.1], dtype=torch.float64)
        exact = [c.double() + g * p.double() for c, p, g in zip(cur, prev, gam.tolist())]
        conflict.surgery_(cur, prev, gam)
    for w, e in zip(cur, exact):
        assert (w.double() - e).abs().max().item() <= 2 * 2.0**-24 * e.abs().max().item()


@pytest.mark.parametrize("backend", backends_for("conflict_stats"))
def test_float64_inputs_keep_float64_accuracy(backend):
    # float32 loads would round these values; the float64 path must give the exact float64 sums
    torch.manual_seed(5)
    cur = [torch.randn(37, 29, dtype=torch.float64) * (1 + 1e-12)]
    prev = [torch.randn(37, 29, dtype=torch.float64)]
    ref = torch.stack([(cur[0] * prev[0]).sum(), (prev[0] ** 2).sum(), (cur[0] ** 2).sum()])
    with dispatch.use_backend(backend):
        got = conflict.conflict_stats(cur, prev)[0]
    torch.testing.assert_close(got, ref, rtol=1e-14, atol=0)
