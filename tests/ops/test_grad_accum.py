"""grad_accumulate: every backend against float64 (SPEC §1 steps 1–2), the hook and the pinned offload."""

import pytest
import torch

from slice_kernels import dispatch
from slice_kernels.ops import grad_accum
from tests.helpers import backends_for


@pytest.mark.parametrize("backend", backends_for("grad_accumulate"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_matches_float64(backend, dtype):
    g = torch.Generator().manual_seed(0)
    acc0 = torch.randn(67, 45, generator=g)  # 3015 elements: not a multiple of any block
    grads = [torch.randn(67, 45, generator=g).to(dtype) for _ in range(3)]
    exact = acc0.double() + sum(0.125 * x.double() for x in grads)
    ref = acc0.clone()
    for x in grads:
        grad_accum.grad_accumulate_torch(ref, x, 0.125)
    torch_err = (ref.double() - exact).abs().max().item()
    acc = acc0.clone()
    with dispatch.use_backend(backend):
        for x in grads:
            grad_accum.accumulate_(acc, x, 0.125)
    assert (acc.double() - exact).abs().max().item() <= 2 * torch_err + 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_rounds_product_then_sum(dtype):
    """The cpp kernel (its SSE or AVX2 copy, whichever the CPU runs) rounds alpha*g, then the sum, never a
    fused multiply-add: the collected gradients keep the same bits on every x86 machine. 70001 elements leave
    a remainder after every vector width."""
    why = dispatch.refusal("grad_accumulate", "cpp", torch.device("cpu"))
    if why:
        pytest.skip(why)
    g = torch.Generator().manual_seed(1)
    acc = torch.randn(70001, generator=g)
    grad = torch.randn(70001, generator=g).to(dtype)
    alpha = 0.1  # not a power of two: the product rounds
    expected = acc + grad.float() * torch.tensor(alpha, dtype=torch.float32)
    with dispatch.use_backend("cpp"):
        grad_accum.accumulate_(acc, grad, alpha)
    assert torch.equal(acc, expected)


def test_accumulator_picks_the_backend_once():
    acc = torch.zeros(4, 3)
    with dispatch.use_backend("torch"):
        add = grad_accum.accumulator("cpu")
    assert add is grad_accum.grad_accumulate_torch
    add(acc, torch.ones(4, 3), 0.5)
    assert bool((acc == 0.5).all())


def test_accumulate_rejects_bad_accumulators_before_writing():
    acc = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="float32"):
        grad_accum.accumulate_(acc.double(), torch.ones(4, 3))
    with pytest.raises(ValueError, match="shape"):
        grad_accum.accumulate_(acc, torch.ones(3, 4))
    assert bool((acc == 0).all())


def test_hook_accumulates_and_releases_grad():
    lin = torch.nn.Linear(6, 5, bias=False)
    acc = torch.zeros(5, 6)
    lin.weight.register_post_accumulate_grad_hook(grad_accum.accumulate_hook(acc, alpha=0.5))
    x = torch.randn(3, 6)
    lin(x).sum().backward()
    assert lin.weight.grad is None
    expected = 0.5 * torch.ones(5, 1) * x.sum(0, keepdim=True)
    torch.testing.assert_close(acc, expected)


def test_hook_accepts_conv1d_orientation():
    w = torch.nn.Parameter(torch.randn(6, 5))  # Conv1D stores (in, out)
    acc = torch.zeros(5, 6)
    w.register_post_accumulate_grad_hook(grad_accum.accumulate_hook(acc, alpha=0.5))
    x = torch.randn(2, 6)
    (x @ w).pow(2).sum().backward()
    assert w.grad is None
    ref = 0.5 * (x.T @ (2 * (x @ w.detach()))).T  # dL/dw is (in, out); the accumulator holds its transpose
    torch.testing.assert_close(acc, ref)


def test_pinned_offload_on_cpu_copies_and_guards_names():
    off = grad_accum.PinnedOffload()
    a = torch.randn(3, 2)
    off.offload("a", a)
    with pytest.raises(ValueError, match="already offloaded"):
        off.offload("a", a)
    out = off.wait()
    assert torch.equal(out["a"], a) and out["a"].data_ptr() != a.data_ptr()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_accumulate_and_offload_on_gpu(backend):
    acc = torch.randn(1025, 999, device="cuda")
    grad = torch.randn(1025, 999, device="cuda", dtype=torch.bfloat16)
    exact = acc.double() + 0.5 * grad.double()
    with dispatch.use_backend(backend):
        grad_accum.accumulate_(acc, grad, 0.5)
    assert (acc.double() - exact).abs().max().item() <= 2 * 2.0**-24 * exact.abs().max().item()
    off = grad_accum.PinnedOffload()
    off.offload("w", acc)
    out = off.wait()["w"]
    assert out.is_pinned() and torch.equal(out, acc.cpu())
