"""Benchmark of the PS-LoRA fused loss (forward + backward) and magnitude merge against what a user would run
otherwise: the eager materialize-then-reduce code, and ``torch.compile`` of that same code.

    python benches/bench_ps_lora.py                 # GPU if present, else CPU at reduced shapes
    python benches/bench_ps_lora.py --device cpu --shapes 1024x1024,1024x3584,3584x1024 --ranks 16,64

Prints one markdown table per op with medians over ``--repeat`` runs (after warm-up), the ratios measured in
the same run, and the extra peak memory of each variant: on CUDA the allocator's peak above the inputs, on
CPU the process's RSS high-water mark above the current RSS (reset through /proc/self/clear_refs; the eager
figure is a lower bound there when freed pages are reused). The floor is the FLOPs the fused loss cannot avoid
(forming ΔW and H once, two contractions: 2mn(3r + R)) over the measured matmul rate.
Defaults follow issue 5: 4096×4096, 4096×14336, 14336×4096, r ∈ {16, 64} on GPU; on CPU the shapes are divided
by 4 (1024×1024, 1024×3584, 3584×1024) so two cores finish in minutes — the table says which were used.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import StreamTable, matmul_rate, median_time  # noqa: E402

from slice_kernels import History, dispatch, magnitude_merge, sign_consistency_loss  # noqa: E402


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def extra_peak(fn, dev) -> float:
    """Bytes of memory ``fn`` needs on top of what is allocated now."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def eager_loss(A, B, Bh, Ah, s: float, alpha_l: float, rms: float, beta: float):
    """What a user writes without the fused op: materialize ΔW and H, then the formula (SPEC §3)."""
    dW = s * (B @ A)
    H = Bh @ Ah
    l_dir = (1 - torch.tanh(alpha_l * dW) * torch.tanh(alpha_l * H)).mean()
    return l_dir + beta * (dW * dW).mean() / rms**2


@contextlib.contextmanager
def triton_dots(prec: str):
    """The Triton sign-loss dot precision for one labelled column, whatever SLICE_KERNELS_TRITON_DOT the caller
    exported (restored after)."""
    from slice_kernels.ops import _sign_loss_triton as tri

    old = os.environ.get(tri.DOT_PRECISION_ENV)
    os.environ[tri.DOT_PRECISION_ENV] = prec
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(tri.DOT_PRECISION_ENV, None)
        else:
            os.environ[tri.DOT_PRECISION_ENV] = old


def bench_loss(dev, shapes, ranks, repeat, compile_too, R=16):
    """Yields ((m, n, r, R), {variant: (seconds, extra bytes)}) per shape and rank, as each is measured."""
    for m, n in shapes:
        for r in ranks:
            g = torch.Generator(device="cpu").manual_seed(0)
            A = (torch.randn(r, n, generator=g) / n**0.5).to(dev).requires_grad_(True)
            B = torch.randn(m, r, generator=g).to(dev).requires_grad_(True)
            h = History.from_factors([torch.randn(m, R, generator=g)], [torch.randn(R, n, generator=g) / n**0.5]).to(
                dev
            )
            s, beta = 0.5, 0.1
            alpha_l = 1.0 / h.rms

            def eager():
                eager_loss(A, B, h.Bh, h.Ah, s, alpha_l, h.rms, beta).backward()

            def fused():
                sign_consistency_loss(A, B, h, scaling=s, beta=beta).backward()

            variants = {"eager": eager, f"fused[{dispatch.select('sign_loss_fwd', dev)[0]}]": fused}
            if dev.type == "cuda":
                for b in ("triton", "cuda"):
                    if dispatch.refusal("sign_loss_fwd", b, dev) is None:

                        def forced(b=b):
                            with dispatch.use_backend(b), triton_dots("ieee"):
                                sign_consistency_loss(A, B, h, scaling=s, beta=beta).backward()

                        variants[f"fused[{b}]"] = forced
                if dispatch.refusal("sign_loss_fwd", "triton", dev) is None:

                    def tf32x3():  # the opt-in tensor-core dots of ops/_sign_loss_triton.py
                        with dispatch.use_backend("triton"), triton_dots("tf32x3"):
                            sign_consistency_loss(A, B, h, scaling=s, beta=beta).backward()

                    variants["fused[triton,tf32x3]"] = tf32x3
            if compile_too:
                torch._dynamo.reset()
                comp = torch.compile(eager_loss)

                def compiled():
                    comp(A, B, h.Bh, h.Ah, s, alpha_l, h.rms, beta).backward()

                variants["torch.compile"] = compiled
            res = {}
            for name, fn in variants.items():
                t = median_time(fn, dev, warmup=1, repeats=repeat)
                mem = extra_peak(fn, dev)
                res[name] = (t, mem)
                A.grad = B.grad = None
            yield (m, n, r, R), res


def eager_merge(ups):
    stack = torch.stack([s * (B @ A) for B, A, s in ups])
    k = stack.abs().argmax(dim=0, keepdim=True)  # torch returns the first maximal index: ties to the earliest
    return stack.gather(0, k).squeeze(0)


def bench_merge(dev, shapes, ranks, repeat, K=3):
    """Yields ((m, n, r, K), {variant: (seconds, extra bytes)}) per shape and rank, as each is measured."""
    for m, n in shapes:
        for r in ranks:
            g = torch.Generator(device="cpu").manual_seed(1)
            ups = [
                (torch.randn(m, r, generator=g).to(dev), torch.randn(r, n, generator=g).to(dev), 0.5) for _ in range(K)
            ]
            W = torch.zeros(m, n, device=dev)
            variants = {
                "eager (W += merged)": lambda: W.add_(eager_merge(ups)),
                f"fused into=W [{dispatch.select('magnitude_merge_factors', dev)[0]}]": lambda: magnitude_merge(
                    ups, into=W
                ),
            }
            res = {
                name: (median_time(fn, dev, warmup=1, repeats=repeat), extra_peak(fn, dev))
                for name, fn in variants.items()
            }
            yield (m, n, r, K), res


def table(title, key_names, rows, floor=None):
    """Markdown, printed row by row as ``rows`` (an iterable) yields them, so a run cut off by a time limit
    keeps what it measured: time and extra peak memory per variant, then each other variant's time over the
    fused one's. Returns the whole table."""
    print(f"**{title}**\n", flush=True)
    out = StreamTable()
    for key, res in rows:
        names = list(res)
        fused = next(n for n in names if n.startswith("fused"))
        cells = dict(zip(key_names, map(str, key)))
        for n in names:
            t, mem = res[n]
            cells[f"{n} ms"], cells[f"{n} extra MiB"] = f"{t * 1e3:.1f}", f"{mem / 2**20:.1f}"
        cells.update({f"{n} / {fused}": f"{res[n][0] / res[fused][0]:.2f}×" for n in names if n != fused})
        if floor:
            cells["floor ms"] = f"{floor(key) * 1e3:.2f}"
        out.add(cells)
    print(flush=True)
    return f"**{title}**\n\n" + out.text()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="comma-separated MxN (default: see module doc)")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-merge", action="store_true")
    p.add_argument("--out", help="also write the tables (markdown) to this file")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    default = "4096x4096,4096x14336,14336x4096" if dev.type == "cuda" else "1024x1024,1024x3584,3584x1024"
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shapes or default).split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    rate = matmul_rate(dev)
    head = (
        f"Device: {name}; torch {torch.__version__}; {datetime.date.today().isoformat()}; "
        f"measured matmul rate {rate / 1e9:.1f} GFLOP/s; median of {args.repeat}.\n"
        f"Command: python benches/bench_ps_lora.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    )
    print(head + "\n", flush=True)
    out = [head]
    out.append(
        table(
            "sign-consistency loss, forward + backward (history: factors, R = 16; tanh, β = 0.1)",
            ["m", "n", "r", "R"],
            bench_loss(dev, shapes, ranks, args.repeat, not args.no_compile),
            floor=lambda k: 2 * k[0] * k[1] * (3 * k[2] + k[3]) / rate,
        )
    )
    if not args.no_merge:
        out.append(
            table(
                "magnitude merge of K = 3 factor updates into W",
                ["m", "n", "r", "K"],
                bench_merge(dev, shapes, ranks, args.repeat),
            )
        )
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
