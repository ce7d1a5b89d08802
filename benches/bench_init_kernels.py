"""SLICE init-path kernels (issue 4): conflict statistics, surgery, batched randomized SVD, whole init.

    python benches/bench_init_kernels.py [--device cpu|cuda] [--ranks 16,64] [--batch 32] [--blocks 4] [--threads 1]
    python -m pytest benches/bench_init_kernels.py --benchmark-only      # pytest-benchmark suite (see its section)

Prints Markdown tables; every figure is a median measured in this run (benches/common.py):

1. conflict_stats and surgery_ over the linear layers of ``--blocks`` transformer blocks (Llama-3-8B shapes on
   GPU: q/o 4096×4096, k/v 1024×4096, gate/up 14336×4096, down 4096×14336; one eighth of each side on CPU),
   the dispatcher's fused backend against the torch reference (chunked float64 per layer: the unfused path),
   with the floor = bytes that must move (8 B/element for the statistics, 12 for the surgery) over the measured
   copy bandwidth, and the fraction of that bandwidth reached.
   The 100M-element accuracy case of the issue: ``--accuracy`` adds a 100M-element pair (GPU) checked against
   the float64 reference (relative error printed).
2. randomized SVD of ``--batch`` same-shape layers per shape and rank: the fused backend (Cholesky-QR power
   iterations), the torch reference (Householder QR each step), a loop of ``torch.svd_lowrank(q=4r, niter=4)``
   over the layers, and ``torch.linalg.svd`` (timed on one layer, times the batch: a full SVD of 32 such layers
   takes minutes), with ratios, the floor (max of 2(niter+1) products' FLOPs over the measured matmul rate and
   their bytes over the bandwidth), and the relative reconstruction error ‖G − USVᵀ‖/‖G‖ of the fused
   backend and of svd_lowrank on the same matrices (low-rank-plus-noise test matrices).
3. the whole init after collection (statistics, surgery, SVD, scale, absorb) over ``--init-blocks`` blocks, as
   ``get_slice_model`` runs it (surgery in place, absorbed into the weights in place), default backends
   against everything forced to torch. 224 layers of Llama-3-8B are ``--init-blocks 32``: about 70 GB of
   weights and both gradient sets; a device that runs out of memory is retried with half the blocks.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import StreamTable, copy_bandwidth, fmt_time, machine, matmul_rate, median_time, sync  # noqa: E402

from slice_kernels import SliceConfig, dispatch, init_from_gradients  # noqa: E402
from slice_kernels.ops import conflict, rsvd  # noqa: E402
from slice_kernels.slice_init import absorb_  # noqa: E402

LLAMA3_8B_BLOCK = {  # (out, in) of each target linear in one decoder block
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
SVD_SHAPES_GPU = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def block_shapes(device: str, blocks: int) -> dict[str, tuple[int, int]]:
    div = 1 if device == "cuda" else 8
    return {f"layers.{b}.{n}": (m // div, k // div) for b in range(blocks) for n, (m, k) in LLAMA3_8B_BLOCK.items()}


def _grads(shapes, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    cur = [torch.randn(s, device=device, generator=g) for s in shapes]
    prev = [(-0.3 * c).add_(torch.randn(c.shape, device=device, generator=g)) for c in cur]
    return cur, prev


def bench_conflict(device, blocks, bw, accuracy):
    shapes = list(block_shapes(device, blocks).values())
    cur, prev = _grads(shapes, device)
    n = sum(c.numel() for c in cur)
    fused = dispatch.select("conflict_stats", device)[0]
    # every fused backend this device takes (cuda and triton on a GPU), each against the same torch figure
    backends = [
        b
        for b in ("cuda", "triton", "cpp")
        if dispatch.refusal("conflict_stats", b, torch.device(device)) is None
        and dispatch.refusal("surgery", b, torch.device(device)) is None
    ]
    gam = torch.full((len(cur),), 1e-3, dtype=torch.float64)
    print(f"\n### conflict statistics and surgery ({device}, default fused backend = {fused})\n", flush=True)
    table = StreamTable()
    for what, bytes_per, ref, op in [
        (
            "conflict_stats",
            8,
            lambda: conflict.conflict_stats_torch(cur, prev),
            lambda: conflict.conflict_stats(cur, prev),
        ),
        ("surgery_", 12, lambda: conflict.surgery_torch(cur, prev, gam), lambda: conflict.surgery_(cur, prev, gam)),
    ]:
        t_ref = median_time(ref, device)
        floor = bytes_per * n / bw
        for b in backends:
            with dispatch.use_backend(b):
                t_b = median_time(op, device)
            table.add(
                {
                    "op": what,
                    "backend": b,
                    "layers": len(cur),
                    "elements": f"{n / 1e6:.1f}M",
                    "torch (unfused)": fmt_time(t_ref),
                    "fused": fmt_time(t_b),
                    "speed-up": f"{t_ref / t_b:.2f}×",
                    "floor": fmt_time(floor),
                    "% of bandwidth": f"{100 * floor / t_b:.0f}%",
                }
            )
    if accuracy:
        big = 100_000_000 if device == "cuda" else 8_000_000
        c, p = _grads([(big,)], device, seed=1)
        got = conflict.conflict_stats(c, p).cpu().sum(0)
        ref = conflict.conflict_stats_torch([c[0].double()], [p[0].double()]).cpu().sum(0)
        print(
            f"\n{big / 1e6:.0f}M-element pair, {fused} vs float64 reference: max relative error "
            f"{((got - ref).abs() / ref.abs()).max().item():.2e}"
        )


def lowrank_test_matrices(b, m, n, device, seed=0):
    """Gradient-like test matrices: a decaying rank-256 part plus 1% noise."""
    g = torch.Generator(device=device).manual_seed(seed)
    p = min(256, m, n)
    s = torch.logspace(0, -3, p, device=device)
    L = torch.randn(b, m, p, device=device, generator=g) * s
    G = L @ torch.randn(b, p, n, device=device, generator=g) / n**0.5
    return G.add_(torch.randn(b, m, n, device=device, generator=g), alpha=0.01 / n**0.5)


def _rel_err(G, U, S, V):
    return ((G - (U * S[:, None, :]) @ V.transpose(-1, -2)).norm() / G.norm()).item()


def bench_rsvd(device, ranks, batch, shapes, bw, rate, niter=4):
    # forced: the cpp SVD is not in the CPU default order (auto=False), but it is what is measured here
    order = ("cuda", "triton") if device == "cuda" else ("cpp",)
    fused = next((b for b in order if dispatch.refusal("randomized_svd", b, torch.device(device)) is None), "torch")
    print(f"\n### batched randomized SVD, niter={niter}, q = 4r ({device}, fused backend = {fused})\n", flush=True)
    table = StreamTable()  # row by row: a step cut off by its time limit keeps the shapes it finished
    for m, n in shapes:
        G = lowrank_test_matrices(batch, m, n, device)
        # one full SVD per shape (it does not depend on r), timed on one layer, times the batch
        t_full = batch * median_time(lambda: torch.linalg.svd(G[0], full_matrices=False), device, warmup=0, repeats=1)
        for r in ranks:
            k, q = 2 * r, min(4 * r, m, n)
            omega = rsvd.sketch(list(range(batch)), n, q, device)

            def run_fused():
                with dispatch.use_backend(fused):
                    return rsvd.randomized_svd(G, omega, k, niter)

            t_fused = median_time(run_fused, device, warmup=1, repeats=3)
            t_ref = median_time(lambda: rsvd.randomized_svd_torch(G, omega, k, niter), device, warmup=1, repeats=3)

            def loop():
                return [torch.svd_lowrank(G[i], q=q, niter=niter) for i in range(batch)]

            t_loop = median_time(loop, device, warmup=1, repeats=3)
            flops = batch * (2 * niter + 2) * 2.0 * m * n * q
            floor = max(flops / rate, batch * (2 * niter + 2) * m * n * 4 / bw)
            U, S, V = run_fused()
            e_fused = _rel_err(G, U, S, V)
            torch.manual_seed(0)
            lr = loop()
            e_loop = (
                sum(
                    _rel_err(G[i : i + 1], u[None, :, :k], s[None, :k], v[None, :, :k]) ** 2
                    for i, (u, s, v) in enumerate(lr)
                )
                ** 0.5
                / batch**0.5
            )
            table.add(
                {
                    "shape": f"{batch}×{m}×{n}",
                    "r": r,
                    fused: fmt_time(t_fused),
                    "torch ref (Householder)": fmt_time(t_ref),
                    "svd_lowrank loop": fmt_time(t_loop),
                    "linalg.svd": fmt_time(t_full),
                    "vs ref": f"{t_ref / t_fused:.2f}×",
                    "vs svd_lowrank": f"{t_loop / t_fused:.2f}×",
                    "vs linalg.svd": f"{t_full / t_fused:.1f}×",
                    "floor": fmt_time(floor),
                    "rel. err fused": f"{e_fused:.4e}",
                    "rel. err svd_lowrank": f"{e_loop:.4e}",
                }
            )
            omega = U = S = V = lr = None  # free the device memory before the next rank
        G = None


def bench_init(device, blocks, r=16):
    """The whole init over ``blocks`` decoder blocks; on a device that runs out of memory, again with half as
    many (said in the output), so one GPU call still yields a figure."""
    while True:
        try:
            return _bench_init(device, blocks, r)
        except torch.cuda.OutOfMemoryError as exc:
            if blocks == 1:
                raise
            msg = str(exc).splitlines()[0]
        # outside the except clause: the traceback's frames (and their tensors) are gone before the retry
        torch.cuda.empty_cache()
        print(
            f"\nwhole init over {blocks} blocks ({7 * blocks} layers) ran out of device memory ({msg}); "
            f"retrying with {blocks // 2} blocks",
            flush=True,
        )
        blocks //= 2


def _bench_init(device, blocks, r, repeats=3):
    """What ``get_slice_model`` runs after collection: ``init_from_gradients(inplace_gradients=True,
    absorb=False)`` then ``absorb_`` into each weight in place, so the device holds the weights and the two
    gradient sets once (224 Llama-3-8B layers: 14 GB of bf16 weights + 2 × 28 GB of float32 gradients)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shapes = block_shapes(device, blocks)
    names = list(shapes)
    cur, prev = _grads(list(shapes.values()), device, seed=2)
    wdt = torch.bfloat16 if device == "cuda" else torch.float32
    weights = {n: (0.02 * torch.randn(s, device=device)).to(wdt) for n, s in shapes.items()}
    g_cur, g_prev = dict(zip(names, cur)), dict(zip(names, prev))
    cfg = SliceConfig()

    def init():
        res = init_from_gradients(
            weights, g_cur, g_prev, r=r, lora_alpha=2.0, config=cfg, inplace_gradients=True, absorb=False
        )
        for n in names:
            if res.report.layers[n].get("offset", False):
                absorb_(weights[n], res.B[n], res.A[n], res.scaling)
        return res

    def timed():
        # untimed: the last surgery left ⟨G_cur, G_prev⟩ = 0; put a conflict back so every run does the surgery
        for c, p in zip(cur, prev):
            c.add_(p, alpha=-0.3)
        sync(device)
        t0 = time.perf_counter()
        res = init()
        sync(device)
        return time.perf_counter() - t0, res

    t = {}
    print(
        f"\n### whole init after collection: init_from_gradients, then absorb_ in place ({device})\n\n"
        f"median: the init and the in-place absorb together; phases: the init's own report (its absorb phase is "
        f"empty there: absorb=False)\n",
        flush=True,
    )
    table = StreamTable()
    # the default backends first: the figure the target is about survives a step cut off by its limit
    for label, forced in [("default backends", None), ("torch (reference ops)", "torch")]:
        with dispatch.use_backend(forced):
            runs = [timed() for _ in range(repeats + 1)][1:]  # the first warms up
        t[label] = statistics.median(dt for dt, _ in runs)
        rep = runs[-1][1].report
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device == "cuda" else "–"
        table.add(
            {
                "ops": label,
                "backends": ", ".join(f"{k}={v}" for k, v in rep.backends.items()),
                "layers": len(names),
                "r": r,
                "γ": f"{rep.gamma:.3f}",
                "median": fmt_time(t[label]),
                "device peak": peak,
                "phases": ", ".join(f"{p} {fmt_time(v['seconds'])}" for p, v in rep.phases.items()),
            }
        )
    print(f"\nspeed-up of the default backends: {t['torch (reference ops)'] / t['default backends']:.2f}×")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", default=None, help="comma-separated r (default 16,64 on GPU, 16 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="layers per SVD batch (default 32 GPU, 4 CPU)")
    ap.add_argument("--blocks", type=int, default=None, help="decoder blocks for stats/surgery/init (4 GPU, 2 CPU)")
    ap.add_argument(
        "--init-blocks",
        type=int,
        default=None,
        help="blocks for the whole init (default 32 = the 224 layers of the target on GPU, --blocks on CPU)",
    )
    ap.add_argument("--accuracy", action="store_true", help="also check a 100M-element pair (8M on CPU)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: conflict,rsvd,init")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 gives stable figures on an oversubscribed machine)",
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    gpu = dev == "cuda"
    ranks = [int(x) for x in (a.ranks or ("16,64" if gpu else "16")).split(",")]
    batch = a.batch or (32 if gpu else 4)
    blocks = a.blocks or (4 if gpu else 2)
    shapes = SVD_SHAPES_GPU if gpu else [(m // 8, n // 8) for m, n in SVD_SHAPES_GPU]
    skip = set(filter(None, a.skip.split(",")))
    bw, rate = copy_bandwidth(dev), matmul_rate(dev)
    print(f"# init kernels benchmark\n\nmachine: {machine(dev)}\n")
    print(f"measured copy bandwidth {bw / 1e9:.1f} GB/s, float32 matmul {rate / 1e12:.2f} TFLOP/s")
    if "conflict" not in skip:
        bench_conflict(dev, blocks, bw, a.accuracy)
    if "rsvd" not in skip:
        bench_rsvd(dev, ranks, batch, shapes, bw, rate)
    if "init" not in skip:
        bench_init(dev, a.init_blocks or (32 if gpu else blocks))


# ------------------------------------------------------------------ pytest-benchmark suite
# The same comparisons as the tables, in pytest-benchmark form: on the CPU at the shapes of block_shapes("cpu")
# (Llama-3-8B's divided by 8), on a GPU (when there is one) at Llama-3-8B's own, r in {16, 64}. The tables
# above add the floors and the 32-layer batches of the targets; this suite is for pytest-benchmark's own
# tooling (--benchmark-compare, --benchmark-json).
SUITE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SUITE_RANKS = [16, 64]
SUITE_SVD_BATCH = 4  # same-shape layers per batched call; the tables time the target's 32
SUITE_SHAPE_IDS = ["q_o", "k_v", "gate_up", "down"]  # the layers of SVD_SHAPES_GPU, in order


def _suite_shapes(device):
    return SVD_SHAPES_GPU if device == "cuda" else [(m // 8, n // 8) for m, n in SVD_SHAPES_GPU]


def _bench_backends(op, device):
    # the interpreted Triton kernels are not timed on the CPU: the interpreter measures Python, not the kernel
    return [
        b
        for b in ("torch", "cpp", "cuda", "triton")
        if b in dispatch.implementations(op)
        and dispatch.refusal(op, b, torch.device(device)) is None
        and not (b == "triton" and device == "cpu")
    ]


def _synced(fn, device):
    # CUDA launches return before the work is done: time up to its end
    if device != "cuda":
        return fn
    return lambda *a: (fn(*a), torch.cuda.synchronize())[0]


def _suite_params(op, extra=()):
    import pytest

    return [pytest.param(d, b, id=f"{d}-{b}") for d in SUITE_DEVICES for b in _bench_backends(op, d) + list(extra)]


try:
    import pytest

    @pytest.mark.parametrize("device,backend", _suite_params("conflict_stats"))
    def test_conflict_stats(benchmark, device, backend):
        cur, prev = _grads(list(block_shapes(device, 1).values()), device)
        with dispatch.use_backend(backend):
            benchmark(_synced(conflict.conflict_stats, device), cur, prev)

    @pytest.mark.parametrize("device,backend", _suite_params("surgery"))
    def test_surgery(benchmark, device, backend):
        cur, prev = _grads(list(block_shapes(device, 1).values()), device)
        gam = torch.full((len(cur),), 1e-3, dtype=torch.float64)
        with dispatch.use_backend(backend):
            benchmark(_synced(conflict.surgery_, device), cur, prev, gam)

    @pytest.mark.parametrize("r", SUITE_RANKS)
    @pytest.mark.parametrize("shape_index", range(len(SVD_SHAPES_GPU)), ids=SUITE_SHAPE_IDS)
    @pytest.mark.parametrize("device,backend", _suite_params("randomized_svd", ["svd_lowrank_loop"]))
    def test_randomized_svd(benchmark, device, backend, shape_index, r):
        m, n = _suite_shapes(device)[shape_index]
        G = lowrank_test_matrices(SUITE_SVD_BATCH, m, n, device)
        q = min(4 * r, m, n)
        if backend == "svd_lowrank_loop":
            benchmark(_synced(lambda: [torch.svd_lowrank(g, q=q, niter=4) for g in G], device))
        else:
            omega = rsvd.sketch(range(SUITE_SVD_BATCH), n, q, device)
            with dispatch.use_backend(backend):
                benchmark(_synced(rsvd.randomized_svd, device), G, omega, 2 * r, 4)

    @pytest.mark.parametrize("shape_index", range(len(SVD_SHAPES_GPU)), ids=SUITE_SHAPE_IDS)
    @pytest.mark.parametrize("device", SUITE_DEVICES)
    def test_linalg_svd(benchmark, device, shape_index):
        # one layer (the full SVD does not depend on r); the tables multiply it by the batch
        m, n = _suite_shapes(device)[shape_index]
        G = lowrank_test_matrices(1, m, n, device)[0]
        benchmark.pedantic(
            _synced(torch.linalg.svd, device),
            args=(G,),
            kwargs={"full_matrices": False},
            rounds=3,
            warmup_rounds=1 if device == "cuda" else 0,
        )
except ImportError:  # pragma: no cover - pytest is only needed for the suite
    pass


if __name__ == "__main__":
    main()
