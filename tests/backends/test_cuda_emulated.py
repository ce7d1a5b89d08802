"""The real CUDA kernels of csrc/cuda/*.cu, run on the CPU through the emulator of tests/backends/cuda_emu/ and
compared with the CPU kernels of the native extension (themselves tested against the float64 torch references).

tests/backends/cuda_emu/rewrite.py turns each .cu into C++20 (shared memory, launches), the fake headers of
tests/backends/cuda_emu/fake/ run every block as blockDim std::threads with a std::barrier for __syncthreads,
and tests/backends/cuda_emu/driver.cpp exposes every launcher through extern "C" for ctypes. This checks the
kernels' indexing, tiling, reductions, barriers and launch configuration; it cannot show warp-level behaviour,
the GPU memory model, FMA contraction, the real register/shared-memory limits or speed (see the header of
fake/cuda_runtime.h).
Shapes are small (a block is 256 OS threads) but not multiples of the tiles.
"""

import ctypes
import importlib.util
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "tests" / "backends" / "cuda_emu"
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

I64, F32, F64, INT, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
INVALID_CONFIGURATION, ILLEGAL_ADDRESS = 9, 700
# mutations of the real sources that the comparisons below must catch (test_the_harness_catches_kernel_bugs)
MUTATIONS = {
    # ties to the latest task instead of the earliest
    "magnitude_merge.cu": ("fabsf(v) > fabsf(best[q])", "fabsf(v) >= fabsf(best[q])"),
    # the dB accumulator (dynamic shared memory) left uninitialised
    "sign_loss.cu": ("for (int64_t e = threadIdx.x; e < BM * rc; e += NT) accB[e] = 0.f;", ""),
    # the floored-pivot counter (static shared memory) left uninitialised
    "rsvd.cu": ("    s_count = 0;\n", ""),
}
# a segment one tile too long: neighbouring segments of the sign-loss kernels overlap by a tile
# (test_forced_segments_catch_a_wrong_segment_bound)
SEGMENT_MUTATION = {"sign_loss.cu": ("t1 = (s + 1) * tiles / S;", "t1 = (s + 1) * tiles / S + 1;")}


def _rewrite_module():
    spec = importlib.util.spec_from_file_location("sk_cuda_emu_rewrite", EMU / "rewrite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cxx():
    """The compiler ($CXX when set, else g++ or c++), as a path; None when there is none."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++")


def _flags(defines=()):
    return [
        "-std=c++20",
        "-O2",
        "-pthread",
        "-fPIC",
        f"-I{EMU / 'fake'}",
        f"-I{ROOT / 'csrc'}",
        *(f"-D{d}" for d in defines),
    ]


def _compile_all(cxx, jobs, workdir, defines=()):
    """jobs: [(source_path, object_path)]; raises with the compiler's output on the first failure. defines: macro
    names defined for every job."""

    def one(job):
        src, obj = job
        return subprocess.run(
            [cxx, *_flags(defines), "-c", str(src), "-o", str(obj)], capture_output=True, text=True, cwd=workdir
        )

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for (src, _), res in zip(jobs, pool.map(one, jobs)):
            if res.returncode != 0:
                pytest.fail(f"the emulated CUDA source {src} does not compile:\n{res.stderr[-4000:]}")


def _link(cxx, objects, lib, workdir):
    res = subprocess.run(
        [cxx, "-shared", "-pthread", "-o", str(lib), *map(str, objects)], capture_output=True, text=True, cwd=workdir
    )
    if res.returncode != 0:
        pytest.fail(f"linking the emulated CUDA kernels failed:\n{res.stderr[-4000:]}")
    return ctypes.CDLL(str(lib))


def _rewrite_to(rw, src_path: Path, dest: Path, text=None):
    rel = src_path.relative_to(ROOT).as_posix()
    dest.write_text(rw.rewrite(text if text is not None else src_path.read_text(), rel))
    return dest


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    from slice_kernels import extension

    if extension.load() is None:
        pytest.skip(
            f"the native CPU extension is not built (the reference kernels): {extension.load_error()}; "
            "run `python setup.py build_ext --inplace`"
        )
    cxx = _cxx()
    if cxx is None:
        where = f"$CXX={os.environ['CXX']} not found" if os.environ.get("CXX") else "neither g++ nor c++ on PATH"
        pytest.skip(f"no C++ compiler to build the CUDA emulator: {where}")
    work = tmp_path_factory.mktemp("cuda_emu")
    probe = work / "barrier_probe.cpp"
    # what the fake headers need beyond C++17: <barrier> (g++ >= 11, clang >= 15) and _Float16 (g++ >= 12 on x86)
    probe.write_text(
        "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); "
        "volatile _Float16 h = 1.5f; return float(h) == 1.5f ? 0 : 1; }\n"
    )
    res = subprocess.run(
        [cxx, "-std=c++20", "-pthread", str(probe), "-o", str(work / "probe")], capture_output=True, text=True
    )
    if res.returncode != 0:
        pytest.skip(
            f"{cxx} cannot compile C++20 <barrier> with _Float16 (needs g++ >= 12 or clang >= 15): {res.stderr[-300:]}"
        )
    rw = _rewrite_module()
    jobs = [(_rewrite_to(rw, f, work / f"{f.stem}.emu.cpp"), work / f"{f.stem}.o") for f in CU_FILES]
    jobs.append((_rewrite_to(rw, EMU / "probe.cu", work / "probe.emu.cpp"), work / "probe.o"))
    jobs.append((EMU / "driver.cpp", work / "driver.o"))
    _compile_all(cxx, jobs, work)
    lib = _link(cxx, [obj for _, obj in jobs], work / "libsk_cuda_emu.so", work)
    _declare(lib)
    return {"lib": lib, "work": work, "cxx": cxx, "rw": rw, "objects": [obj for _, obj in jobs]}


@pytest.fixture(scope="module")
def emu(build):
    return build["lib"]


def _declare(lib):
    lib.emu_sign_loss.argtypes = [
        INT,
        PTR,
        PTR,
        PTR,
        PTR,
        PTR,
        I64,
        I64,
        I64,
        I64,
        INT,
        INT,
        F32,
        F32,
        F32,
        PTR,
        PTR,
        PTR,
        PTR,
        PTR,
        PTR,
    ]
    lib.emu_sign_loss_plan.argtypes = [I64, I64, I64, INT, I64, PTR]
    lib.emu_sign_loss_plan.restype = None
    lib.emu_magnitude_merge.argtypes = [PTR, PTR, PTR, PTR, I64, I64, I64, I64, I64, INT, PTR, INT]
    lib.emu_cholesky_shifted.argtypes = [PTR, PTR, PTR, PTR, I64, I64, F64, F64]
    lib.emu_conflict_stats.argtypes = [PTR, I64, PTR, I64, INT, PTR, PTR]
    lib.emu_surgery.argtypes = [PTR, PTR, I64, PTR]
    lib.emu_gorp_update.argtypes = [INT, PTR, PTR, PTR, PTR, PTR, PTR, I64] + [F64] * 7
    lib.emu_grad_accumulate.argtypes = [PTR, PTR, INT, I64, F32]
    lib.emu_probe.argtypes = [INT, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_size_t, INT, PTR]


def test_driver_exposes_every_launcher():
    """Every launcher declared in csrc/cuda/*.cuh is called by tests/backends/cuda_emu/driver.cpp: a kernel added
    without a driver entry would otherwise compile here and never run."""
    import re

    declared = set()
    for h in (ROOT / "csrc" / "cuda").glob("*.cuh"):
        declared |= set(re.findall(r"^(?:cudaError_t|int64_t|SkSignLossPlan)\s+(sk_\w+)\s*\(", h.read_text(), re.M))
    driver = (EMU / "driver.cpp").read_text()
    assert declared, "no launcher found in csrc/cuda/*.cuh: update this test's pattern"
    assert not [d for d in sorted(declared) if f"{d}(" not in driver]


def test_rewrite_refuses_what_it_does_not_know():
    """A construct the rewriter cannot translate faithfully is an error naming the line, never a silent
    mistranslation; comments are not code."""
    rw = _rewrite_module()
    ok = rw.rewrite("// k<<<1, 2>>>(x); and __shared__ in prose;\nvoid f() { k<<<1,\n 2>>>(x); }\n", "t.cu")
    assert ok.count("sk_launch(1024, 1, 2, 0, nullptr, [&] { k(x); });") == 1 and "prose" not in ok
    assert ok.count("\n") == 5  # the #include, the #line and the original's three: line numbers kept
    # __launch_bounds__(max threads, min blocks): the launch is bounded by the first only
    two = rw.rewrite("__global__ void __launch_bounds__(128, 4) k(int* o) {}\nvoid f() { k<<<1, 2>>>(x); }\n", "t.cu")
    assert "sk_launch(128, 1, 2, 0, nullptr, [&] { k(x); });" in two
    for bad in (
        "void f() {\n  __shared__ const float x[4];\n}",
        "void f() {\n  k<<<1, 2>>>(x), g();\n}",
        "void f() {\n  k<<<1>>>(x);\n}",
    ):
        with pytest.raises(rw.RewriteError, match=r"t\.cu:2:"):
            rw.rewrite(bad, "t.cu")


def _p(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _nat(op):
    from slice_kernels import extension

    return extension.native(op)


def _rel(x, ref):
    x, ref = x.double(), ref.double()
    if ref.numel() == 0:
        return 0.0
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


# ---------------------------------------------------------------- sign loss
H100_SMS = 132
PLAN_FIELDS = ("seg_fwd", "seg_dB", "seg_dA", "partials_fwd", "partials_fwd_bwd", "workspace")


def _plan(lib, m, n, r, sm_count=H100_SMS, segments=0):
    out = torch.zeros(6, dtype=torch.int64)
    lib.emu_sign_loss_plan(m, n, r, sm_count, segments, _p(out))
    return dict(zip(PLAN_FIELDS, out.tolist()))


def _run_sign_loss(lib, which, A, B, H1, H2, form, mode, s, al, ir, grad=2.5, segments=0, plan=None, raw=False):
    """(loss, dA, dB) of the emulated kernels under sk_sign_loss_plan's plan for an H100 (segments > 0 forces S);
    outputs and workspace start as NaN so an entry never written shows, and the workspace carries a NaN guard
    past its end that must stay untouched. raw: the float32 partials instead of the loss."""
    from slice_kernels.ops.sign_loss import KIND

    m, r = B.shape
    n = A.shape[1]
    R = H1.shape[1] if form == "factors" else 0
    plan = plan or _plan(lib, m, n, r, segments=segments)
    part = torch.full((plan["partials_fwd" if which == 0 else "partials_fwd_bwd"],), float("nan"))
    dA, dB = torch.full((r, n), float("nan")), torch.full((m, r), float("nan"))
    ws = torch.full((plan["workspace"] + 64,), float("nan"))
    g = torch.tensor([grad], dtype=torch.float32)
    bits = H1 if form == "bits" else None
    pl = torch.tensor([plan[f] for f in PLAN_FIELDS], dtype=torch.int64)
    rc = lib.emu_sign_loss(
        which,
        _p(A),
        _p(B),
        None if form == "bits" else _p(H1),
        _p(H2),
        _p(bits),
        m,
        n,
        r,
        R,
        KIND[form],
        mode,
        s,
        al,
        ir,
        _p(pl),
        _p(g),
        _p(part),
        _p(dA),
        _p(dB),
        _p(ws),
    )
    assert rc == 0, f"sign-loss launch {which} returned cudaError {rc}"
    assert ws[plan["workspace"] :].isnan().all(), "the launcher wrote past the workspace sk_sign_loss_plan sized"
    return (part if raw else part.double().sum() / (m * n)), dA, dB


def _sign_loss_operands(m, n, r, form):
    # the GPU tests' own cases, so the emulator and the GPU see the same inputs
    from tests.backends.test_gpu_paths import _sign_loss_case

    A, B, h = _sign_loss_case(m, n, r, form, seed=r + m)
    H1, H2 = (None if t is None else (t.double() if t.is_floating_point() else t) for t in h.operands("cpu"))
    return A, B, H1, H2, h


def _f32(t):
    return None if t is None else (t.float().contiguous() if t.is_floating_point() else t.contiguous())


# (m, n, r, form, mode): r = 0 and 1, r = 257 (a ragged second rank chunk along gridDim.y), m, n not multiples of 32,
# m ≠ n, every history form, both modes; (1, 1) is a single partial tile.
SIGN_LOSS_CASES = [
    (70, 45, 0, "dense", 0),
    (70, 45, 1, "factors", 1),
    (33, 65, 31, "bits", 0),
    (40, 37, 257, "factors", 0),
    (40, 37, 257, "bits", 1),
    (1, 1, 3, "dense", 1),
]


def _sign_loss_errors(lib, m, n, r, form, mode, segments=0):
    """Relative errors of each launcher (fwd, bwd with an upstream gradient of 2.5, fwd_bwd) against the float64
    CPU kernel: [loss fwd, loss fwd_bwd], [dA bwd, dB bwd, dA fwd_bwd, dB fwd_bwd]."""
    from slice_kernels.ops.sign_loss import KIND

    A, B, H1, H2, h = _sign_loss_operands(m, n, r, form)
    s, al, ir = 0.7, 1.3 / h.rms, 1.0 / h.rms
    args = (KIND[form], mode, s, al, ir)
    ref = _nat("sign_loss_fwd")(A, B, H1, H2, *args).double()
    rdA, rdB = _nat("sign_loss_bwd")(torch.tensor(2.5, dtype=torch.float64), A, B, H1, H2, *args)
    ops = (_f32(A), _f32(B), _f32(H1), _f32(H2), form, mode, s, al, ir)
    loss0, _, _ = _run_sign_loss(lib, 0, *ops, segments=segments)
    _, dA1, dB1 = _run_sign_loss(lib, 1, *ops, segments=segments)
    loss2, dA2, dB2 = _run_sign_loss(lib, 2, *ops, segments=segments)
    for t in (dA1, dB1, dA2, dB2):
        assert not t.isnan().any(), "an entry of dA/dB was never written"
    return [_rel(loss0, ref), _rel(loss2, ref)], [
        _rel(dA1, rdA),
        _rel(dB1, rdB),
        _rel(dA2, rdA / 2.5),
        _rel(dB2, rdB / 2.5),
    ]


@pytest.mark.parametrize("m,n,r,form,mode", SIGN_LOSS_CASES)
def test_sign_loss_launchers_match_cpu(emu, m, n, r, form, mode):
    """Each launcher against the float64 CPU kernel, under the plan an H100 gets (S = 1 at these sizes). float32
    kernel vs float64 reference: relative error ≤ 1e-5 (ARCHITECTURE.md); the loss sums run in float64."""
    assert _plan(emu, m, n, r)["workspace"] == 0
    loss_errs, grad_errs = _sign_loss_errors(emu, m, n, r, form, mode)
    assert max(loss_errs) <= 1e-5 and max(grad_errs) <= 1e-5, (loss_errs, grad_errs)


# 100 × 135: 4 row tiles (the last 4 rows high) and 5 column tiles (the last 7 wide). S = 3 cuts 5 tiles 1+2+2 and
# 4 tiles 1+1+2; S = 99 is clamped to the tile count (5 segments for fwd/dB, 4 for dA). r = 257 puts two rank
# chunks (gridDim.y) beside the segments (gridDim.z); every form and both modes appear.
SEGMENT_CASES = [
    (1, 1, "bits", 1),
    (1, 257, "factors", 0),
    (2, 1, "dense", 0),
    (2, 257, "bits", 1),
    (3, 1, "factors", 1),
    (3, 257, "dense", 1),
    (99, 1, "factors", 0),
    (99, 257, "bits", 0),
]


@pytest.mark.parametrize("S,r,form,mode", SEGMENT_CASES)
def test_forced_segments_match_cpu(emu, S, r, form, mode):
    """A forced split of the walked tiles into S segments (forward partials per (row block, segment), dB/dA
    slices of the workspace added by the reduction kernel) changes nothing beyond float32 reassociation: the
    same 1e-5 bound against the float64 CPU kernel as without a split."""
    m, n = 100, 135
    plan = _plan(emu, m, n, r, segments=S)
    assert (plan["seg_fwd"], plan["seg_dB"], plan["seg_dA"]) == (min(S, 5), min(S, 5), min(S, 4))
    loss_errs, grad_errs = _sign_loss_errors(emu, m, n, r, form, mode, segments=S)
    assert max(loss_errs) <= 1e-5 and max(grad_errs) <= 1e-5, (loss_errs, grad_errs)


@pytest.mark.parametrize(
    "m,n,r,sms,segments,expected",
    [
        # the benchmark shapes on an H100: 128 row (column) blocks -> S = ceil(264/128) = 3; 448 blocks -> S = 1
        (4096, 4096, 16, 132, 0, (3, 3, 3, 384, 384, 3 * 4096 * 16 * 2)),
        (4096, 14336, 64, 132, 0, (3, 3, 1, 384, 384, 3 * 4096 * 64)),
        (14336, 4096, 16, 132, 0, (1, 1, 3, 448, 448, 3 * 16 * 4096)),
        # the GPU test's shapes: 7 row blocks -> 38 segments of the 157 column tiles; the dA side stays at 1 (7 tiles)
        (200, 5000, 16, 132, 0, (38, 38, 1, 7 * 38, 7 * 38, 38 * 200 * 16)),
        (5000, 200, 16, 132, 0, (1, 1, 38, 157, 157, 38 * 16 * 200)),
        # 3 rank chunks triple the dB/dA grid, which then needs no split; the forward still does
        (4096, 4096, 600, 132, 0, (3, 1, 1, 384, 128, 0)),
        # at least 4 tiles per segment: 4 tiles stay whole, 8 split in two
        (32, 128, 1, 132, 0, (1, 1, 1, 1, 1, 0)),
        (32, 256, 1, 132, 0, (2, 2, 1, 2, 2, 2 * 32 * 1)),
        # forced S: kept even below 4 tiles per segment, clamped to the tiles (to 1 with none) and to 65535; an empty
        # side sizes no partials or workspace
        (100, 135, 257, 132, 3, (3, 3, 3, 12, 12, 3 * 100 * 257 + 3 * 257 * 135)),
        (100, 135, 257, 132, 99, (5, 5, 4, 20, 20, 5 * 100 * 257 + 4 * 257 * 135)),
        (0, 45, 3, 132, 7, (2, 2, 1, 0, 0, 0)),
        (70, 0, 3, 132, 7, (1, 1, 3, 3, 3, 0)),
        (32, 32 * 70000, 1, 132, 70000, (65535, 65535, 1, 65535, 65535, 65535 * 32)),
        # no SM count (0) counts as one SM: 2 blocks are the target
        (64, 4096, 16, 0, 0, (1, 1, 1, 2, 2, 0)),
    ],
)
def test_sign_loss_plan(emu, m, n, r, sms, segments, expected):
    """sk_sign_loss_plan, the pure host function that picks S (about 2 blocks per SM, at least 4 tiles per
    segment, S = 1 once the primary grid reaches the target) and sizes the partials and the workspace."""
    assert tuple(_plan(emu, m, n, r, sms, segments)[f] for f in PLAN_FIELDS) == expected


def test_sign_loss_launchers_refuse_a_foreign_plan(emu):
    """A plan made for other sizes would make the kernels index past the partials or the workspace: every
    launcher refuses it (cudaErrorInvalidValue) before launching anything, and a split plan without its
    workspace is refused too."""
    from slice_kernels.ops.sign_loss import KIND

    A, B, H1, H2, h = _sign_loss_operands(40, 70, 3, "dense")
    ops = [_p(_f32(A)), _p(_f32(B)), _p(_f32(H1)), None, None, 40, 70, 3, 0, KIND["dense"], 0, 0.7, 1.0, 1.0]
    part, dA, dB = torch.full((64,), float("nan")), torch.full((3, 70), float("nan")), torch.full((40, 3), float("nan"))
    ws = torch.full((4096,), float("nan"))
    g = torch.tensor([1.0])
    good = _plan(emu, 40, 70, 3, segments=2)
    bad = [
        dict(good, seg_dA=3),  # 3 segments of 2 row tiles
        dict(good, partials_fwd=good["partials_fwd"] + 1),
        _plan(emu, 40, 71, 3, segments=2),
    ]  # another n: another workspace size
    for plan in bad:
        pl = torch.tensor([plan[f] for f in PLAN_FIELDS], dtype=torch.int64)
        for which in (0, 1, 2):
            assert emu.emu_sign_loss(which, *ops, _p(pl), _p(g), _p(part), _p(dA), _p(dB), _p(ws)) == 1, plan
    pl = torch.tensor([good[f] for f in PLAN_FIELDS], dtype=torch.int64)
    assert emu.emu_sign_loss(1, *ops, _p(pl), _p(g), _p(part), _p(dA), _p(dB), None) == 1
    assert part.isnan().all() and dA.isnan().all() and dB.isnan().all() and ws.isnan().all()


# ---------------------------------------------------------------- magnitude merge
def _merge_operands(m, n, K, seed):
    from slice_kernels.ops.magnitude_merge import reference_magnitude_merge
    from tests.backends.test_gpu_paths import _integer_updates

    ups = _integer_updates(m, n, K, seed=seed)
    Bc = torch.cat([u[0] for u in ups], 1).contiguous()
    Ac = torch.cat([u[1] for u in ups], 0).contiguous()
    off = [0]
    for u in ups:
        off.append(off[-1] + u[0].shape[1])
    return (
        Bc,
        Ac,
        torch.tensor(off, dtype=torch.int64),
        torch.tensor([u[2] for u in ups], dtype=torch.float32),
        reference_magnitude_merge(ups),
    )


def _run_merge(lib, m, n, K, dtype, accumulate, seed=5):
    """Merged into columns 3..3+n of a wider matrix (ldo > n): (written view, expected, margins untouched)."""
    Bc, Ac, off, sc, ref = _merge_operands(m, n, K, seed)
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]
    big = torch.randint(-8, 9, (m, n + 7), generator=torch.Generator().manual_seed(2)).to(dtype)
    W0 = big.clone()
    view = big[:, 3 : 3 + n]
    rc = lib.emu_magnitude_merge(
        _p(Bc), _p(Ac), _p(off), _p(sc), m, n, Bc.shape[1], big.stride(0), K, accumulate, _p(view), code
    )
    assert rc == 0, f"merge launch returned cudaError {rc}"
    expected = (W0[:, 3 : 3 + n].double() if accumulate else 0) + ref
    margins = torch.equal(big[:, :3], W0[:, :3]) and torch.equal(big[:, 3 + n :], W0[:, 3 + n :])
    return view.double(), expected, margins


@pytest.mark.parametrize(
    "m,n,K,dtype", [(37, 45, 70, torch.float32), (37, 45, 70, torch.bfloat16), (65, 33, 3, torch.float16)]
)
@pytest.mark.parametrize("accumulate", [0, 1])
def test_magnitude_merge_exact_with_ties(emu, m, n, K, dtype, accumulate):
    """Integer updates with power-of-two scalings: every product and the merged values (|·| ≤ 62) are exact in
    float32, bf16 and fp16, so the kernel must match the reference bit for bit, including ties (task K-4 repeats
    task 2 with the opposite sign: the earlier must win) over K = 70 > 64 tasks; W is a strided slice whose margins
    must stay untouched."""
    got, expected, margins = _run_merge(emu, m, n, K, dtype, accumulate)
    assert torch.equal(got, expected)
    assert margins, "the merge wrote outside its m×n slice"


# ---------------------------------------------------------------- Cholesky of the randomized SVD
@pytest.mark.parametrize("q,shift", [(37, 1e-6), (300, 0.0)])
def test_cholesky_shifted_matches_cpu(emu, q, shift):
    """Batch of three: a full-rank Gram, a rank-q/2 one (q/2 pivots floored) and a zero one (every pivot floored);
    q = 300 > 256 threads, so each thread takes several columns per step. The kernel runs the CPU kernel's
    column-by-column algorithm in float64 with the same operation order, so the factors agree to a few ulps (1e-12
    relative leaves room for a different summation order of the trace)."""
    g = torch.Generator().manual_seed(q)
    X = torch.randn(3, q + 13, q, generator=g, dtype=torch.float64)
    k = q // 2
    X[1, :, k:] = X[1, :, :k] @ torch.randn(k, q - k, generator=g, dtype=torch.float64)
    gram = (X.transpose(-1, -2) @ X).contiguous()
    gram[2] = 0
    Rc, fc = _nat("cholesky_shifted")(gram, shift, q * 2.0**-53)
    R = torch.full_like(gram, float("nan"))
    W = torch.full_like(gram, float("nan"))
    fl = torch.full((3,), -1, dtype=torch.int32)
    assert emu.emu_cholesky_shifted(_p(gram), _p(W), _p(R), _p(fl), 3, q, shift, q * 2.0**-53) == 0
    assert fl.tolist() == fc.tolist()
    assert float((R - Rc).abs().max() / Rc.abs().max()) <= 1e-12


# ---------------------------------------------------------------- conflict statistics and surgery
class _Chunk(ctypes.Structure):  # SkChunk of csrc/cuda/init_kernels_common.cuh
    _fields_ = [("cur", ctypes.c_int64), ("prev", ctypes.c_int64), ("start", ctypes.c_int64), ("end", ctypes.c_int64)]


K_CHUNK = 65536  # csrc/cuda_glue/conflict.cpp's chunk size
SHAPES = [(300, 257), (1,), (0,), (70001,), (3, 5)]  # a 2-chunk layer, empty and 1-element layers


def _layers(aligned, seed=0):
    """cur, prev: one tensor per layer; with aligned=False cur sits one float into a buffer (the scalar path)."""
    g = torch.Generator().manual_seed(seed)
    total = sum(torch.Size(s).numel() for s in SHAPES)
    base = torch.randn(total + 1, generator=g)
    cur, o = [], 0 if aligned else 1
    for s in SHAPES:
        nel = torch.Size(s).numel()
        cur.append(base[o : o + nel].view(s))
        o += nel
    prev = [torch.randn(s, generator=g) for s in SHAPES]
    return cur, prev


def _table(cur, prev, keep=None):
    """The chunk table as csrc/cuda_glue/conflict.cpp builds it: rows, their count, each row's layer, and first[l]
    (layer l owns rows first[l] .. first[l+1]-1; an empty layer owns none)."""
    rows, owner, first = [], [], []
    for layer, (c, p) in enumerate(zip(cur, prev)):
        first.append(len(rows))
        if keep is not None and not keep(layer):
            continue
        for st in range(0, c.numel(), K_CHUNK):
            rows.append((c.data_ptr(), p.data_ptr() if p is not None else 0, st, min(c.numel(), st + K_CHUNK)))
            owner.append(layer)
    first.append(len(rows))
    table = (_Chunk * max(len(rows), 1))(*[_Chunk(*x) for x in rows])
    return table, len(rows), owner, torch.tensor(first, dtype=torch.int64)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("has_prev", [True, False])
def test_conflict_stats_multi_layer_table(emu, aligned, has_prev):
    """Five layers in one table (the 70001-element one spans two chunks, one layer is empty); float4 loads when
    aligned, scalar loads when cur is one float off. Float64 sums in another order than the CPU kernel's: 1e-12."""
    cur, prev = _layers(aligned)
    table, nc, _, first_t = _table(cur, prev if has_prev else [None] * len(cur))
    part = torch.full((max(nc, 1), 3), float("nan"), dtype=torch.float64)
    out = torch.full((len(cur), 3), float("nan"), dtype=torch.float64)
    assert (
        emu.emu_conflict_stats(ctypes.addressof(table), nc, _p(first_t), len(cur), int(has_prev), _p(part), _p(out))
        == 0
    )
    ref = _nat("conflict_stats")([c.contiguous() for c in cur], prev if has_prev else [])
    torch.testing.assert_close(out, ref.double(), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("aligned", [True, False])
def test_surgery_exact(emu, aligned):
    """cur += γ_l·prev per layer, γ = 0 layers left out of the table; float64 multiply-add rounded once, as the CPU
    kernel does: bit-exact."""
    cur, prev = _layers(aligned, seed=1)
    gam = torch.tensor([0.7, 0.0, -1.3, 2.5, 0.1], dtype=torch.float64)
    expected = [c.clone() for c in cur]
    _nat("surgery_")(expected, prev, gam)
    table, nc, owner, _ = _table(cur, prev, keep=lambda layer: gam[layer] != 0)
    layer_of = torch.tensor(owner, dtype=torch.int64)
    assert emu.emu_surgery(ctypes.addressof(table), _p(layer_of), nc, _p(gam)) == 0
    for c, e in zip(cur, expected):
        assert torch.equal(c, e)


# ---------------------------------------------------------------- GORP update, gradient accumulation
@pytest.mark.parametrize("kind", ["f32", "f32_bf16", "f64"])
@pytest.mark.parametrize("with_proj", [True, False])
def test_gorp_update_matches_cpu(emu, kind, with_proj):
    """The per-element Adam-style step against the CPU kernel, n = 4099 (16 full blocks and a partial one). Same
    formula in the same precision: float32 ≤ 1e-6 relative, float64 ≤ 1e-14, the bf16 parameter within one bf16
    rounding of the CPU's."""
    dt = torch.float64 if kind == "f64" else torch.float32
    n = 4099
    g = torch.Generator().manual_seed(7)
    grad, pr = torch.randn(n, generator=g, dtype=dt), torch.randn(n, generator=g, dtype=dt) * 0.1
    m0, v0 = torch.randn(n, generator=g, dtype=dt) * 0.01, torch.rand(n, generator=g, dtype=dt) * 0.01
    p0 = torch.randn(n, generator=g, dtype=dt).to(torch.bfloat16 if kind == "f32_bf16" else dt)
    sc = (0.9, 0.999, 1e-8, 0.19, 0.0199, 1e-3, 0.999)
    proj = pr if with_proj else None
    m1, v1, p1, o1 = m0.clone(), v0.clone(), p0.clone(), torch.empty(n, dtype=dt)
    _nat("gorp_update")(grad, proj, m1, v1, p1, o1, *sc)
    m2, v2, p2 = m0.clone(), v0.clone(), p0.clone()
    o2 = torch.full((n,), float("nan"), dtype=dt)
    code = {"f32": 0, "f32_bf16": 1, "f64": 2}[kind]
    assert emu.emu_gorp_update(code, _p(grad), _p(proj), _p(m2), _p(v2), _p(p2), _p(o2), n, *sc) == 0
    tol = dict(rtol=1e-14, atol=0.0) if kind == "f64" else dict(rtol=1e-6, atol=1e-12)
    for got, ref in ((m2, m1), (v2, v1), (o2, o1)):
        torch.testing.assert_close(got, ref, **tol)
    ptol = dict(rtol=2.0**-8, atol=0.0) if kind == "f32_bf16" else tol
    torch.testing.assert_close(p2, p1, **ptol)


@pytest.mark.parametrize("gdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grad_accumulate_matches_cpu(emu, gdtype):
    """acc += α·g with the conversion fused, n = 1000 (a partial last block): one fused multiply-add per element
    on both sides, so the result is exact up to contraction (1e-6 relative)."""
    g = torch.Generator().manual_seed(3)
    acc0 = torch.randn(1000, generator=g)
    grad = torch.randn(1000, generator=g).to(gdtype)
    a1 = acc0.clone()
    _nat("grad_accumulate_")(a1, grad, 0.5)
    a2 = acc0.clone()
    code = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[gdtype]
    assert emu.emu_grad_accumulate(_p(a2), _p(grad), code, 1000, 0.5) == 0
    torch.testing.assert_close(a2, a1, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the harness can fail
def test_emulator_refuses_bad_launches(emu):
    """What a GPU refuses, the emulator refuses: more threads than __launch_bounds__ or 1024, grid.y > 65535,
    more than 48 KiB of static + dynamic shared memory; a write past the dynamic allocation is reported."""
    out = torch.zeros(1, dtype=torch.int32)

    def probe(which, gx=1, gy=1, threads=128, shmem=0, n=0):
        out.zero_()
        return emu.emu_probe(which, gx, gy, threads, shmem, n, _p(out))

    assert probe(0, threads=128) == 0 and out.item() == 128  # the valid launch runs
    assert probe(0, threads=129) == INVALID_CONFIGURATION  # above __launch_bounds__(128)
    assert probe(0, gy=65536) == INVALID_CONFIGURATION
    assert probe(2, threads=1025, n=1) == INVALID_CONFIGURATION
    assert probe(2, shmem=48 * 1024 + 4, n=1) == INVALID_CONFIGURATION
    assert probe(1, threads=32, shmem=8 * 1024) == 0 and out.item() == 1  # 40 KiB static + 8 KiB = 48 KiB
    assert probe(1, threads=32, shmem=8 * 1024 + 4) == INVALID_CONFIGURATION  # 4 bytes over
    assert probe(2, threads=64, shmem=400, n=100) == 0 and out.item() == 100
    assert probe(2, threads=64, shmem=400, n=101) == ILLEGAL_ADDRESS  # one float past the allocation


def test_emulator_aborts_on_a_deadlocked_block(build):
    """A __syncthreads that one thread never reaches ends the process with the block named, instead of hanging
    the test run (the kernel runs in a child process here, with a 2 s limit)."""
    src = (
        "#include <cuda_runtime.h>\n"
        "__global__ void k(int* o) { if (threadIdx.x == 5) return; __syncthreads(); o[0] = 1; }\n"
        "int main() { int o = 0; k<<<3, 64>>>(&o); return o == 1 ? 0 : 1; }\n"
    )
    work, cxx = build["work"], build["cxx"]
    cpp = work / "deadlock.emu.cpp"
    cpp.write_text(build["rw"].rewrite(src, "deadlock.cu"))
    res = subprocess.run([cxx, *_flags(), str(cpp), "-o", str(work / "deadlock")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    res = subprocess.run(
        [str(work / "deadlock")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SK_EMU_BLOCK_TIMEOUT_S": "2"},
    )
    assert res.returncode != 0 and "block (0, 0, 0) did not finish" in res.stderr, (res.returncode, res.stderr)


def _lib_with_sources(build, texts, tag, defines=()):
    """The kernels again with the csrc/cuda files named in `texts` ({file: source text}) replaced (compiled with the
    macros `defines`), the untouched objects reused."""
    rw, work, cxx = build["rw"], build["work"], build["cxx"]
    jobs = []
    for name, text in texts.items():
        path = ROOT / "csrc" / "cuda" / name
        jobs.append((_rewrite_to(rw, path, work / f"{tag}_{path.stem}.emu.cpp", text), work / f"{tag}_{path.stem}.o"))
    _compile_all(cxx, jobs, work, defines)
    replaced = {f"{Path(n).stem}.o" for n in texts}
    objects = [o for o in build["objects"] if o.name not in replaced] + [obj for _, obj in jobs]
    lib = _link(cxx, objects, work / f"libsk_cuda_emu_{tag}.so", work)
    _declare(lib)
    return lib


def _mutant_lib(build, mutations, tag):
    """The kernels again with `mutations` ({file: (old, new)}) applied."""
    texts = {}
    for name, (old, new) in mutations.items():
        text = (ROOT / "csrc" / "cuda" / name).read_text()
        assert text.count(old) == 1, f"mutation site '{old}' not found once in {name}: update the mutation"
        texts[name] = text.replace(old, new)
    return _lib_with_sources(build, texts, tag)


@pytest.fixture(scope="module")
def mutant(build):
    """The kernels again with MUTATIONS applied (each a real bug class)."""
    return _mutant_lib(build, MUTATIONS, "mutant")


@pytest.fixture(scope="module")
def segment_mutant(build):
    return _mutant_lib(build, SEGMENT_MUTATION, "segment_mutant")


def test_forced_segments_catch_a_wrong_segment_bound(emu, segment_mutant):
    """test_forced_segments_match_cpu fails when each segment walks one tile too many (neighbouring segments
    overlap, the last runs off the matrix): the loss, dA and dB all go past the bound, while the same case passes
    on the real kernels."""
    case = (100, 135, 257, "factors", 0)
    loss_errs, grad_errs = _sign_loss_errors(segment_mutant, *case, segments=3)
    assert min(loss_errs) > 1e-5 and min(grad_errs) > 1e-5, (loss_errs, grad_errs)
    loss_errs, grad_errs = _sign_loss_errors(emu, *case, segments=3)
    assert max(loss_errs) <= 1e-5 and max(grad_errs) <= 1e-5, (loss_errs, grad_errs)


def test_the_harness_catches_kernel_bugs(emu, mutant):
    """The comparisons above fail on a wrong tie rule in the merge, on an uninitialised dynamic shared-memory
    accumulator in the sign-loss dB kernel and on an uninitialised static shared counter in the Cholesky
    (shared memory starts as 0xff bytes in every block, the first one included)."""
    got, expected, _ = _run_merge(mutant, 37, 45, 70, torch.float32, 0)
    assert not torch.equal(got, expected)
    got, expected, _ = _run_merge(emu, 37, 45, 70, torch.float32, 0)
    assert torch.equal(got, expected)

    A, B, H1, H2, h = _sign_loss_operands(33, 40, 5, "dense")
    ops = (_f32(A), _f32(B), _f32(H1), _f32(H2), "dense", 0, 0.7, 1.3 / h.rms, 1.0 / h.rms)
    _, _, dB_bad = _run_sign_loss(mutant, 1, *ops)
    _, _, dB_good = _run_sign_loss(emu, 1, *ops)
    assert dB_bad.isnan().any() and not dB_good.isnan().any()

    gram = torch.eye(5, dtype=torch.float64).expand(2, 5, 5).contiguous()
    for lib, expect in ((emu, [0, 0]), (mutant, None)):
        R, W = torch.empty_like(gram), torch.empty_like(gram)
        fl = torch.full((2,), 7, dtype=torch.int32)
        assert lib.emu_cholesky_shifted(_p(gram), _p(W), _p(R), _p(fl), 2, 5, 0.0, 1e-12) == 0
        if expect is not None:
            assert fl.tolist() == expect
        else:  # block 0 too: a zero-initialised static would have hidden it there
            assert fl[0].item() != 0 and fl[1].item() != 0


def test_tile_product_skips_padding_bit_for_bit(build, emu):
    """tile_product walks only the ranks that exist in its last chunk of 32 (r = 16 used to run 32 FMAs per entry,
    half of them on zero padding). The products it skips are exact zeros, so the sign-loss outputs must be bit
    for bit those of the old full-chunk loop: r = 16 (one partial chunk) and r = 40 (a full and a partial
    chunk), factor histories (R = 8, the H product pads too), both modes, a split walk."""
    tiles = (ROOT / "csrc" / "cuda" / "sign_loss_tiles.cuh").read_text()
    skip = "const int kn = K - k0 < KC ? static_cast<int>(K - k0) : KC;"
    assert tiles.count(skip) == 1, "update this test: the padding skip in tile_product moved"
    src = (ROOT / "csrc" / "cuda" / "sign_loss.cu").read_text()
    inc = '#include "cuda/sign_loss_tiles.cuh"\n'
    assert src.count(inc) == 1
    old_loop = tiles.replace(skip, "const int kn = KC;").replace("#pragma once\n", "")
    full = _lib_with_sources(build, {"sign_loss.cu": src.replace(inc, old_loop + "\n")}, "full_kc")
    for r, mode in ((16, 0), (40, 1)):
        A, B, H1, H2, h = _sign_loss_operands(70, 100, r, "factors")
        ops = (_f32(A), _f32(B), _f32(H1), _f32(H2), "factors", mode, 0.7, 1.3 / h.rms, 1.0 / h.rms)
        for which, outputs in ((0, [0]), (1, [1, 2]), (2, [0, 1, 2])):  # fwd: the loss; bwd: dA, dB; fwd_bwd: all
            got = _run_sign_loss(emu, which, *ops, segments=2)
            want = _run_sign_loss(full, which, *ops, segments=2)
            assert all(torch.equal(got[i], want[i]) for i in outputs), (r, mode, which)


# ---------------------------------------------------------------- float4 shared loads keep every bit
@pytest.fixture(scope="module")
def scalar_order(build):
    """sign_loss.cu and magnitude_merge.cu built with SK_TILES_SCALAR_ORDER: the scalar rank loops (one shared load
    per operand per rank step, the order of the kernels before the float4 loads) over the same shared layout."""
    names = ("sign_loss.cu", "magnitude_merge.cu")
    return _lib_with_sources(
        build,
        {n: (ROOT / "csrc" / "cuda" / n).read_text() for n in names},
        "scalar_order",
        defines=["SK_TILES_SCALAR_ORDER"],
    )


def _same_bits(x, y):
    """Equal bit patterns: unlike torch.equal, -0 differs from +0 (and a NaN equals the same NaN)."""
    as_int = {4: torch.int32, 2: torch.int16}[x.element_size()]
    x, y = x.contiguous(), y.contiguous()
    return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x.view(as_int), y.view(as_int))


# Ranks that are not multiples of 4 (the last float4 step of a chunk adds only 1 to 3 products) and 257 (a ragged
# second rank chunk along gridDim.y, 1 rank in its last float4); m, n ragged, m ≠ n; a history rank R of 5 or 3
# does the same in the H product.
VECTOR_CASES = [(1, 5, 0, 1), (3, 3, 1, 2), (5, 5, 1, 0), (37, 3, 0, 2), (257, 5, 1, 2)]


@pytest.mark.parametrize("r,R,mode,segments", VECTOR_CASES)
def test_float4_loads_keep_the_scalar_order_bit_for_bit(emu, scalar_order, r, R, mode, segments):
    """The tile products and the dB/dA contractions read shared memory as float4 along the rank (the summed
    index), where they read one float per rank step: each entry's sum still runs in ascending order with one
    multiply-add per step and a rank that is not a multiple of 4 adds only its own products, so the forward
    partials, dA and dB of every launcher are bit for bit those of the scalar loops (factor histories: both tile
    products; S = 2 also runs the workspace reduction). The emulator compiles without FMA contraction, so it
    cannot show an FFMA rounding to -0 (the reason the tail is not padded with zeros: sign_loss_tiles.cuh)."""
    m, n = 45, 70
    g = torch.Generator().manual_seed(100 + r)
    A = torch.randn(r, n, generator=g) / (n * r) ** 0.5
    B = torch.randn(m, r, generator=g)
    H1, H2 = torch.randn(m, R, generator=g), torch.randn(R, n, generator=g) / n**0.5
    rms = float((H1.double() @ H2.double()).square().mean().sqrt())
    ops = (A, B, H1, H2, "factors", mode, 0.7, 1.3 / rms, 1.0 / rms)
    for which in (0, 1, 2):
        got = _run_sign_loss(emu, which, *ops, segments=segments, raw=True)
        want = _run_sign_loss(scalar_order, which, *ops, segments=segments, raw=True)
        outputs = {0: (0,), 1: (1, 2), 2: (0, 1, 2)}[which]  # fwd: partials; bwd: dA, dB; fwd_bwd: all three
        for i in outputs:
            assert _same_bits(got[i], want[i]), (r, R, mode, which, ("partials", "dA", "dB")[i])
            assert not got[i].isnan().any()


def test_float4_loads_keep_the_merge_bit_for_bit(emu, scalar_order):
    """The merge's tile product with float4 loads against the scalar loop, on random (inexact) float32 updates
    of widths 1, 3, 5, 37, 2 (each task's rank is a chunk of its own, mostly not a multiple of 4) at a ragged
    43 × 70 tile grid: bit for bit, in every output dtype."""
    m, n, widths = 43, 70, [1, 3, 5, 37, 2]
    g = torch.Generator().manual_seed(11)
    Bc = torch.randn(m, sum(widths), generator=g)
    Ac = torch.randn(sum(widths), n, generator=g)
    off = torch.tensor([0] + torch.tensor(widths).cumsum(0).tolist(), dtype=torch.int64)
    sc = torch.tensor([0.7, -1.3, 0.25, 1.0, -2.0], dtype=torch.float32)
    for dtype, code in ((torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2)):
        outs = []
        for lib in (emu, scalar_order):
            out = torch.full((m, n), float("nan"), dtype=dtype)
            assert (
                lib.emu_magnitude_merge(
                    _p(Bc), _p(Ac), _p(off), _p(sc), m, n, Bc.shape[1], n, len(widths), 0, _p(out), code
                )
                == 0
            )
            outs.append(out)
        assert not outs[0].isnan().any() and _same_bits(*outs), dtype
