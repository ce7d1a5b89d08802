"""PS-LoRA magnitude merge (SPEC §3): every backend against the float64 reference, ties, in-place merging."""

import pytest
import torch

from slice_kernels import dispatch, magnitude_merge
from slice_kernels.errors import InvalidArgumentError, InvalidTypeError
from slice_kernels.ops.magnitude_merge import reference_magnitude_merge
from tests.helpers import backends_for

SHAPES = [(37, 53, [1, 3]), (70, 45, [8, 8, 2]), (65, 64, [64, 1])]  # awkward; r = 1 and r = n (its max)


def _updates(m, n, ranks, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, r, generator=g, dtype=dtype), torch.randn(r, n, generator=g, dtype=dtype), 0.5 + k)
        for k, r in enumerate(ranks)
    ]


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-r{'-'.join(map(str, s[2]))}")
def test_factor_merge_matches_reference(backend, shape):
    m, n, ranks = shape
    ups = _updates(m, n, ranks)
    ref = reference_magnitude_merge(ups)
    f64 = backend in ("torch", "cpp")
    if not f64:  # triton/cuda compute in float32; compare with the reference of the float32-rounded inputs
        ups = [(B.float(), A.float(), s) for B, A, s in ups]
        ref = reference_magnitude_merge(ups)
    with dispatch.use_backend(backend):
        out = magnitude_merge(ups)
    # Entries whose top two magnitudes are closer than the arithmetic's rounding may pick either task; none
    # are that close at these sizes, so the comparison is entrywise.
    tol = 1e-12 if f64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
def test_ties_go_to_the_earliest_task(backend):
    m, n = 33, 41
    B, A, _ = _updates(m, n, [3])[0]
    if backend == "triton":
        B, A = B.float(), A.float()
    # task 2 = −task 1 exactly: every entry ties in magnitude, so the merge must equal task 1
    with dispatch.use_backend(backend):
        out = magnitude_merge([(B, A, 1.0), (-B, A, 1.0)])
        out2 = magnitude_merge([(-B, A, 1.0), (B, A, 1.0)])
    expect = B.double() @ A.double()
    tol = 1e-12 if backend in ("torch", "cpp") else 1e-5  # triton: float32 products
    torch.testing.assert_close(out.double(), expect, rtol=tol, atol=tol)
    torch.testing.assert_close(out2.double(), -expect, rtol=tol, atol=tol)


def test_dense_and_mixed_inputs_and_ties():
    ups = _updates(21, 19, [2, 3], seed=4)
    dense = [s * B @ A for B, A, s in ups]
    torch.testing.assert_close(magnitude_merge(dense), reference_magnitude_merge(ups))
    torch.testing.assert_close(magnitude_merge([dense[0], ups[1]]), reference_magnitude_merge(ups))
    assert torch.equal(magnitude_merge([dense[0], -dense[0]]), dense[0])


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_into_adds_in_place(backend, wdtype):
    m, n = 45, 70
    ups = [(B.float(), A.float(), s) for B, A, s in _updates(m, n, [4, 2], seed=2)]
    W = torch.randn(m, n).to(wdtype)
    W0 = W.clone()
    ptr = W.data_ptr()
    with dispatch.use_backend(backend):
        out = magnitude_merge(ups, into=W)
    assert out is W and W.data_ptr() == ptr
    expect = W0.double() + reference_magnitude_merge(ups)
    # bf16: one rounding of the sum in W's dtype, as plain torch's W += merged would do
    tol = 1e-5 if wdtype == torch.float32 else 2**-7
    torch.testing.assert_close(W.double(), expect, rtol=tol, atol=tol * float(expect.abs().max()))


def test_into_a_transposed_view_conv1d_style():
    m, n = 30, 50
    ups = [(B.float(), A.float(), s) for B, A, s in _updates(m, n, [3, 5], seed=6)]
    storage = torch.randn(n, m)  # Conv1D keeps Wᵀ; the (out, in) view is storage.T
    before = storage.clone()
    magnitude_merge(ups, into=storage.T)
    torch.testing.assert_close(
        storage.T.double(), before.T.double() + reference_magnitude_merge(ups), rtol=1e-5, atol=1e-5
    )


def test_bad_inputs_are_refused():
    ups = _updates(10, 12, [2, 2])
    with pytest.raises(ValueError, match="non-empty list"):
        magnitude_merge([])
    with pytest.raises(ValueError, match="update 1 is 10×11"):
        magnitude_merge([ups[0], (ups[1][0], ups[1][1][:, :11])])
    with pytest.raises(ValueError, match="into has shape"):
        magnitude_merge(ups, into=torch.zeros(12, 10))
    form = r"each update must be a \(B, A, scaling\) factor tuple .* or a dense m×n tensor"
    with pytest.raises(TypeError, match=f"update 1 is a str; {form}"):
        magnitude_merge([ups[0], "x"])
    with pytest.raises(TypeError, match=f"update 0 is a list of int and int; {form}"):
        magnitude_merge([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match=f"update 1 has scaling 'big'; {form}"):
        magnitude_merge([ups[0], (ups[1][0], ups[1][1], "big")])
    with pytest.raises(TypeError, match=f"update 1 is a tuple of length 4; {form}"):
        magnitude_merge([ups[0], (*ups[1], 0)])
    W = torch.zeros(10, 12)
    with pytest.raises(ValueError):
        magnitude_merge([ups[0], (ups[1][0].T, ups[1][1])], into=W)
    with pytest.raises(TypeError, match="update 2 is a list of int and int"):
        magnitude_merge([ups[0], ups[1], [1, 2]], into=W)
    assert torch.equal(W, torch.zeros(10, 12))  # validated before anything was written


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_scaling_is_refused_and_modifies_nothing(backend, bad):
    """A NaN/Inf s_k used to reach the merge: NaN wins no comparison and Inf wins every one, so the result was
    silently wrong (or NaN) in W."""
    ups = _updates(10, 12, [2, 3], dtype=torch.float32)
    bad_ups = [ups[0], (ups[1][0], ups[1][1], bad)]
    W = torch.zeros(10, 12)
    with dispatch.use_backend(backend):
        for kw in ({}, {"into": W}):
            with pytest.raises(InvalidArgumentError, match=rf"update 1 has scaling {bad}; .*finite"):
                magnitude_merge(bad_ups, **kw)
        with pytest.raises(InvalidArgumentError, match="update 1 has scaling"):  # mixed with a dense update
            magnitude_merge([ups[0][2] * ups[0][0] @ ups[0][1], bad_ups[1]], into=W)
    assert torch.equal(W, torch.zeros(10, 12))


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_a_non_floating_into_is_refused_on_every_backend(backend, dtype):
    """torch and Triton used to truncate the merged update into an integer W and cpp to fail inside its kernel:
    the public function now refuses it the same way on every backend, before writing."""
    ups = _updates(10, 12, [2, 3], dtype=torch.float32)
    W = torch.ones(10, 12).to(dtype)
    with dispatch.use_backend(backend):
        for u in (ups, [s * B @ A for B, A, s in ups]):  # factors (the backends) and dense (the torch path)
            with pytest.raises(InvalidTypeError, match=rf"into is a {dtype} tensor; .*floating-point"):
                magnitude_merge(u, into=W)
    assert torch.equal(W, torch.ones(10, 12).to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_merge_into_w(backend, wdtype):
    m, n = 300, 257
    ups = [(B.float().cuda(), A.float().cuda(), s) for B, A, s in _updates(m, n, [16, 1, 8], seed=8)]
    W = torch.randn(m, n, device="cuda").to(wdtype)
    expect = W.double() + reference_magnitude_merge(ups)
    with dispatch.use_backend(backend):
        magnitude_merge(ups, into=W)
        out = magnitude_merge(ups)
    tol = 1e-5 if wdtype == torch.float32 else 2**-7
    torch.testing.assert_close(W.double(), expect, rtol=tol, atol=tol * float(expect.abs().max()))
    torch.testing.assert_close(out.double(), reference_magnitude_merge(ups), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_float64_factors_into_a_lower_precision_w(backend, wdtype):
    """float64 factors (e.g. a float64 history) merged into a float32/bf16 weight: every backend accepts what
    the torch backend accepts (the cpp kernel used to refuse it: "float64 factors need a float64 out")."""
    m, n = 37, 53
    ups = _updates(m, n, [3, 2], seed=12)
    if backend not in ("torch", "cpp"):  # triton/cuda compute in float32
        ups_k = [(B.float(), A.float(), s) for B, A, s in ups]
    else:
        ups_k = ups
    W = torch.randn(m, n).to(wdtype)
    expect = W.double() + reference_magnitude_merge(ups_k)
    with dispatch.use_backend(backend):
        magnitude_merge(ups_k, into=W)
    tol = 1e-6 if wdtype == torch.float32 else 2**-8  # one rounding into W's dtype
    torch.testing.assert_close(W.double(), expect, rtol=tol, atol=tol * float(expect.abs().max()))


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
def test_float32_factors_into_a_float64_w(backend):
    """float32 factors into a float64 weight: accepted by every backend (the cpp kernel used to refuse it
    with "out must be float32, float64, ..."); torch and cpp merge in W's float64."""
    m, n = 29, 41
    ups = [(B.float(), A.float(), s) for B, A, s in _updates(m, n, [2, 3], seed=13)]
    W = torch.randn(m, n, dtype=torch.float64)
    expect = W + reference_magnitude_merge(ups)
    with dispatch.use_backend(backend):
        magnitude_merge(ups, into=W)
    tol = 1e-12 if backend in ("torch", "cpp") else 1e-5  # triton/cuda: float32 products
    torch.testing.assert_close(W, expect, rtol=tol, atol=tol * float(expect.abs().max()))


@pytest.mark.parametrize("backend", backends_for("magnitude_merge_factors"))
def test_factors_that_require_grad_and_a_parameter_as_into(backend):
    """Live LoRA factors (requires_grad) and ``into=layer.weight`` itself: the merge is a selection outside
    autograd on every backend (the torch backend used to build a graph, and refused the Parameter with "a leaf
    Variable that requires grad is being used in an in-place operation" where cpp accepted it)."""
    m, n = 21, 34
    ups = [
        (B.float().requires_grad_(True), A.float().requires_grad_(True), s)
        for B, A, s in _updates(m, n, [2, 3], seed=14)
    ]
    ref = reference_magnitude_merge([(B.detach(), A.detach(), s) for B, A, s in ups])
    W = torch.nn.Parameter(torch.randn(m, n))
    W0 = W.detach().clone()
    with dispatch.use_backend(backend):
        out = magnitude_merge(ups)
        magnitude_merge(ups, into=W)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(W.detach().double(), W0.double() + ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
