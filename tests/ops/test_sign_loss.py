"""PS-LoRA sign-consistency loss (SPEC §3): every backend against the float64 materializing reference."""

import math

import pytest
import torch

from slice_kernels import History, dispatch, sign_consistency_loss
from slice_kernels.ops.sign_loss import KIND
from slice_kernels.ops.sign_loss import MODES as MODE_ID
from slice_kernels.ps_lora.loss import reference_sign_consistency_loss
from tests.helpers import backends_for

# (m, n, r, R): awkward shapes, m ≠ n, not multiples of the 32/256 blocks; r = 1, 8, 64 (= n, its maximum).
SHAPES = [(37, 53, 1, 3), (70, 45, 8, 8), (65, 64, 64, 16)]
FORMS = ["factors", "dense", "bits"]
MODES = ["tanh", "hinge"]


def _case(m, n, r, R, form, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g, dtype=dtype) / math.sqrt(n)
    B = torch.randn(m, r, generator=g, dtype=dtype)
    Bh = torch.randn(m, R, generator=g, dtype=dtype)
    Ah = torch.randn(R, n, generator=g, dtype=dtype) / math.sqrt(n)
    h = History.from_factors([Bh], [Ah], [0.6])
    if form == "dense":
        h = History.from_dense(h.to_dense(dtype))
    elif form == "bits":
        h = h.to_sign_bits()
    return A, B, h


def _operands(h):
    return h.operands(torch.device("cpu"))


def _rel(x, ref):
    return float((x.double() - ref).norm() / ref.norm().clamp_min(1e-300))


@pytest.mark.parametrize("backend", backends_for("sign_loss_fwd"))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_grads_match_float64_reference(backend, mode, form, shape):
    A64, B64, h = _case(*shape, form)
    A64.requires_grad_(True)
    B64.requires_grad_(True)
    kw = dict(scaling=0.8, alpha=1.5, beta=0.3, mode=mode)
    ref = reference_sign_consistency_loss(A64, B64, h, **kw)
    rA, rB = torch.autograd.grad(ref, (A64, B64))
    # torch and cpp compute in float64 for float64 inputs; triton (and cuda) in float32 only.
    f64 = backend in ("torch", "cpp")
    A = A64.detach().clone() if f64 else A64.detach().float()
    B = B64.detach().clone() if f64 else B64.detach().float()
    A.requires_grad_(True)
    B.requires_grad_(True)
    with dispatch.use_backend(backend):
        out = sign_consistency_loss(A, B, h, **kw)
        gA, gB = torch.autograd.grad(out, (A, B))
    # float64: summation order only. float32: ΔW tiles come from r-term dot products and the loss is a sum of
    # m·n terms, each correct to ~1e-7 relative; norm-wise 1e-5 holds with margin at these sizes.
    tol = 1e-10 if f64 else 1e-5
    assert abs(float(out) - float(ref)) <= tol * abs(float(ref))
    assert _rel(gA, rA) <= tol and _rel(gB, rB) <= tol
    # the two-pass path (forward-only op, then its backward op) and the no-grad forward give the same
    H1, H2 = _operands(h)
    l_dir = torch.ops.slice_kernels.sign_loss_dir(
        A, B, H1, H2, KIND[h.kind], MODE_ID[mode], 0.8, 1.5 / h.rms, 1.0 / h.rms, backend
    )
    l_mag = (
        0.3
        * 0.64
        * ((B.double().T @ B.double()) * (A.double() @ A.double().T)).sum()
        / (shape[0] * shape[1] * h.rms**2)
    )
    gA2, gB2 = torch.autograd.grad(l_dir.double() + l_mag, (A, B))
    assert abs(float(l_dir + l_mag) - float(ref)) <= tol * abs(float(ref))
    assert _rel(gA2, rA) <= tol and _rel(gB2, rB) <= tol
    with torch.no_grad(), dispatch.use_backend(backend):
        assert abs(float(sign_consistency_loss(A, B, h, **kw)) - float(ref)) <= tol * abs(float(ref))


@pytest.mark.parametrize("backend", [b for b in backends_for("sign_loss_fwd") if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_float32_path_matches_float64_reference(backend, mode, form):
    """The float32 path of torch/cpp (cpp has its own vectorizable tanh there) at the largest awkward shape."""
    A64, B64, h = _case(130, 97, 16, 8, form, seed=9)
    A64.requires_grad_(True)
    B64.requires_grad_(True)
    kw = dict(scaling=0.8, alpha=1.5, beta=0.3, mode=mode)
    ref = reference_sign_consistency_loss(A64, B64, h, **kw)
    rA, rB = torch.autograd.grad(ref, (A64, B64))
    A = A64.detach().float().requires_grad_(True)
    B = B64.detach().float().requires_grad_(True)
    with dispatch.use_backend(backend):
        out = sign_consistency_loss(A, B, h, **kw)
        gA, gB = torch.autograd.grad(out, (A, B))
    assert abs(float(out) - float(ref)) <= 1e-5 * abs(float(ref))
    assert _rel(gA, rA) <= 1e-5 and _rel(gB, rB) <= 1e-5


@pytest.mark.parametrize("backend", [b for b in backends_for("sign_loss_fwd") if b.values[0] in ("torch", "cpp")])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", FORMS)
def test_gradcheck_float64(backend, mode, form):
    A, B, h = _case(9, 11, 2, 2, form, seed=3)
    A.requires_grad_(True)
    B.requires_grad_(True)

    def f(A, B):
        return sign_consistency_loss(A, B, h, scaling=0.9, alpha=1.0, beta=0.5, mode=mode)

    with dispatch.use_backend(backend):
        # hinge has kinks where ΔW_j = 0; random inputs stay away from them by far more than eps.
        assert torch.autograd.gradcheck(f, (A, B), eps=1e-6, atol=1e-7)


def test_bfloat16_error_within_twice_torch_own(  # the low-precision rule of ARCHITECTURE.md
):
    A64, B64, h = _case(70, 45, 8, 8, "factors", seed=5)
    A, B = A64.bfloat16(), B64.bfloat16()
    kw = dict(scaling=0.8, alpha=1.0, beta=0.3, mode="tanh")
    ref = reference_sign_consistency_loss(A.double(), B.double(), h, **kw)
    # plain torch doing the same thing in bfloat16: materialize and reduce in bf16
    dW = kw["scaling"] * (B @ A)
    H = h.to_dense(torch.bfloat16)
    l_dir = (1 - torch.tanh(dW / h.rms) * torch.tanh(H / h.rms)).mean()
    torch_bf16 = l_dir + 0.3 * (dW.float() ** 2).mean().bfloat16() / h.rms**2
    torch_err = abs(float(torch_bf16) - float(ref))
    for b in ("torch", "cpp", "triton"):
        if dispatch.refusal("sign_loss_fwd", b, torch.device("cpu")):
            continue
        with dispatch.use_backend(b):
            out = sign_consistency_loss(A, B, h, **kw)
        assert abs(float(out) - float(ref)) <= 2 * torch_err + 1e-6, b


def test_zero_at_first_task():
    A, B, h = _case(20, 30, 4, 2, "factors")
    A.requires_grad_(True)
    out = sign_consistency_loss(A, B, None, scaling=1.0)
    assert float(out) == 0.0
    out.backward()
    assert torch.equal(A.grad, torch.zeros_like(A))
    zero = History.from_factors([torch.zeros(20, 2)], [torch.zeros(2, 30)])
    assert zero.rms == 0.0 and float(sign_consistency_loss(A, B, zero, scaling=1.0)) == 0.0


def test_sign_agreement_lowers_the_loss():
    # ΔW equal to H (same signs everywhere) must score below ΔW = −H, in both modes
    A, B, h = _case(30, 40, 3, 3, "factors", seed=2)
    Bh, Ah = h.Bh.double(), h.Ah.double()
    for mode in MODES:
        same = sign_consistency_loss(Ah, Bh, h, scaling=1.0, beta=0.0, mode=mode)
        opposite = sign_consistency_loss(Ah, -Bh, h, scaling=1.0, beta=0.0, mode=mode)
        assert float(same) < float(opposite)
        if mode == "hinge":
            assert float(same) == 0.0


def test_bad_inputs_are_refused():
    A, B, h = _case(20, 30, 4, 2, "factors")
    with pytest.raises(ValueError, match="mode must be one of"):
        sign_consistency_loss(A, B, h, scaling=1.0, mode="l1")
    with pytest.raises(ValueError, match="another layer"):
        sign_consistency_loss(A[:, :29], B, h, scaling=1.0)
    with pytest.raises(ValueError, match="A must be"):
        sign_consistency_loss(A.T, B, h, scaling=1.0)
    # a negative alpha flips the sign reward (agreeing with H would cost more); refused as ParameterStabilityLoss
    # does, and already at t = 1 (no history) so the mistake shows at the first task
    for hist in (h, None):
        for kw in ({"alpha": -1.0}, {"alpha": 0.0}, {"beta": -0.1}, {"alpha": float("inf")}):
            with pytest.raises(ValueError, match="need alpha > 0 and beta ≥ 0"):
                sign_consistency_loss(A, B, hist, scaling=1.0, **kw)
    with pytest.raises(TypeError, match=r"History\.from_dense\(H\)"):
        sign_consistency_loss(A, B, torch.randn(20, 30), scaling=1.0)  # a dense H passed as it is
    # integer factors carry no gradient; refused, like alpha, also at t = 1
    for hist in (h, None):
        with pytest.raises(TypeError, match=r"A must be a floating-point tensor .* got torch\.int64"):
            sign_consistency_loss(A.round().long(), B, hist, scaling=1.0)
        with pytest.raises(TypeError, match=r"B must be a floating-point tensor .* got torch\.int32"):
            sign_consistency_loss(A, B.round().int(), hist, scaling=1.0)


@pytest.mark.parametrize("compile_backend", ["eager", "aot_eager"])
def test_torch_compile_traces_the_custom_op(compile_backend):
    A, B, h = _case(33, 47, 4, 4, "factors", seed=7, dtype=torch.float32)

    def f(A, B):
        return sign_consistency_loss(A, B, h, scaling=0.5, beta=0.2)

    A1, B1 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    A2, B2 = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    torch._dynamo.reset()
    out = torch.compile(f, backend=compile_backend, fullgraph=True)(A1, B1)
    out.backward()
    ref = f(A2, B2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(A1.grad, A2.grad)
    torch.testing.assert_close(B1.grad, B2.grad)


def test_custom_op_passes_opcheck():
    A, B, h = _case(17, 19, 2, 2, "factors", dtype=torch.float32)
    args = (A.requires_grad_(True), B.requires_grad_(True), h.Bh, h.Ah, 0, 0, 1.0, 1.0, 1.0, "")
    torch.library.opcheck(torch.ops.slice_kernels.sign_loss_dir.default, args)
    torch.library.opcheck(torch.ops.slice_kernels.sign_loss_dir_train.default, args)


def _gpu_matches_reference(backend, form):
    """Loss and gradients of ``backend`` on CUDA float32 against the float64 reference, 300×257, r = R = 16,
    both modes: the contract's 1e-5."""
    A64, B64, h = _case(300, 257, 16, 16, form, seed=11)
    h = h.to("cuda")
    for mode in MODES:
        A = A64.float().cuda().requires_grad_(True)
        B = B64.float().cuda().requires_grad_(True)
        Ar, Br = A64.clone().cuda().requires_grad_(True), B64.clone().cuda().requires_grad_(True)
        ref = reference_sign_consistency_loss(Ar, Br, h, scaling=0.7, beta=0.3, mode=mode)
        rA, rB = torch.autograd.grad(ref, (Ar, Br))
        with dispatch.use_backend(backend):
            out = sign_consistency_loss(A, B, h, scaling=0.7, beta=0.3, mode=mode)
            gA, gB = torch.autograd.grad(out, (A, B))
        assert abs(float(out) - float(ref)) <= 1e-5 * abs(float(ref)), (mode, float(out), float(ref))
        assert _rel(gA, rA) <= 1e-5 and _rel(gB, rB) <= 1e-5, (mode, _rel(gA, rA), _rel(gB, rB))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("form", FORMS)
def test_gpu_backends_match_reference(backend, form):
    _gpu_matches_reference(backend, form)


# ----------------------------------------------------------------------------- Triton segments (split walks)
def _triton_here():
    return dispatch.refusal("sign_loss_fwd", "triton", torch.device("cpu"))


def _split_case(form, mode, seed=13):
    """97×75 at r = 8, R = 5: 4 row tiles (the last holds 1 row) and 3 column tiles (the last 11 columns) of the
    interpreter's 32-blocks, so a forced S of 2 or 3 leaves segments of unequal tile counts and 7 exceeds both."""
    A64, B64, h = _case(97, 75, 8, 5, form, seed=seed)
    A64.requires_grad_(True)
    B64.requires_grad_(True)
    ref = reference_sign_consistency_loss(A64, B64, h, scaling=0.8, alpha=1.5, beta=0.0, mode=mode)
    rA, rB = torch.autograd.grad(ref, (A64, B64))
    H1, H2 = _operands(h)
    args = (
        A64.detach().float(),
        B64.detach().float(),
        H1,
        H2,
        KIND[h.kind],
        MODE_ID[mode],
        0.8,
        1.5 / h.rms,
        1.0 / h.rms,
    )
    return args, (float(ref.detach()), rA, rB)


def _run_split(args, S):
    """(loss, dA, dB) of the forward and the two-pass backward, then those of the training path, at S."""
    from slice_kernels.ops import _sign_loss_triton as tri

    loss = tri.sign_loss_fwd_triton(*args, segments=S)
    dA, dB = tri.sign_loss_bwd_triton(torch.ones((), device=args[0].device), *args, segments=S)
    return (loss, dA, dB) + tuple(tri.sign_loss_fwd_bwd_triton(*args, segments=S))


def _assert_matches(got, ref, tol):
    loss, dA, dB, tloss, tdA, tdB = got
    rl, rA, rB = ref
    for x in (loss, tloss):
        assert abs(float(x) - rl) <= tol * abs(rl)
    for gA, gB in ((dA, dB), (tdA, tdB)):
        assert _rel(gA, rA) <= tol and _rel(gB, rB) <= tol


@pytest.mark.skipif(_triton_here() is not None, reason=f"triton cannot run here: {_triton_here()}")
@pytest.mark.parametrize("S", [2, 3, 7], ids=lambda s: f"S{s}")
def test_triton_segments_match_reference_and_the_unsplit_walk(S):
    """Forced S (uneven segments; 7 > tiles clamps to the tile count) on the forward, the two-pass backward and
    the training path: the float64 reference within the contract's 1e-5, and the unsplit walk (S = 1) within
    float32 reassociation."""
    args, ref = _split_case("factors", "tanh")
    one = _run_split(args, 1)
    split = _run_split(args, S)
    _assert_matches(one, ref, 1e-5)
    _assert_matches(split, ref, 1e-5)
    for x, y in zip(split, one):
        assert _rel(x, y.double()) <= 2e-6


@pytest.mark.skipif(_triton_here() is not None, reason=f"triton cannot run here: {_triton_here()}")
@pytest.mark.parametrize(
    "form,mode", [("factors", "hinge"), ("dense", "tanh"), ("dense", "hinge"), ("bits", "tanh"), ("bits", "hinge")]
)
def test_triton_segments_every_history_form_and_mode(form, mode):
    """S = 2 over 3 column tiles / 4 row tiles (the forward and dB segments hold 1 and 2 tiles) for the other
    history forms and modes (factors/tanh: the test above)."""
    args, ref = _split_case(form, mode)
    _assert_matches(_run_split(args, 2), ref, 1e-5)


@pytest.mark.skipif(_triton_here() is not None, reason=f"triton cannot run here: {_triton_here()}")
@pytest.mark.parametrize("form", FORMS)
def test_triton_gpu_tiles_match_reference(monkeypatch, form):
    """The GPU's tiles (_TILES and, from rank 256, _TILES_WIDE_RANK: 64×32, 32×32, 16×32; not the
    interpreter's 32×32 everywhere), split, in the interpreter: the compile test proves they compile for sm_90,
    this that they compute the loss."""
    from slice_kernels.ops import _sign_loss_triton as tri

    args, ref = _split_case(form, "tanh")
    for tiles in (tri._TILES, tri._TILES_WIDE_RANK):
        monkeypatch.setattr(tri, "_tiles", lambda kernel, r: tiles[kernel])
        _assert_matches(_run_split(args, 2), ref, 1e-5)


def test_triton_segment_count_heuristic():
    """S for about 2 programs per SM, at least 4 tiles a segment, S = 1 once the primary grid is that large;
    at an H100's 132 SMs (tests/backends/test_triton_compile.py checks the grids the launchers make at issue
    5's shapes)."""
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    from slice_kernels.ops._sign_loss_triton import _check_segments, _segments

    assert _segments(64, 128, 132) == 5  # 64 row blocks of 4096 rows: 320 programs
    assert _segments(128, 448, 132) == 3  # 14336×4096's dA: 128 column blocks of 32
    assert _segments(224, 128, 132) == 2  # 14336×4096's forward
    assert _segments(64, 16, 132) == 4  # capped: 4 tiles a segment
    assert _segments(264, 1000, 132) == 1  # the primary grid alone reaches 2 programs per SM
    assert _segments(1, 11, 132) == 2  # 11 tiles: at most 2 segments of ≥ 4 tiles
    assert _segments(1, 3, 132) == 1  # too few tiles to split
    assert _segments(0, 0, 132) == 1
    assert _segments(4, 3, 132, forced=7) == 3  # a forced S past the tiles clamps
    assert _segments(4, 3, 132, forced=2) == 2
    assert _segments(4, 0, 132, forced=5) == 1
    for bad in (0, -1, 2.0, True, "2"):
        with pytest.raises(ValueError, match="segments must be a positive int"):
            _check_segments(bad)
    _check_segments(None)


def test_triton_sm_count_comes_from_the_device(monkeypatch):
    """CUDA tensors: the SM count of their own device (cached per index); meta and CPU tensors: the documented
    H100 value the sm_90 compile test relies on."""
    pytest.importorskip("triton", reason="the Triton backend needs triton")
    from types import SimpleNamespace

    from slice_kernels.ops import _sign_loss_triton as tri

    asked = []
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: asked.append(i) or SimpleNamespace(multi_processor_count=7 + i)
    )
    tri._cuda_sm_count.cache_clear()
    try:
        assert tri._sm_count(torch.device("cuda", 1)) == 8
        assert tri._sm_count(torch.device("cuda", 1)) == 8 and asked == [1]
        assert tri._sm_count(torch.device("meta")) == tri._sm_count(torch.device("cpu")) == 132
    finally:
        tri._cuda_sm_count.cache_clear()


@pytest.mark.gpu
def test_triton_segments_on_gpu_are_deterministic_and_match_reference():
    """On a GPU the split launches (forced S, and the heuristic's) must match the float64 reference, the
    unsplit walk within float32 reassociation, and themselves bit for bit when run again (no atomics)."""
    A64, B64, h = _case(1000, 700, 16, 16, "factors", seed=21)
    A64.requires_grad_(True)
    B64.requires_grad_(True)
    ref = reference_sign_consistency_loss(A64, B64, h, scaling=0.8, alpha=1.5, beta=0.0, mode="tanh")
    rA, rB = torch.autograd.grad(ref, (A64, B64))
    ref = (float(ref.detach()), rA, rB)
    H1, H2 = h.operands(torch.device("cuda"))
    args = (A64.detach().float().cuda(), B64.detach().float().cuda(), H1, H2, 0, 0, 0.8, 1.5 / h.rms, 1.0 / h.rms)

    def run(S):
        return [x.cpu() for x in _run_split(args, S)]

    one = run(1)
    _assert_matches(one, ref, 1e-5)
    for S in (None, 3, 9, 1000):
        got = run(S)
        _assert_matches(got, ref, 1e-5)
        for x, y in zip(got, one):
            assert _rel(x, y.double()) <= 2e-6
        assert all(torch.equal(x, y) for x, y in zip(got, run(S))), f"S={S} is not deterministic"


@pytest.mark.skipif(_triton_here() is not None, reason=f"triton cannot run here: {_triton_here()}")
@pytest.mark.parametrize("entry", ["fwd", "bwd", "fwd_bwd"])
def test_triton_dot_precision_setting_is_checked_before_anything_runs(monkeypatch, entry):
    """SLICE_KERNELS_TRITON_DOT takes ieee or tf32x3; any other value is an error naming the variable, raised by
    every launcher before it allocates or launches."""
    from slice_kernels.ops import _sign_loss_triton as tri

    args, ref = _split_case("factors", "tanh")
    monkeypatch.setenv(tri.DOT_PRECISION_ENV, "tf32")
    launched = []
    monkeypatch.setattr(tri, "_prep", lambda *a: launched.append(a))
    call = {
        "fwd": lambda: tri.sign_loss_fwd_triton(*args),
        "bwd": lambda: tri.sign_loss_bwd_triton(torch.ones(()), *args),
        "fwd_bwd": lambda: tri.sign_loss_fwd_bwd_triton(*args),
    }[entry]
    with pytest.raises(ValueError, match="SLICE_KERNELS_TRITON_DOT='tf32' is not one of"):
        call()
    assert not launched


@pytest.mark.skipif(_triton_here() is not None, reason=f"triton cannot run here: {_triton_here()}")
def test_triton_tf32x3_setting_reaches_every_kernel(monkeypatch):
    """With SLICE_KERNELS_TRITON_DOT=tf32x3 each kernel is launched with PREC="tf32x3" (the interpreter computes
    every precision alike, so here only the plumbing and the unchanged results are checked)."""
    from slice_kernels.ops import _sign_loss_triton as tri

    args, ref = _split_case("factors", "tanh")
    seen = []
    for name in ("_fwd_kernel", "_dB_kernel", "_dA_kernel"):
        kernel = getattr(tri, name)

        class Spy:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                def launch(*a, **kw):
                    seen.append((self.name, kw["PREC"]))
                    return self.kernel[grid](*a, **kw)

                return launch

        monkeypatch.setattr(tri, name, Spy(kernel, name))
    monkeypatch.setenv(tri.DOT_PRECISION_ENV, "tf32x3")
    _assert_matches(_run_split(args, 1), ref, 1e-5)
    assert {n for n, _ in seen} == {"_fwd_kernel", "_dB_kernel", "_dA_kernel"}
    assert all(p == "tf32x3" for _, p in seen), seen


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
def test_triton_tf32x3_dots_keep_the_contract(monkeypatch, form):
    """The opt-in tf32x3 dots (three TF32 tensor-core products per fp32 dot) against the float64 reference at
    an awkward shape, both modes, loss and gradients: the same 1e-5 as the ieee default. This decides whether
    tf32x3 may become the default (with the speed of benches/bench_ps_lora.py)."""
    from slice_kernels.ops import _sign_loss_triton as tri

    monkeypatch.setenv(tri.DOT_PRECISION_ENV, "tf32x3")
    _gpu_matches_reference("triton", form)
