"""Gradient collection for the SLICE init: ``slice_kernels.collect_gradients`` (post-accumulate-grad hooks,
float32 accumulators, each ``.grad`` freed at once) against what a user would otherwise run, PEFT's LoRA-GA
``estimate_gradients`` pattern (every target's ``.grad`` accumulates across all batches and lives to the end).

Measured, in one run, on a Llama-shaped model built from a config (no download):
* median seconds per collection (``steps`` batches),
* peak bytes held in ``.grad`` of the model's parameters, sampled after every backward and inside every hook,
  and the float32 accumulators beside them (on CUDA also the allocator's peak over the whole collection and
  the offloaded variant, whose accumulators live in pinned CPU memory),
* that both give the same average (max abs difference).

    python benches/bench_init_collect.py                 # CPU, small model
    python benches/bench_init_collect.py --hidden 1024 --layers 8 --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, median_time, print_table  # noqa: E402

import slice_kernels.slice_init.collect as collect_mod  # noqa: E402
from slice_kernels import collect_gradients  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(hidden, layers, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def batches(n, seq, device, vocab=512, batch=4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def grad_bytes(model):
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def peft_style(model, names, data):
    """PEFT's estimate_gradients pattern: only targets require grad, .grad summed by autograd over all batches."""
    mods = dict(model.named_modules())
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        mods[n].weight.requires_grad_(True)
    peak = 0
    for b in data:
        model(**b).loss.backward()
        peak = max(peak, grad_bytes(model))
    out = {n: (mods[n].weight.grad.float() / len(data)) for n in names}
    for n in names:
        mods[n].weight.grad = None
    for p, rg in saved.items():
        p.requires_grad_(rg)
    return out, peak


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = build(args.hidden, args.layers, dtype, args.device)
    data = batches(args.steps, args.seq, args.device)
    targets = collect_mod.resolve_targets(model, TARGETS)
    names = list(targets)
    target_bytes = sum(m.weight.numel() * m.weight.element_size() for m in targets.values())
    cuda = torch.device(args.device).type == "cuda"

    hook_peak = {"v": 0}
    real = collect_mod.accumulator

    def spying_accumulator(device):
        add = real(device)

        def spy(acc, grad, alpha):
            hook_peak["v"] = max(hook_peak["v"], grad_bytes(model))
            add(acc, grad, alpha)

        return spy

    methods = [
        ("slice_kernels.collect_gradients", lambda: collect_gradients(model, targets, data, args.steps)),
        ("PEFT LoRA-GA pattern (.grad kept)", lambda: peft_style(model, names, data)[0]),
    ]
    if cuda:
        methods.insert(
            1,
            (
                "slice_kernels.collect_gradients(offload=True)",
                lambda: collect_gradients(model, targets, data, args.steps, offload=True),
            ),
        )
    # interleaved repeats, so a change in machine load hits both methods alike
    times = {label: [] for label, _ in methods}
    for _ in range(args.repeats):
        for label, fn in methods:
            times[label].append(median_time(fn, args.device, warmup=1 if not times[label] else 0, repeats=1))
    rows = []
    for label, fn in methods:
        t = statistics.median(times[label])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        collect_mod.accumulator = spying_accumulator
        try:
            if label.startswith("slice_kernels"):
                hook_peak["v"] = 0
                res = fn()
                peak_grad = hook_peak["v"]
            else:
                res, peak_grad = peft_style(model, names, data)
        finally:
            collect_mod.accumulator = real
        # float32 accumulators: on the model's device unless offloaded; the PEFT pattern sums into .grad itself
        acc_bytes = sum(v.numel() * v.element_size() for v in res.values()) if label.startswith("slice_kernels") else 0
        acc_where = "cpu" if "offload" in label else args.device
        row = {
            "method": label,
            "median_s": f"{t:.4f}",
            "peak_grad_MiB": f"{peak_grad / 2**20:.2f}",
            "accumulators_MiB": f"{acc_bytes / 2**20:.2f} ({acc_where})" if acc_bytes else "0",
            "target_weights_MiB": f"{target_bytes / 2**20:.2f}",
        }
        if cuda:
            torch.cuda.synchronize()
            row["cuda_peak_over_start_MiB"] = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.1f}"
        rows.append((row, res))
    diff = max(float((rows[0][1][n] - rows[-1][1][n].to(rows[0][1][n].device)).abs().max()) for n in names)
    print(f"# gradient collection: {machine(args.device)}")
    print(
        f"# model: Llama hidden={args.hidden} layers={args.layers} dtype={args.dtype}, {len(names)} target "
        f"weights, {args.steps} batches of 4x{args.seq}; max |difference of averages| = {diff:.2e}"
    )
    cols = ["method", "median_s", "peak_grad_MiB", "accumulators_MiB", "target_weights_MiB"] + (
        ["cuda_peak_over_start_MiB"] if cuda else []
    )
    print_table([r for r, _ in rows], cols)
    t0, t1 = float(rows[0][0]["median_s"]), float(rows[-1][0]["median_s"])
    # Each repeat times both methods back to back, so the ratio within a repeat cancels slow drifts of this
    # machine's load that the ratio of the two medians keeps.
    paired = statistics.median(a / b for a, b in zip(times[methods[0][0]], times[methods[-1][0]]))
    print(
        f"time ratio collect_gradients / PEFT pattern = {t0 / t1:.2f} (ratio of medians), {paired:.2f} (median of "
        f"per-repeat ratios)"
    )


if __name__ == "__main__":
    main()
