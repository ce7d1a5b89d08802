"""Would TF32 products keep the randomized SVD as accurate as ``torch.svd_lowrank``? A CPU emulation.

On an H100 the sketch products (10 passes over every gradient at niter = 4) are most of the whole init's
FLOPs, and TF32 tensor cores would run them about 8× faster than float32 CUDA cores. TF32 cannot run here,
but its arithmetic can be emulated: each float32 operand of a product is rounded to 10 mantissa bits
(round to nearest, as cuBLAS's conversion does) and the product is accumulated in float32. This script runs
the fused backends' algorithm (``_rsvd_cholqr``, through the cpp backend) and ``torch.svd_lowrank(q=4r,
niter=4)`` on the real SmolLM2 gradient fixtures of ``tests/ops/test_rsvd.py`` in three precisions:

* ``fp32``: every product in float32 (torch's default, ``float32_matmul_precision="highest"``);
* ``tf32``: every float32 product emulated TF32 (what ``torch.set_float32_matmul_precision("high")`` does);
* ``mixed`` (ours only): the first 2·niter float32 products emulated TF32 (the sketch and every power
  product but the last ``G·Z``), everything after in float32.

It prints the captured top-2r subspace error ‖(I − UUᵀ)U_kΣ_k‖/‖Σ_k‖ and the reconstruction error
‖G − USVᵀ‖/‖G‖, each the mean over three sketches. Float64 metrics; no GPU needed.

    python benches/rsvd_tf32_emulation.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from slice_kernels import dispatch, extension  # noqa: E402
from slice_kernels.ops import rsvd  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "rsvd_smollm2_grads.pt")
_matmul = torch.Tensor.__matmul__
_tensor_matmul = torch.Tensor.matmul  # torch.svd_lowrank forms its U by the method: Q.matmul(U)
_torch_matmul = torch.matmul


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to TF32 (8-bit exponent, 10-bit mantissa), round to nearest with ties away from zero."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


@contextlib.contextmanager
def emulated_tf32(first: int | None = None):
    """Float32 products through ``@``, ``Tensor.matmul`` and ``torch.matmul`` on TF32-rounded operands: all of
    them, or only the first ``first`` (counted across the three entry points)."""
    count = [0]

    def wrap(fn):
        def mm(a, b, **kw):
            if a.dtype == torch.float32 and b.dtype == torch.float32:
                count[0] += 1
                if first is None or count[0] <= first:
                    return fn(round_tf32(a), round_tf32(b), **kw)
            return fn(a, b, **kw)

        return mm

    torch.Tensor.__matmul__ = wrap(_matmul)
    torch.Tensor.matmul = wrap(_tensor_matmul)
    torch.matmul = wrap(_torch_matmul)
    try:
        yield
    finally:
        torch.Tensor.__matmul__ = _matmul
        torch.Tensor.matmul = _tensor_matmul
        torch.matmul = _torch_matmul


def metrics(G64, U, S, V, Ue, Se):
    W = Ue * Se
    sub = (torch.linalg.norm(W - U @ (U.T @ W)) / torch.linalg.norm(Se)).item()
    rec = (torch.linalg.norm(G64 - (U * S) @ V.T) / torch.linalg.norm(G64)).item()
    return sub, rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="4,16")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--niter", type=int, default=4)
    args = ap.parse_args(argv)
    if extension.load() is None or dispatch.refusal("randomized_svd", "cpp", torch.device("cpu")) is not None:
        print("rsvd_tf32_emulation: needs the C++ extension (pip install -e . builds it)", file=sys.stderr)
        return 2
    layers = {n: t.float() for n, t in torch.load(FIXTURE).items()}
    variants = {
        "ours fp32": ("ours", contextlib.nullcontext),
        "ours tf32": ("ours", emulated_tf32),
        "ours mixed": ("ours", lambda: emulated_tf32(first=2 * args.niter)),
        "svd_lowrank fp32": ("lowrank", contextlib.nullcontext),
        "svd_lowrank tf32": ("lowrank", emulated_tf32),
    }
    print(
        f"emulated TF32, niter = {args.niter}, mean of {args.seeds} sketches; "
        "each cell: subspace error / reconstruction error (relative)\n"
    )
    print("| layer | r | " + " | ".join(variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for name, G in layers.items():
        for r in (int(x) for x in args.ranks.split(",")):
            m, n = G.shape
            k, q = 2 * r, min(4 * r, m, n)
            G64 = G.double()
            Ue, Se, _ = rsvd.exact_svd(G64[None], k)
            cells = []
            for kind, ctx in variants.values():
                runs = []
                for seed in range(args.seeds):
                    if kind == "ours":
                        omega = rsvd.sketch([seed], n, q, "cpu")
                        with ctx(), dispatch.use_backend("cpp"):
                            U, S, V = rsvd.randomized_svd(G[None], omega, k, args.niter)
                        U, S, V = U[0], S[0], V[0]
                    else:
                        torch.manual_seed(seed)
                        with ctx():
                            U, S, V = torch.svd_lowrank(G, q=q, niter=args.niter)
                        U, S, V = U[:, :k], S[:k], V[:, :k]
                    runs.append(metrics(G64, U.double(), S.double(), V.double(), Ue[0], Se[0]))
                sub = sum(x[0] for x in runs) / len(runs)
                rec = sum(x[1] for x in runs) / len(runs)
                cells.append(f"{sub:.1e} / {rec:.6f}")
            print(f"| {name.removeprefix('model.')} | {r} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
