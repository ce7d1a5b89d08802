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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _setup_py():
    """NVCC_FLAGS, _torch_arch_list and _skip_ext of setup.py, read without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    ns = {"os": os}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            exec(compile(ast.Module([node], []), "setup.py", "exec"), ns)
        if isinstance(node, ast.FunctionDef) and node.name in ("_torch_arch_list", "_skip_ext"):
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


def test_skip_ext_spellings_match_the_import(monkeypatch):
    """setup.py reads SLICE_KERNELS_SKIP_EXT as slice_kernels.extension does, except that an unknown value stops
    the build instead of warning."""
    from slice_kernels import extension

    skip = _setup_py()["_skip_ext"]
    for value in ("1", "True", "yes", "ON", "0", "false", "no", "Off", ""):
        monkeypatch.setenv("SLICE_KERNELS_SKIP_EXT", value)
        assert skip() == extension.skip_requested(), value
    monkeypatch.delenv("SLICE_KERNELS_SKIP_EXT")
    assert not skip()
    monkeypatch.setenv("SLICE_KERNELS_SKIP_EXT", "skip")
    with pytest.raises(SystemExit, match="SLICE_KERNELS_SKIP_EXT='skip' is not recognised"):
        skip()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_sign_loss_ptx_has_no_approximate_tanh(tmp_path):
    """Compile csrc/cuda/sign_loss.cu with setup.py's own nvcc flags: the PTX must use the accurate tanhf
    (no tanh.approx.f32, which the build emitted before NVCC_FLAGS dropped --use_fast_math)."""
    ptx = tmp_path / "sign_loss.ptx"
    cmd = [
        "nvcc",
        *_setup_py()["NVCC_FLAGS"],
        "-arch=sm_90",
        "-I" + os.path.join(ROOT, "csrc"),
        "-ptx",
        os.path.join(ROOT, "csrc", "cuda", "sign_loss.cu"),
        "-o",
        str(ptx),
    ]
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
    ups = [
        (
            torch.randn(m, r, generator=g, dtype=torch.float64).cuda(),
            torch.randn(r, n, generator=g, dtype=torch.float64).cuda(),
            0.5 + k,
        )
        for k, r in enumerate([8, 1, 3])
    ]
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
    from slice_kernels.ps_lora.loss import reference_sign_consistency_loss

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
    from slice_kernels import dispatch, extension

    for dev in ("cpu", "cuda"):
        if dispatch.refusal("randomized_svd", "cpp" if dev == "cpu" else "cuda", torch.device(dev)):
            pytest.skip(f"no native cholesky_shifted kernel on {dev}")
    g = torch.Generator().manual_seed(q)
    X = torch.randn(3, q + 13, q, generator=g, dtype=torch.float64)
    k = q // 2
    X[1, :, k:] = X[1, :, :k] @ torch.randn(k, q - k, generator=g, dtype=torch.float64)  # rank k of q
    gram = (X.transpose(-1, -2) @ X).contiguous()
    gram[2] = 0
    chol = extension.native("cholesky_shifted")
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


# ------------------------------------------------------------------------------------------------------------
# The native kernels' argument contract (csrc/common/*_checks.h, shared by the CPU kernels and the CUDA glue) and
# the CUDA fixes that go with it. CPU cases run here; the CUDA cases are GPU-marked.
DEVICES_ALL = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _native_or_skip(op, device):
    from slice_kernels import extension

    if not extension.has_kernel(op, device):
        pytest.skip(f"no native {op} kernel for {device}: {extension.load_error() or 'not built with it'}")
    return extension.native(op)


def _sign_loss_case(m, n, r, form, seed):
    import math

    from slice_kernels import History

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=torch.float64) / math.sqrt(n * r)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    Bh = torch.randn(m, 8, generator=g, dtype=torch.float64)
    Ah = torch.randn(8, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    h = History.from_factors([Bh], [Ah], [0.6])
    if form == "dense":
        h = History.from_dense(h.to_dense(torch.float64))
    elif form == "bits":
        h = h.to_sign_bits()
    return A, B, h


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["factors", "dense", "bits"])
@pytest.mark.parametrize("r", [1, 256, 257, 300, 600])
def test_cuda_sign_loss_takes_any_rank(r, form):
    """The CUDA gradient kernels accumulated all r columns of dB (rows of dA) in shared memory: r > 277 needed
    more than 48 KiB and the launch failed. They now take the rank in chunks of 256 along gridDim.y: r = 257 and
    300 have a ragged second chunk, 600 three chunks. Each op (fwd, bwd with an upstream gradient ≠ 1, fwd_bwd)
    is checked against the float64 CPU kernel, itself tested against the reference."""
    _check_cuda_sign_loss(70, 45, r, form, seed=r)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["factors", "dense", "bits"])
@pytest.mark.parametrize("m,n,r", [(200, 5000, 16), (5000, 200, 16), (200, 5000, 300)])
def test_cuda_sign_loss_split_walk(m, n, r, form):
    """The CUDA kernels split the walked dimension into segments (sk_sign_loss_plan; about 2 blocks per SM): on an
    H100 (132 SMs) 200 × 5000 runs the forward and dB over 7 row blocks × 38 segments of the 157 column tiles, and
    5000 × 200 the dA kernel over 7 column blocks × 38 segments of the row tiles (r = 300 adds a second rank
    chunk, so the dB grid has all three axes); with fewer SMs S is smaller but still > 1 here. Each op against
    the float64 CPU kernel (1e-5, as without a split), and twice in a row bit for bit: the sum over segments
    (workspace slices added in segment order, partials added in a fixed order) must be deterministic."""
    _check_cuda_sign_loss(m, n, r, form, seed=m + r, twice=True)


def _check_cuda_sign_loss(m, n, r, form, seed, twice=False):
    """Each CUDA op (fwd, bwd with an upstream gradient ≠ 1, fwd_bwd), both modes, against the float64 CPU kernel
    (itself tested against the reference) within 1e-5; with ``twice``, a second call of each must give the same
    bits (deterministic reductions)."""
    from slice_kernels.ops.sign_loss import KIND

    ops = {
        op: (_native_or_skip(op, "cpu"), _native_or_skip(op, "cuda"))
        for op in ("sign_loss_fwd", "sign_loss_bwd", "sign_loss_fwd_bwd")
    }
    A, B, h = _sign_loss_case(m, n, r, form, seed=seed)
    # the History may keep its tensors in float32; the CPU reference runs in float64 throughout
    H1, H2 = (None if t is None else (t.double() if t.is_floating_point() else t) for t in h.operands("cpu"))
    dev = lambda t: None if t is None else (t.float().cuda() if t.is_floating_point() else t.cuda())
    Ac, Bc, H1c, H2c = dev(A), dev(B), dev(H1), dev(H2)
    rel = lambda x, ref: float((x.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-300))
    for mode in (0, 1):
        args = (KIND[form], mode, 0.7, 1.3 / h.rms, 1.0 / h.rms)
        ref = ops["sign_loss_fwd"][0](A, B, H1, H2, *args)
        rdA, rdB = ops["sign_loss_bwd"][0](torch.tensor(2.5, dtype=torch.float64), A, B, H1, H2, *args)
        g = torch.tensor(2.5, device="cuda")
        loss = ops["sign_loss_fwd"][1](Ac, Bc, H1c, H2c, *args)
        dA, dB = ops["sign_loss_bwd"][1](g, Ac, Bc, H1c, H2c, *args)
        loss2, dA2, dB2 = ops["sign_loss_fwd_bwd"][1](Ac, Bc, H1c, H2c, *args)
        assert rel(loss, ref) <= 1e-5 and rel(loss2, ref) <= 1e-5, mode
        assert rel(dA, rdA) <= 1e-5 and rel(dB, rdB) <= 1e-5, mode
        assert rel(dA2, rdA / 2.5) <= 1e-5 and rel(dB2, rdB / 2.5) <= 1e-5, mode
        if twice:
            again = ops["sign_loss_fwd_bwd"][1](Ac, Bc, H1c, H2c, *args)
            assert all(torch.equal(x, y) for x, y in zip(again, (loss2, dA2, dB2))), mode
            assert torch.equal(ops["sign_loss_fwd"][1](Ac, Bc, H1c, H2c, *args), loss), mode
            assert all(torch.equal(x, y) for x, y in zip(ops["sign_loss_bwd"][1](g, Ac, Bc, H1c, H2c, *args), (dA, dB)))


def _integer_updates(m, n, K, seed):
    """K factor updates whose products are exact in float32 (small integers, power-of-two scalings): every
    backend computes the same values, so ties between tasks are exact and the merge must match bit for bit.
    Task K-4 repeats task 2 with the opposite sign: wherever the two share the largest magnitude, the earlier
    one must win (a wrong tie rule flips the sign of those entries)."""
    g = torch.Generator().manual_seed(seed)
    ups = []
    for k in range(K):
        r = 1 + k % 3
        B = torch.randint(-3, 4, (m, r), generator=g).float()
        A = torch.randint(-3, 4, (r, n), generator=g).float()
        ups.append((B, A, [0.5, 1.0, -1.0, 2.0][k % 4]))
    B2, A2, s2 = ups[2]
    ups[K - 4] = (B2.clone(), A2.clone(), -s2)
    return ups


@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_cuda_merge_takes_more_than_64_tasks_with_ties_to_the_earliest(wdtype):
    """The CUDA merge kept its task table in the launch arguments (at most 64 tasks); it now reads it from device
    memory, one launch for all K = 70 tasks, so the strict comparison keeps ties to the earliest task across all
    of them (bf16 W: the merged integers ≤ 54 are exact in bfloat16)."""
    from slice_kernels import dispatch, magnitude_merge
    from slice_kernels.ops.magnitude_merge import reference_magnitude_merge

    _native_or_skip("magnitude_merge_factors", "cuda")
    ups = _integer_updates(37, 45, 70, seed=5)
    ref = reference_magnitude_merge(ups)
    cuda_ups = [(B.cuda(), A.cuda(), s) for B, A, s in ups]
    W = torch.randint(-8, 9, (37, 45), generator=torch.Generator().manual_seed(1)).to(wdtype)
    Wc = W.cuda()
    with dispatch.use_backend("cuda"):
        out = magnitude_merge(cuda_ups)
        magnitude_merge(cuda_ups, into=Wc)
    assert torch.equal(out.cpu().double(), ref)
    assert torch.equal(Wc.cpu().double(), W.double() + ref)


@pytest.mark.gpu
def test_cuda_merge_of_more_than_65535_row_tiles():
    """The merge grid had the row tiles on gridDim.y (≤ 65535): m > 2,097,120 rows failed to launch. It is a 1-D
    grid over all tiles now; 2.1M × 3 float32 is 25 MB."""
    from slice_kernels import dispatch, magnitude_merge
    from slice_kernels.ops.magnitude_merge import reference_magnitude_merge

    _native_or_skip("magnitude_merge_factors", "cuda")
    ups = _integer_updates(2_100_000, 3, 4, seed=6)
    ref = reference_magnitude_merge(ups)
    with dispatch.use_backend("cuda"):
        out = magnitude_merge([(B.cuda(), A.cuda(), s) for B, A, s in ups])
    assert torch.equal(out.cpu().double(), ref)


@pytest.mark.gpu
def test_cuda_cholesky_of_empty_matrices_counts_no_floored_pivot():
    """With q = 0 the kernel is not launched; the floored counts were torch.empty and read whatever the caching
    allocator handed back (here a block just filled with 7s). The CPU kernel returns zeros."""
    chol = _native_or_skip("cholesky_shifted", "cuda")
    junk = torch.full((128,), 7, dtype=torch.int32, device="cuda")
    del junk
    R, floored = chol(torch.zeros(3, 0, 0, dtype=torch.float64, device="cuda"), 0.0, 1e-12)
    assert R.shape == (3, 0, 0)
    assert floored.cpu().tolist() == [0, 0, 0]


@pytest.mark.parametrize("device", DEVICES_ALL)
def test_sign_loss_kernels_refuse_an_unknown_mode(device):
    """mode is 0 (tanh) or 1 (hinge); the kernels treated any other value as hinge, silently."""
    fwd = _native_or_skip("sign_loss_fwd", device)
    A, B, h = _sign_loss_case(6, 10, 2, "dense", seed=0)
    dt = torch.float64 if device == "cpu" else torch.float32
    args = [t.to(device, dt) for t in (A, B, h.dense)]
    with pytest.raises(RuntimeError, match="mode must be 0 .tanh. or 1 .hinge., got 5"):
        fwd(*args, None, 1, 5, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("device", DEVICES_ALL)
def test_merge_kernels_refuse_bad_offsets_and_overlapping_rows(device):
    """Decreasing offsets would read task slices outside B and A; an out whose rows overlap (an expanded row)
    would be written by several tiles at once. Both are refused before out is touched."""
    merge = _native_or_skip("magnitude_merge_factors", device)
    B, A = torch.randn(5, 4, device=device), torch.randn(4, 6, device=device)
    out = torch.zeros(5, 6, device=device)
    with pytest.raises(RuntimeError, match="offsets must not decrease; task 1 spans 3..2"):
        merge(B, A, [0, 3, 2, 4], [1.0, 1.0, 1.0], out, False)
    with pytest.raises(RuntimeError, match="non-overlapping rows"):
        merge(B, A, [0, 4], [1.0], torch.zeros(1, 6, device=device).expand(5, 6), False)
    assert not out.any()


@pytest.mark.parametrize("device", DEVICES_ALL)
def test_gorp_update_kernels_refuse_a_step_with_nowhere_to_go(device):
    """Without param and out the step is lost; the CPU kernel refused it but the CUDA glue updated the moments
    and returned. Both refuse it now, before the moments are touched."""
    op = _native_or_skip("gorp_update", device)
    g = torch.randn(7, 3, device=device)
    m, v = torch.zeros_like(g), torch.zeros_like(g)
    with pytest.raises(RuntimeError, match="give param and/or out"):
        op(g, None, m, v, None, None, 0.9, 0.999, 1e-8, 1.0, 1.0, 1e-3, 1.0)
    assert not m.any() and not v.any()
