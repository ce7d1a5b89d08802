"""The measuring tools in benches/ that a recorded conclusion rests on (not the benchmarks' timings)."""

import importlib.util
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benches", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tf32_rounding_keeps_10_mantissa_bits_round_to_nearest():
    """docs/init_kernels.md's TF32 conclusion rests on this emulation: 10 mantissa bits, nearest, ties away."""
    em = _load("rsvd_tf32_emulation")
    u = 2.0**-10  # TF32's unit in the last place at 1
    x = torch.tensor([1.0, 1 + u, 1 + u / 2, 1 + u / 4, 1 + 3 * u / 4, -(1 + u / 2), 0.0])
    want = torch.tensor([1.0, 1 + u, 1 + u, 1.0, 1 + u, -(1 + u), 0.0])
    assert torch.equal(em.round_tf32(x), want)
    big = em.round_tf32(torch.tensor([3.0e38])).item()  # rounds within half a TF32 ulp, no overflow
    assert abs(big - 3.0e38) <= 3.0e38 * 2.0**-11
    assert em.round_tf32(torch.tensor([1.0 + u / 8], dtype=torch.float64)).item() == 1.0 + u / 8  # float64 untouched


def test_tf32_emulation_counts_products_and_restores_matmul():
    em = _load("rsvd_tf32_emulation")
    a = torch.full((2, 2), 1 + 2.0**-12)
    exact = a @ a
    with em.emulated_tf32(first=1):
        first = a @ a  # rounded operands: 1·1·2
        second = torch.matmul(a, a)  # past `first`: float32
    assert torch.equal(first, torch.full((2, 2), 2.0)) and torch.equal(second, exact)
    assert torch.Tensor.__matmul__ is em._matmul and torch.matmul is em._torch_matmul


def test_tf32_emulation_covers_the_tensor_matmul_method():
    """torch.svd_lowrank forms its U as ``Q.matmul(U)`` (torch/_lowrank.py), the method rather than ``@`` or
    ``torch.matmul``: its "svd_lowrank tf32" column is TF32 throughout only if the method is rounded too."""
    em = _load("rsvd_tf32_emulation")
    a = torch.full((2, 2), 1 + 2.0**-12)
    with em.emulated_tf32():
        method = a.matmul(a)
    with em.emulated_tf32(first=1):
        counted = a.matmul(a)  # the first product, whichever entry point
        past = a @ a
    assert torch.equal(method, torch.full((2, 2), 2.0)) and torch.equal(counted, method)
    assert torch.equal(past, a.matmul(a)) and torch.Tensor.matmul is em._tensor_matmul
