"""Every Triton kernel of the package, compiled ahead of time for the H100 (sm_90) on a machine without a GPU.

CI runs the kernels only in the interpreter, which accepts what a GPU compile rejects (a ``tl.dot`` dimension
below 16, float64 dots, blocks that do not fit in shared memory). Here each real launcher is called the way
the GPU path calls it (meta tensors, so real layer shapes cost no memory; ``dispatch.interpreting()`` false,
so the GPU block sizes), its kernel launches are recorded instead of run, and each recorded launch is
specialized and compiled exactly as ``JITFunction.run`` would on an H100 (same binder, same divisibility
attributes, same options), down to ptxas. Each case asserts that every launch compiles, fits the per-block
shared-memory limit and runs with the warps the launcher asked for.

The compiles run in one child process without TRITON_INTERPRET (conftest sets it for this process, and a
kernel decorated under it is an interpreter object that cannot be compiled), with an empty Triton cache so
nothing is reused across runs. Run the file as a script to print the table of every launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

H100 = ("cuda", 90, 32)  # backend, compute capability, warp size
H100_MAX_SHARED = 232448  # bytes per block (227 KiB, opt-in above 48 KiB)
_MARK = "@@TRITON_COMPILE_RESULTS@@"
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------------------------ the cases
def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _cases(full: bool = False):
    """case id -> a call of one launcher as the GPU path makes it. Shapes are real layer shapes (Llama-3-8B MLP
    14336×4096, ranks up to 64, histories up to R = 640) or chosen to cross a limit (2³¹ elements)."""
    from slice_kernels.ops import _magnitude_merge_triton as mm
    from slice_kernels.ops import _rsvd_triton, conflict, gorp_update, grad_accum, rsvd  # noqa: F401
    from slice_kernels.ops import _sign_loss_triton as sl
    from slice_kernels.ops.sign_loss import KIND

    f32, f64, bf16, f16, u8 = torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.uint8
    m, n = 14336, 4096
    cases = {}

    for dt in (f32, bf16, f16, f64):
        cases[f"grad_accum-{dt}"] = lambda dt=dt: grad_accum.grad_accumulate_triton(
            _meta(m, n), _meta(m, n, dtype=dt), 0.5
        )
    big = (1 << 31) + 4096  # n no longer fits int32: Triton passes it as i64
    cases["grad_accum-2^31+"] = lambda: grad_accum.grad_accumulate_triton(_meta(big), _meta(big, dtype=bf16), 1.0)

    layers = [(m, n), (1024, n), (n, n)]
    cases["conflict_stats-prev"] = lambda: conflict.conflict_stats_triton(
        [_meta(*s) for s in layers], [_meta(*s) for s in layers]
    )
    cases["conflict_stats-noprev"] = lambda: conflict.conflict_stats_triton([_meta(*s) for s in layers], None)
    cases["surgery"] = lambda: conflict.surgery_triton(
        [_meta(*s) for s in layers], [_meta(*s) for s in layers], torch.tensor([0.5, 0.0, -1.0], dtype=f64)
    )

    for q in (16, 40, 128, 256, 512):  # q = r + oversample; 256 at r = 64 with the default oversample = r
        cases[f"rsvd_cholesky-q{q}"] = lambda q=q: _rsvd_triton.cholesky_shifted(
            _meta(7, q, q, dtype=f64), 1e-12, 1e-13
        )

    def gorp(dt, proj, param, out, numel=m * n):
        state = [_meta(numel, dtype=dt) for _ in range(3)]
        return lambda: gorp_update.gorp_update_triton(
            state[0],
            _meta(numel, dtype=dt) if proj else None,
            state[1],
            state[2],
            _meta(numel, dtype=param) if param is not None else None,
            _meta(numel, dtype=dt) if out else None,
            0.9,
            0.999,
            1e-8,
            0.1,
            0.001,
            1e-3,
            0.99,
        )

    cases["gorp-f32-proj-param"] = gorp(f32, True, f32, False)
    cases["gorp-f32-param_bf16"] = gorp(f32, False, bf16, False)
    cases["gorp-f32-proj-out"] = gorp(f32, True, None, True)
    cases["gorp-f32-proj-param-out"] = gorp(f32, True, f32, True)
    cases["gorp-f64-proj-param-out"] = gorp(f64, True, f64, True)
    cases["gorp-f64-out"] = gorp(f64, False, None, True)
    cases["gorp-f32-param_bf16-2^31+"] = gorp(f32, True, bf16, False, numel=big)

    def merge(out_dt, acc, widths):
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        return lambda: mm.merge_factors_triton(
            _meta(m, offsets[-1], dtype=bf16),
            _meta(offsets[-1], n, dtype=bf16),
            offsets,
            [2.0] * len(widths),
            _meta(m, n, dtype=out_dt),
            acc,
        )

    cases["merge-bf16-acc-r64x5"] = merge(bf16, True, [64] * 5)
    cases["merge-f32-r8,16"] = merge(f32, False, [8, 16])
    cases["merge-f16-acc-r1"] = merge(f16, True, [1, 1])
    cases["merge-f32-acc-r64,32"] = merge(f32, True, [64, 32])
    cases["merge-f64-r16"] = merge(f64, False, [16])  # float64 factors or W: the launcher stores float64

    def history(kind, R=640, dt=f32, mn=(m, n)):
        rows, cols = mn
        if kind == "factors":
            return _meta(rows, R), _meta(R, cols), 0
        if kind == "dense":
            return _meta(rows, cols, dtype=dt), None, 1
        return _meta(rows, (cols + 7) // 8, dtype=u8), None, 2

    def sign(kind, mode, paths, r=64, R=640, dt=f32, ab=bf16, mn=(m, n), segments=None, prec=None):
        H1, H2, k = history(kind, R, dt, mn)
        md = {"tanh": 0, "hinge": 1}[mode]
        rows, cols = mn

        def run():
            if prec is not None:  # the launchers read the dot precision from the environment (a child process)
                os.environ[sl.DOT_PRECISION_ENV] = prec
            try:
                A, B = _meta(r, cols, dtype=ab), _meta(rows, r, dtype=ab)
                if "train" in paths:  # dB with LOSS, then dA
                    sl.sign_loss_fwd_bwd_triton(A, B, H1, H2, k, md, 2.0, 0.7, 1.3, segments=segments)
                if "fwd" in paths:
                    sl.sign_loss_fwd_triton(A, B, H1, H2, k, md, 2.0, 0.7, 1.3, segments=segments)
                if "bwd" in paths:  # dB without LOSS, then dA
                    sl.sign_loss_bwd_triton(_meta((), dtype=f32), A, B, H1, H2, k, md, 2.0, 0.7, 1.3, segments=segments)
            finally:
                os.environ.pop(sl.DOT_PRECISION_ENV, None)

        return run

    # The sign-loss kernels take 1–9 s each to compile (fp32 tl.dot lowered to FMA), so by default a covering
    # set runs: every kernel (fwd, dB with and without LOSS, dA) with every history form, both modes, each
    # H dtype, r = 1 / 8 / 64 and the largest the launcher admits per form (RP 16, 64, 128 dense, 256),
    # R = 40 / 640 (16-wide chunks), and the largest operands (factors at r = 256, whose gradient kernels take
    # the narrower tiles, R = 640; a float64 dense H at r = 128).
    # SK_TRITON_AOT_ALL=1 compiles the whole product (85 s here with triton 3.6 and 16-wide chunks).
    cover = [
        ("factors", "tanh", "train", {"r": sl._max_gpu_rank(0)}),
        ("factors", "hinge", "fwd", {}),
        ("dense", "hinge", "train", {"dt": f64, "r": sl._max_gpu_rank(1)}),
        ("dense", "tanh", "fwd", {"dt": bf16}),
        ("dense", "hinge", "fwd", {"dt": f16}),
        ("dense", "tanh", "fwd", {}),
        ("bits", "tanh", "train", {"r": 1}),
        ("bits", "hinge", "fwd", {}),
        ("bits", "tanh", "bwd", {"r": 8}),
        ("factors", "tanh", "fwd", {"r": 8, "R": 40}),
    ]
    if full:
        cover = [
            (kind, mode, "train fwd bwd", {"r": r, "R": R, "dt": dt})
            for kind in ("factors", "dense", "bits")
            for mode in ("tanh", "hinge")
            for dt in ((f32, bf16, f16, f64) if kind == "dense" else (f32,))
            for r, R in ((1, 16), (8, 40), (64, 640))
        ]
        # the largest rank (8–9 s per compile): every form once, dense in its widest dtype
        cover += [
            (kind, "tanh", "train fwd bwd", {"r": sl._max_gpu_rank(KIND[kind]), "dt": dt})
            for kind, dt in (("factors", f32), ("dense", f64), ("dense", f32), ("bits", f32))
        ]
    for kind, mode, paths, kw in cover:
        r, R, dt = kw.get("r", 64), kw.get("R", 640), kw.get("dt", f32)
        tag = {"factors": f"r{r}-R{R}", "dense": f"r{r}-{str(dt)[6:]}", "bits": f"r{r}"}[kind]
        cases.setdefault(f"sign-{kind}-{mode}-{paths.replace(' ', '+')}-{tag}", sign(kind, mode, paths, **kw))
    # Issue 5's benchmark (float32 factors, R = 16 history, tanh) at its three shapes: every kernel with the
    # segments the heuristic picks for an H100's 132 SMs (SIGN_SPLIT_GRIDS), and once unsplit (S = 1, which
    # Triton specializes as a constant) at the largest tiles.
    for (rows, cols), r in SIGN_SPLIT_GRIDS:
        cases[f"sign-split-{rows}x{cols}-r{r}"] = sign(
            "factors", "tanh", "train fwd bwd", r=r, R=16, ab=f32, mn=(rows, cols)
        )
    cases["sign-unsplit-4096x4096-r64"] = sign(
        "factors", "tanh", "train fwd bwd", r=64, R=16, ab=f32, mn=(4096, 4096), segments=1
    )
    # The opt-in tf32x3 dots (SLICE_KERNELS_TRITON_DOT) at issue 5's square shape: they must compile for sm_90
    # and stay within the spill bound like the default (the "sign-split-" prefix puts them in that test).
    for r in (16, 64):
        cases[f"sign-split-tf32x3-4096x4096-r{r}"] = sign(
            "factors", "tanh", "train fwd bwd", r=r, R=16, ab=f32, mn=(4096, 4096), prec="tf32x3"
        )
    return cases


# (m, n), r -> the grids of the sign-loss launches at 132 SMs: forward and dB (row blocks of 64, S over column
# tiles of 32), dA (column blocks of 32, S over row tiles of 32); checked by test_sign_loss_splits_issue5_shapes.
# 4096×14336's dA has 448 column blocks, past the 264 aimed at: unsplit.
SIGN_SPLIT_GRIDS = {
    ((4096, 4096), 16): {"fwd": (64, 5), "dB": (64, 5), "dA": (128, 3)},
    ((4096, 4096), 64): {"fwd": (64, 5), "dB": (64, 5), "dA": (128, 3)},
    ((4096, 14336), 16): {"fwd": (64, 5), "dB": (64, 5), "dA": (448, 1)},
    ((4096, 14336), 64): {"fwd": (64, 5), "dB": (64, 5), "dA": (448, 1)},
    ((14336, 4096), 16): {"fwd": (224, 2), "dB": (224, 2), "dA": (128, 3)},
    ((14336, 4096), 64): {"fwd": (224, 2), "dB": (224, 2), "dA": (128, 3)},
}


# ------------------------------------------------------------------------------------------ the child process
def _package_kernels():
    """{'module:name': JITFunction} of every @triton.jit in slice_kernels, and the set of those that are
    launched (not helpers called only from other kernels)."""
    import importlib
    import importlib.util
    import inspect
    import pkgutil

    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    import slice_kernels

    found = {}
    for info in pkgutil.walk_packages(slice_kernels.__path__, "slice_kernels."):
        spec = importlib.util.find_spec(info.name)
        if spec.origin is None or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as fh:
            if "triton.jit" not in fh.read():  # imports only what may hold kernels (never __main__, the CLI)
                continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            jit = obj
            while isinstance(jit, (Autotuner, Heuristics)):  # @triton.autotune / @triton.heuristics wrappers
                jit = jit.fn
            if isinstance(jit, JITFunction) and jit.fn.__module__ == mod.__name__:
                found[f"{mod.__name__}:{name}"] = (mod, name, obj)
    sources = {k: inspect.getsource(_jit_of(v[2]).fn) for k, v in found.items()}
    helpers = {
        k for k, (_, name, _) in found.items() if any(f"{name}(" in src for k2, src in sources.items() if k2 != k)
    }
    return found, set(found) - helpers


def _jit_of(obj):
    while not hasattr(obj, "params"):
        obj = obj.fn
    return obj


def _variants(obj, args, kwargs):
    """(JITFunction, kwargs) of each compile one launch of ``obj`` can make: one per autotune config, with the
    values a @triton.heuristics wrapper adds."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    if isinstance(obj, Autotuner):
        return [v for cfg in obj.configs for v in _variants(obj.fn, args, {**kwargs, **cfg.all_kwargs()})]
    if isinstance(obj, Heuristics):
        named = {**dict(zip(obj.arg_names, args)), **kwargs}
        return _variants(obj.fn, args, {**kwargs, **{k: f(named) for k, f in obj.values.items()}})
    return [(obj, kwargs)]


class _Recorder:
    def __init__(self, key, fn, sink):
        self.key, self.fn, self.sink = key, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for fn, kw in _variants(self.fn, args, kwargs):
                self.sink.append((self.key, fn, args, kw, grid))

        return launch


def _compile(fn, args, kwargs, target, backend, done: dict) -> dict:
    """What JITFunction.run does on a GPU up to the launch: bind, specialize, pack the options, compile
    (once per distinct specialization: ``done`` holds the earlier results)."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    t0 = time.perf_counter()
    kwargs = dict(kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in fn.params]
    res = {
        "signature": ", ".join(f"{k}={v}" for k, v in signature.items() if v != "constexpr"),
        "constexprs": ", ".join(f"{names[p[0]]}={v}" for p, v in constexprs.items() if len(p) == 1),
        "want_warps": kwargs.get("num_warps", options.num_warps),
    }
    ident = repr((fn.fn.__qualname__, signature, constexprs, attrs, sorted(options.__dict__.items())))
    if ident not in done:
        try:
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
            done[ident] = {
                "num_warps": compiled.metadata.num_warps,
                "shared": compiled.metadata.shared,
                "seconds": round(time.perf_counter() - t0, 2),
                **_resource_usage(compiled),
            }
        except Exception as exc:
            done[ident] = {"error": f"{type(exc).__name__}: {str(exc)[-3000:]}"}
    return dict(res, **done[ident])


def _resource_usage(compiled) -> dict:
    """Registers and stack bytes per thread of the sm_90 cubin (cuobjdump, bundled with Triton beside ptxas):
    the stack is where spilled registers go. Empty when there is no cuobjdump; the metadata has no register
    count before a GPU loads the cubin."""
    import re

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    cubin = compiled.asm.get("cubin")
    if not os.path.exists(tool) or not cubin:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        out = subprocess.run([tool, "-res-usage", fh.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"regs": int(found[1]), "stack": int(found[2])} if found else {}


def _worker(full: bool, only=None) -> dict:
    """Record every case's launches; compile those of the cases in ``only`` (all when None)."""
    import traceback

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget(*H100)
    backend = make_backend(target)
    found, launched = _package_kernels()
    done = {}
    results = {"kernels": sorted(launched), "cases": {}}
    for case, call in _cases(full).items():
        sink = []
        for mod, name, fn in found.values():
            setattr(mod, name, _Recorder(f"{mod.__name__}:{name}", fn, sink))
        try:
            call()
            error = None
        except Exception:
            error = traceback.format_exc(limit=4)
        finally:
            for mod, name, fn in found.values():
                setattr(mod, name, fn)
        launches = []
        for key, fn, args, kwargs, grid in sink:
            grid = list(grid) if isinstance(grid, tuple) else None  # a callable grid depends on the meta-args
            if only is None or case in only:
                try:
                    launches.append(dict(_compile(fn, args, kwargs, target, backend, done), kernel=key, grid=grid))
                except Exception as exc:  # the binder refused the arguments: the launch would fail on a GPU too
                    launches.append({"kernel": key, "grid": grid, "error": f"{type(exc).__name__}: {exc}"})
            else:
                launches.append({"kernel": key, "grid": grid})
        results["cases"][case] = {"error": error, "launches": launches}
    return results


# -------------------------------------------------------------------------------------------------- the tests
def _why_not_here() -> str | None:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except Exception as exc:
        return f"this triton cannot compile ahead of time ({type(exc).__name__}: {exc}); install triton ≥ 3.6"
    if os.environ.get("TRITON_PTXAS_PATH"):
        return None
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return f"triton {triton.__version__} has no bundled ptxas at {ptxas} (set TRITON_PTXAS_PATH to one)"
    return None


_WHY = _why_not_here()
needs_aot = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")
_FULL = os.environ.get("SK_TRITON_AOT_ALL") == "1"
CASES = list(_cases(_FULL)) if _WHY is None else ["none"]  # without triton the ops modules have no launchers


@pytest.fixture(scope="module")
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # compile only the cases this session runs (``-k`` selections stay fast); every case is still recorded
    env["SK_TRITON_AOT_ONLY"] = json.dumps(
        [
            it.callspec.params["case"]
            for it in request.session.items
            if it.module is request.module and hasattr(it, "callspec") and "case" in it.callspec.params
        ]
    )
    env["PYTHONPATH"] = os.pathsep.join([_REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    with tempfile.TemporaryDirectory(prefix="sk_triton_aot_") as cache:
        env["TRITON_CACHE_DIR"] = cache  # empty: every run compiles everything again
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--json"],
            env=env,
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=1200 if _FULL else 600,
        )
    out = proc.stdout.rsplit(_MARK, 1)
    if proc.returncode != 0 or len(out) != 2:
        pytest.fail(
            f"the compile worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return json.loads(out[1])


@needs_aot
def test_every_kernel_has_a_case(compiled):
    seen = {la["kernel"] for c in compiled["cases"].values() for la in c["launches"]}
    missing = sorted(set(compiled["kernels"]) - seen)
    assert not missing, f"Triton kernels no case launches (add a case to _cases()): {missing}"


@needs_aot
@pytest.mark.parametrize("case", CASES)
def test_compiles_for_h100(compiled, case):
    res = compiled["cases"][case]
    assert res["error"] is None, f"the launcher failed before any compile:\n{res['error']}"
    assert res["launches"], "the launcher launched no Triton kernel"
    problems = []
    for la in res["launches"]:
        what = f"{la['kernel']}({la.get('constexprs', '')})"
        if "error" in la:
            problems.append(f"{what} does not compile for sm_90: {la['error']}")
            continue
        if la["shared"] > H100_MAX_SHARED:
            problems.append(f"{what} needs {la['shared']} B of shared memory per block; an H100 has {H100_MAX_SHARED}")
        if la["num_warps"] != la["want_warps"]:
            problems.append(f"{what} compiled with {la['num_warps']} warps, the launcher asked {la['want_warps']}")
    assert not problems, "\n".join(problems)


@needs_aot
def test_sign_loss_splits_issue5_shapes(compiled):
    """At issue 5's shapes the sign-loss kernels launch with the segments the heuristic picks for 132 SMs (a
    second grid axis; 64 programs on an H100's 132 SMs before), and the forced S = 1 launches stay unsplit."""
    names = {"_fwd_kernel": "fwd", "_dB_kernel": "dB", "_dA_kernel": "dA"}
    for ((rows, cols), r), want in SIGN_SPLIT_GRIDS.items():
        launches = compiled["cases"][f"sign-split-{rows}x{cols}-r{r}"]["launches"]
        got = {}
        for la in launches:
            got.setdefault(names[la["kernel"].split(":")[1]], set()).add(tuple(la["grid"]))
        assert got == {k: {v} for k, v in want.items()}, f"{rows}x{cols} r={r}"
    unsplit = compiled["cases"]["sign-unsplit-4096x4096-r64"]["launches"]
    assert unsplit and all(la["grid"][1] == 1 for la in unsplit)


# Stack bytes per thread a sign-loss launch of issue 5's benchmark may use. The tiles of _sign_loss_triton.py
# were chosen for at most 16 B; 64×64 tiles made ptxas fall back to 32 registers and 5–18 KB of stack per
# thread, the failure this bound is there to catch. Generous, so a toolchain that spills a few more registers
# still passes.
MAX_SIGN_LOSS_STACK = 256


@needs_aot
@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("sign-split-")] or ["none"])
def test_sign_loss_issue5_launches_do_not_spill(compiled, case):
    launches = compiled["cases"][case]["launches"]
    assert launches and all("error" not in la for la in launches), "see test_compiles_for_h100"
    if not any("stack" in la for la in launches):
        pytest.skip("no cuobjdump beside Triton's ptxas: the cubins' stack sizes cannot be read")
    heavy = [
        f"{la['kernel']}({la.get('constexprs', '')}): {la['stack']} B of stack, {la['regs']} registers"
        for la in launches
        if la.get("stack", 0) > MAX_SIGN_LOSS_STACK
    ]
    assert not heavy, "sign-loss kernels spill on sm_90 (retune _TILES in _sign_loss_triton.py):\n" + "\n".join(heavy)


@pytest.mark.parametrize("path", ["fwd", "bwd", "fwd_bwd"])
def test_sign_loss_launcher_refuses_a_rank_whose_tiles_overflow_gpu_shared_memory(monkeypatch, path):
    """A dense history at r = 129 pads to RP = 256: 245760 B of shared memory per block on sm_90 (float32 H),
    past the H100's 232448, so the launch would fail with "out of resources"; the launcher says so first,
    naming the way out."""
    from slice_kernels import dispatch
    from slice_kernels.ops import _sign_loss_triton as sl

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)  # the GPU path's block and rank limits
    m, n, r = 64, 48, sl._max_gpu_rank(1) + 1
    A, B, H = _meta(r, n), _meta(m, r), _meta(m, n)
    args = (A, B, H, None, 1, 0, 2.0, 0.7, 1.3)  # a dense history: at most r = 128
    call = {
        "fwd": lambda: sl.sign_loss_fwd_triton(*args),
        "fwd_bwd": lambda: sl.sign_loss_fwd_bwd_triton(*args),
        "bwd": lambda: sl.sign_loss_bwd_triton(_meta(()), *args),
    }[path]
    with pytest.raises(ValueError, match=r"rank r=129 with a dense history .*cuda backend"):
        call()


def test_an_automatic_triton_pick_past_its_rank_limit_runs_the_torch_reference(monkeypatch):
    """On CUDA tensors without the extension the dispatcher picks Triton; a rank past its GPU limit must then run
    the torch reference (same loss) instead of failing, while a forced Triton still raises (test above)."""
    from slice_kernels import dispatch
    from slice_kernels.ops import sign_loss as op

    monkeypatch.setattr(dispatch, "interpreting", lambda: False)
    monkeypatch.setattr(dispatch, "select", lambda name, device: ("triton", None))  # what CUDA without _C gives
    big = op._tri._max_gpu_rank(1) + 1
    assert op._auto_backend("cpu", big, 1) == "torch"
    assert op._auto_backend("cpu", op._tri._max_gpu_rank(1), 1) == "triton"
    assert op._auto_backend("cpu", big, 0) == "triton"  # factor histories take up to 256
    with dispatch.use_backend("triton"):
        assert op._auto_backend("cpu", big, 1) == "triton"


# ------------------------------------------------------------------------ runtime checks the interpreter hides
# Row offsets past 2³¹ elements: CI's small shapes never reach them, and an int32 row·stride wraps to a negative
# address on a GPU (illegal access or another row's data). 524352×4096 passes 2³¹ in its last 64 rows.
_BIG_M, _BIG_N = (1 << 31) // 4096 + 64, 4096


@pytest.mark.gpu
def test_triton_merge_writes_rows_past_2_31_elements():
    from slice_kernels.ops._magnitude_merge_triton import merge_factors_triton

    B = torch.ones(_BIG_M, 1, device="cuda")
    B[-64:] = 2.0
    A = torch.ones(1, _BIG_N, device="cuda")
    out = torch.zeros(_BIG_M, _BIG_N, dtype=torch.bfloat16, device="cuda")
    merge_factors_triton(B, A, [0, 1], [1.5], out, False)
    assert bool(out[-64:].eq(3.0).all()), "rows past 2³¹ elements were not written"
    assert bool(out[:-64].eq(1.5).all()), "rows below 2³¹ elements were overwritten"


@pytest.mark.gpu
def test_triton_sign_loss_reads_a_dense_history_past_2_31_elements():
    from slice_kernels.ops import _sign_loss_triton as sl

    m, n = _BIG_M, _BIG_N
    H = torch.ones(m, n, dtype=torch.bfloat16, device="cuda")
    H[-64:] = -1.0  # only the rows past 2³¹ elements disagree with ΔW = 1: hinge loss 1 there, 0 elsewhere
    A = torch.ones(1, n, device="cuda")
    B = torch.ones(m, 1, device="cuda")
    hinge, dense = 1, 1
    loss = sl.sign_loss_fwd_triton(A, B, H, None, dense, hinge, 1.0, 1.0, 1.0)
    loss2, dA, dB = sl.sign_loss_fwd_bwd_triton(A, B, H, None, dense, hinge, 1.0, 1.0, 1.0)
    want = 64.0 / m
    assert abs(float(loss) - want) <= 1e-6 * want and abs(float(loss2) - want) <= 1e-6 * want
    # G = ∂L/∂ΔW = 1/(m·n) on the last 64 rows, 0 elsewhere: dB = G·Aᵀ, dA = Bᵀ·G
    torch.testing.assert_close(dB[-64:], torch.full((64, 1), 1.0 / m, device="cuda"), rtol=1e-5, atol=0)
    assert bool(dB[:-64].eq(0).all())
    torch.testing.assert_close(dA, torch.full((1, n), 64.0 / (m * n), device="cuda"), rtol=1e-5, atol=0)


if __name__ == "__main__":
    sys.path.insert(0, _REPO)
    if "--json" not in sys.argv:  # a human: the table
        os.environ.pop("TRITON_INTERPRET", None)
        for case, res in _worker(full=True)["cases"].items():
            for la in res["launches"]:
                print(
                    f"{case:32s} {la['kernel'].split(':')[1]:28s} grid={la.get('grid')} "
                    f"shared={la.get('shared', '-'):>7} warps={la.get('num_warps', '-')} regs={la.get('regs', '-')} "
                    f"stack={la.get('stack', '-')} {la.get('seconds', '-')}s {la.get('constexprs', '')} "
                    f"{la.get('error', '')[:300]}"
                )
            if res["error"]:
                print(case, res["error"])
    else:
        only = os.environ.get("SK_TRITON_AOT_ONLY")
        print(_MARK + json.dumps(_worker(_FULL, set(json.loads(only)) if only else None)))
