"""The CUDA build and the CUDA-only paths (reviewer checks that need no GPU, plus GPU-marked ones).

No GPU in CI: what can be checked without one is the build configuration in setup.py and, where nvcc is
installed, the PTX it produces for the kernels.
"""
import ast
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_py():
    """NVCC_FLAGS and _torch_arch_list of setup.py, read without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    ns = {"os": os}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            exec(compile(ast.Module([node], []), "setup.py", "exec"), ns)
        if isinstance(node, ast.FunctionDef) and node.name == "_torch_arch_list":
            exec(compile(ast.Module([node], []), "setup.py", "exec"), ns)
    return ns


def test_nvcc_flags_keep_ieee_float32():
    """--use_fast_math maps tanhf to tanh.approx.f32 (relative error 2^-11): the CUDA sign loss and its
    gradients would miss their 1e-5 contract against the float64 reference."""
    flags = _setup_py()["NVCC_FLAGS"]
    assert not any(f in flags for f in ("--use_fast_math", "-use_fast_math", "--prec-div=false", "-ftz=true"))


def test_arch_list_spelling():
    conv = _setup_py()["_torch_arch_list"]
    assert conv("90;80") == "9.0;8.0"
    assert conv("90a, 86") == "9.0a;8.6"
    assert conv("8.9;9.0+PTX") == "8.9;9.0+PTX"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_sign_loss_ptx_has_no_approximate_tanh(tmp_path):
    """Compile csrc/cuda/sign_loss.cu with setup.py's own nvcc flags: the PTX must use the accurate tanhf
    (no tanh.approx.f32, which the build emitted before NVCC_FLAGS dropped --use_fast_math)."""
    ptx = tmp_path / "sign_loss.ptx"
    cmd = ["nvcc", *_setup_py()["NVCC_FLAGS"], "-arch=sm_90", "-I" + os.path.join(ROOT, "csrc"), "-ptx",
           os.path.join(ROOT, "csrc", "cuda", "sign_loss.cu"), "-o", str(ptx)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    text = ptx.read_text()
    assert "tanh.approx" not in text
    assert ".entry" in text  # the kernels are really in it


@pytest.mark.gpu
def test_cuda_float64_merge_keeps_float64():
    """float64 factors on the GPU (or into= a float64 W): the CUDA kernel stores only f32/bf16/f16, so the
    native wrapper takes the float64 row-block path instead of failing with 'out must be float32, ...'."""
    from slice_kernels import dispatch, magnitude_merge
    from slice_kernels.ops.magnitude_merge import reference_magnitude_merge

    m, n = 70, 45
    g = torch.Generator().manual_seed(9)
    ups = [(torch.randn(m, r, generator=g, dtype=torch.float64).cuda(),
            torch.randn(r, n, generator=g, dtype=torch.float64).cuda(), 0.5 + k) for k, r in enumerate([8, 1, 3])]
    ref = reference_magnitude_merge(ups)
    W = torch.randn(m, n, device="cuda", dtype=torch.float64)
    expect = W + ref
    with dispatch.use_backend("cuda"):
        out = magnitude_merge(ups)
        magnitude_merge(ups, into=W)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W, expect, rtol=1e-12, atol=1e-12)


def _factor_case(m, n, r, R, seed, device, dtype=torch.float32):
    import math

    from slice_kernels import History

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    Bh = torch.randn(m, R, generator=g, dtype=torch.float64)
    Ah = torch.randn(R, n, generator=g, dtype=torch.float64) / math.sqrt(n * R)
    h = History.from_factors([Bh], [Ah], [0.6]).to(device)
    return A.to(device), B.to(device), h


def _check_triton_factor_history(device, m, n, r, R):
    from slice_kernels import dispatch, sign_consistency_loss
    from slice_kernels.ops.sign_loss import reference_sign_consistency_loss

    if dispatch.refusal("sign_loss_fwd", "triton", torch.device(device)):
        pytest.skip(dispatch.refusal("sign_loss_fwd", "triton", torch.device(device)))
    A64, B64, h = _factor_case(m, n, r, R, seed=3, device=device)
    for mode in ("tanh", "hinge"):
        A = A64.float().requires_grad_(True)
        B = B64.float().requires_grad_(True)
        Ar, Br = A.detach().double().requires_grad_(True), B.detach().double().requires_grad_(True)
        ref = reference_sign_consistency_loss(Ar, Br, h, scaling=0.7, beta=0.3, mode=mode)
        rA, rB = torch.autograd.grad(ref, (Ar, Br))
        with dispatch.use_backend("triton"):
            out = sign_consistency_loss(A, B, h, scaling=0.7, beta=0.3, mode=mode)
            gA, gB = torch.autograd.grad(out, (A, B))
        rel = lambda x, y: float((x.double() - y).norm() / y.norm())
        assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item()), mode
        assert rel(gA, rA) <= 1e-5 and rel(gB, rB) <= 1e-5, mode


def test_triton_factor_history_rank_is_chunked():
    """The Triton kernels walk the history rank R in chunks (16 under the interpreter): R = 40 takes three,
    the last one ragged; the result must match the float64 reference as for R ≤ one chunk."""
    _check_triton_factor_history("cpu", 37, 45, 4, 40)


@pytest.mark.gpu
def test_triton_factor_history_of_many_tasks_on_gpu():
    """R = 10 tasks × 2r (r = 32) = 640: before the rank was chunked, one (64, 1024) × (1024, 64) dot per tile
    needed more registers/shared memory than an SM has and the kernel did not compile."""
    _check_triton_factor_history("cuda", 300, 257, 32, 640)


@pytest.mark.gpu
@pytest.mark.parametrize("q", [37, 256, 300])  # q > 256 = the kernel's threads: strided diagonal reductions
def test_cuda_cholesky_kernel_matches_the_cpp_kernel(q):
    """csrc/cuda/rsvd.cu runs the algorithm of csrc/cpu/rsvd.cpp (one block per matrix): same R, same
    floored-pivot counts, on a full-rank, a rank-deficient and a zero Gram matrix, with and without shift."""
    from slice_kernels import _ext, dispatch

    for dev in ("cpu", "cuda"):
        if dispatch.refusal("randomized_svd", "cpp" if dev == "cpu" else "cuda", torch.device(dev)):
            pytest.skip(f"no native cholesky_shifted kernel on {dev}")
    g = torch.Generator().manual_seed(q)
    X = torch.randn(3, q + 13, q, generator=g, dtype=torch.float64)
    k = q // 2
    X[1, :, k:] = X[1, :, :k] @ torch.randn(k, q - k, generator=g, dtype=torch.float64)  # rank k of q
    gram = (X.transpose(-1, -2) @ X).contiguous()
    gram[2] = 0
    chol = _ext.native("cholesky_shifted")
    for shift in (0.0, 1e-6):
        R_cpu, f_cpu = chol(gram, shift, q * 2.0**-53)
        R_gpu, f_gpu = chol(gram.cuda(), shift, q * 2.0**-53)
        assert f_gpu.cpu().tolist() == f_cpu.tolist()
        assert f_cpu.tolist()[1] == (q - k if shift == 0.0 else 0) and f_cpu.tolist()[2] == q
        torch.testing.assert_close(R_gpu.cpu(), R_cpu, rtol=1e-9, atol=1e-9 * float(R_cpu.abs().max()))


@pytest.mark.parametrize("op", ["conflict_stats", "surgery_"])
def test_conflict_ops_refuse_tensors_on_another_device(op):
    """The fused conflict kernels read every layer through raw addresses in one table on cur[0]'s device:
    a tensor on another device must be refused up front, naming it, before anything is modified."""
    from slice_kernels.ops import conflict

    cur = [torch.randn(5, 4), torch.randn(3, 2)]
    prev = [torch.randn(5, 4), torch.randn(3, 2, device="meta")]
    before = [c.clone() for c in cur]
    with pytest.raises(ValueError, match="replay gradient 1 is on meta"):
        if op == "conflict_stats":
            conflict.conflict_stats(cur, prev)
        else:
            conflict.surgery_(cur, prev, [0.5, 0.5])
    with pytest.raises(ValueError, match="current gradient 1 is on meta"):
        conflict.conflict_stats([cur[0], torch.randn(3, 2, device="meta")])
    assert all(torch.equal(a, b) for a, b in zip(cur, before))
