"""GORP step time against a GaLore-style reference and plain AdamW (issue 6).

    python benches/bench_gorp.py [--device cpu|cuda] [--shapes 1024x512,2048x1024] [--rank 32] [--gap 10] [--threads 1]

Per shape, one full-rank weight W (m×n) with a fixed gradient; every figure is the median over repeats of
the mean time per step over one refresh cycle (``gap`` steps, one projector refresh), all measured in this run,
the variants timed in turn within each repeat (so load changes on a shared machine hit them alike):

* ``adamw``        – ``torch.optim.AdamW`` on W (foreach), the full-rank baseline;
* ``galore_ref``   – GaLore-style: full ``torch.linalg.svd`` refresh, projected Adam written as eager torch ops,
                     lift-back and update unfused;
* ``gorp``         – ``GorpAdamW`` ``lowrank`` group: randomized SVD refresh, fused epilogue (``gorp_update``,
                     backend chosen by the dispatcher), lift-back + update in one ``addmm``;
* ``gorp+space``   – the same with a shared space of 2r directions to orthogonalize against.

Then the two parts in isolation: the refresh (``torch.linalg.svd`` vs the randomized SVD) and the epilogue
(eager torch vs the fused op), with the epilogue's memory floor: bytes it must move over the bandwidth of
a large ``copy_`` measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import copy_bandwidth, machine  # noqa: E402  (benches/common.py, shared timing helpers)

from slice_kernels import GorpAdamW, dispatch  # noqa: E402
from slice_kernels.ops import rsvd  # noqa: E402
from slice_kernels.ops.gorp_update import gorp_update_, gorp_update_torch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict, device, repeats, inner):
    """Median seconds per call of each fn, the fns timed in turn within every repeat, so that load changes on
    a shared machine hit all of them alike and their ratios stay meaningful."""
    for f in fns.values():
        for _ in range(inner):  # warm-up: one full refresh cycle
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            sync(device)
            times[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


class GaloreRef:
    """GaLore's recipe as a user would write it: full SVD refresh, Adam in the projected space, unfused."""

    def __init__(self, p, rank, gap, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, scale=1.0):
        self.p, self.rank, self.gap, self.lr, self.betas, self.eps, self.scale = p, rank, gap, lr, betas, eps, scale
        self.t, self.P, self.m, self.v = 0, None, None, None

    @torch.no_grad()
    def step(self):
        G = self.p.grad
        tall = G.shape[0] >= G.shape[1]
        if self.t % self.gap == 0:
            U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
            self.P = Vh[: self.rank] if tall else U[:, : self.rank]
        g = G @ self.P.T if tall else self.P.T @ G
        if self.m is None:
            self.m, self.v = torch.zeros_like(g), torch.zeros_like(g)
        self.t += 1
        b1, b2 = self.betas
        self.m = b1 * self.m + (1 - b1) * g
        self.v = b2 * self.v + (1 - b2) * g * g
        u = (self.m / (1 - b1**self.t)) / ((self.v / (1 - b2**self.t)).sqrt() + self.eps)
        d = u @ self.P if tall else self.P @ u
        self.p.add_(self.scale * d, alpha=-self.lr)


def bench_shape(m, n, rank, gap, device, repeats):
    gen = torch.Generator(device=device).manual_seed(0)
    G = torch.randn(m, n, device=device, generator=gen)

    def param():
        p = torch.nn.Parameter(torch.randn(m, n, device=device, generator=gen) * 0.02)
        p.grad = G.clone()
        return p

    steppers = {}
    p = param()
    steppers["adamw"] = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0).step
    p = param()
    steppers["galore_ref"] = GaloreRef(p, rank, gap).step
    p = param()
    steppers["gorp"] = GorpAdamW(
        [{"params": [p], "kind": "lowrank", "names": ["w"]}], lr=1e-3, rank=rank, update_proj_gap=gap
    ).step
    p = param()
    opt = GorpAdamW([{"params": [p], "kind": "lowrank", "names": ["w"]}], lr=1e-3, rank=rank, update_proj_gap=gap)
    d = m if m >= n else n
    S, _ = torch.linalg.qr(torch.randn(d, 2 * rank, device=device, generator=gen))
    opt.load_shared_spaces({"w": S})
    steppers["gorp+space"] = opt.step
    rows = interleaved(steppers, device, repeats, inner=gap)

    # parts in isolation
    q = min(2 * rank, min(m, n))
    omega = rsvd.sketch([1], n, q, device)
    parts = interleaved(
        {
            "refresh: torch.linalg.svd": lambda: torch.linalg.svd(G, full_matrices=False),
            "refresh: randomized_svd (q=2r, 2 power its)": lambda: rsvd.randomized_svd(G[None], omega, rank, 2),
        },
        device,
        repeats,
        inner=1,
    )
    gshape = (m, rank) if m >= n else (rank, n)
    gg = torch.randn(gshape, device=device, generator=gen)
    pr = 0.1 * torch.randn(gshape, device=device, generator=gen)
    mm, vv, out = (
        torch.zeros(gshape, device=device),
        torch.zeros(gshape, device=device),
        torch.empty(gshape, device=device),
    )
    hp = dict(beta1=0.9, beta2=0.999, eps=1e-8, bc1=0.1, bc2=0.001)

    def eager():
        g2 = gg - pr
        m2 = 0.9 * mm + 0.1 * g2
        v2 = 0.999 * vv + 0.001 * g2 * g2
        mm.copy_(m2)
        vv.copy_(v2)
        out.copy_((m2 / 0.1) / ((v2 / 0.001).sqrt() + 1e-8))

    backend = dispatch.select("gorp_update", device)[0]
    parts.update(
        interleaved(
            {
                "epilogue: eager torch": eager,
                "epilogue: torch reference (in place)": lambda: gorp_update_torch(
                    gg, pr, mm, vv, None, out, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.0, 1.0
                ),
                f"epilogue: fused gorp_update ({backend})": lambda: gorp_update_(gg, pr, mm, vv, out=out, **hp),
            },
            device,
            repeats,
            inner=20,
        )
    )
    return rows, parts, gg.numel()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default="1024x512,512x2048,2048x1024")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--gap", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 gives steadier figures on a machine shared with other jobs",
    )
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(
        f"{machine(device)}; torch threads {torch.get_num_threads()}; rank {a.rank}, gap {a.gap}, median of {a.repeats}"
    )
    bw = copy_bandwidth(device)
    print(f"measured copy bandwidth: {bw / 1e9:.1f} GB/s\n")
    print(
        "| shape | adamw ms/step | galore_ref ms/step | gorp ms/step | gorp+space ms/step | galore_ref / gorp | gorp / adamw |"
    )
    print("|---|---|---|---|---|---|---|")
    all_parts = []
    for s in a.shapes.split(","):
        m, n = (int(x) for x in s.split("x"))
        rows, parts, numel = bench_shape(m, n, a.rank, a.gap, device, a.repeats)
        ms = {k: 1e3 * v for k, v in rows.items()}
        print(
            f"| {m}×{n} | {ms['adamw']:.3f} | {ms['galore_ref']:.3f} | {ms['gorp']:.3f} | {ms['gorp+space']:.3f} | "
            f"{rows['galore_ref'] / rows['gorp']:.2f}× | {rows['gorp'] / rows['adamw']:.2f}× |"
        )
        all_parts.append((m, n, parts, numel))
    print("\n| shape | part | ms | note |")
    print("|---|---|---|---|")
    for m, n, parts, numel in all_parts:
        # epilogue floor: read g, proj, m, v; write m, v, out — 7 float32 arrays of g's size
        floor = 7 * 4 * numel / bw
        for k, v in parts.items():
            note = f"floor {1e3 * floor:.4f} ms ({floor / v:.0%} of it)" if k.startswith("epilogue") else ""
            print(f"| {m}×{n} | {k} | {1e3 * v:.3f} | {note} |")


if __name__ == "__main__":
    main()
