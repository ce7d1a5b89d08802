"""Triton kernels of the conflict statistics and the surgery (``conflict.py`` registers them).

Multi-tensor work tables (the CUDA glue builds the same table in C++): every layer is cut into chunks of a
fixed size and one program handles one chunk, so a 58M-element MLP layer and a 1M-element k_proj
load-balance within a single launch. Table rows are [cur address, prev address, start, end]; per-chunk
float64 partials are then reduced per layer in chunk order, so the result does not depend on scheduling (no
atomics). Inputs are float32 and contiguous (the caller converts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import dispatch


def work_table(cur, prev, chunk: int, skip=None):
    """(table (n, 4) int64, layer of each row (n,), first row of each layer (L + 1,), n) on cur's device.
    Built with tensor ops, not a Python loop: 224 Llama-3-8B layers make ~100K rows."""
    L = len(cur)
    sizes = torch.tensor(
        [0 if (skip is not None and skip[i]) else c.numel() for i, c in enumerate(cur)], dtype=torch.int64
    )
    counts = (sizes + chunk - 1) // chunk
    first = torch.zeros(L + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=first[1:])
    n = int(first[-1])
    layer = torch.repeat_interleave(torch.arange(L), counts)
    start = (torch.arange(n) - first[layer]) * chunk
    end = torch.minimum(start + chunk, sizes[layer])
    c_addr = torch.tensor([c.data_ptr() for c in cur], dtype=torch.int64)
    p_addr = torch.tensor([p.data_ptr() for p in prev] if prev is not None else [0] * L, dtype=torch.int64)
    tab = torch.stack([c_addr[layer], p_addr[layer], start, end], 1) if n else torch.zeros(1, 4, dtype=torch.int64)
    dev = cur[0].device
    nb = dev.type == "cuda"
    layer = layer if n else torch.zeros(1, dtype=torch.int64)
    return tab.to(dev, non_blocking=nb), layer.to(dev, non_blocking=nb), first.to(dev, non_blocking=nb), n


def _chunking() -> tuple[int, int]:
    """(BLOCK, elements per program): small under the interpreter so tests cover many chunks cheaply."""
    return (64, 256) if dispatch.interpreting() else (1024, 1 << 16)


@triton.jit
def _stats_chunk_kernel(tab, partial, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c_ptr = tl.load(tab + 4 * pid).to(tl.pointer_type(tl.float32))
    start = tl.load(tab + 4 * pid + 2)
    end = tl.load(tab + 4 * pid + 3)
    nc = tl.zeros([BLOCK], dtype=tl.float64)
    d = tl.zeros([BLOCK], dtype=tl.float64)
    np_ = tl.zeros([BLOCK], dtype=tl.float64)
    offs = tl.arange(0, BLOCK)
    for s in range(start, end, BLOCK):
        o = s + offs
        m = o < end
        # float32 loads, float64 products: a product of two float32 values is exact in float64
        x = tl.load(c_ptr + o, mask=m, other=0.0).to(tl.float64)
        nc += x * x
        if HAS_PREV:
            p_ptr = tl.load(tab + 4 * pid + 1).to(tl.pointer_type(tl.float32))
            y = tl.load(p_ptr + o, mask=m, other=0.0).to(tl.float64)
            d += x * y
            np_ += y * y
    tl.store(partial + 3 * pid, tl.sum(d, 0))
    tl.store(partial + 3 * pid + 1, tl.sum(np_, 0))
    tl.store(partial + 3 * pid + 2, tl.sum(nc, 0))


@triton.jit
def _stats_reduce_kernel(partial, bounds, out, BLOCK: tl.constexpr):
    # one program per layer sums its chunks' [D, N_p, N_c] rows, BLOCK rows at a time (column 3 is padding)
    layer = tl.program_id(0)
    lo = tl.load(bounds + layer)
    hi = tl.load(bounds + layer + 1)
    cols = tl.arange(0, 4)
    acc = tl.zeros([BLOCK, 4], dtype=tl.float64)
    offs = tl.arange(0, BLOCK)
    for s in range(lo, hi, BLOCK):
        o = s + offs
        m = (o < hi)[:, None] & (cols < 3)[None, :]
        acc += tl.load(partial + 3 * o[:, None] + cols[None, :], mask=m, other=0.0)
    tl.store(out + 3 * layer + cols, tl.sum(acc, 0), mask=cols < 3)


@triton.jit
def _surgery_chunk_kernel(tab, layer_of, gammas, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    c_ptr = tl.load(tab + 4 * pid).to(tl.pointer_type(tl.float32))
    p_ptr = tl.load(tab + 4 * pid + 1).to(tl.pointer_type(tl.float32))
    start = tl.load(tab + 4 * pid + 2)
    end = tl.load(tab + 4 * pid + 3)
    g = tl.load(gammas + tl.load(layer_of + pid))
    offs = tl.arange(0, BLOCK)
    for s in range(start, end, BLOCK):
        o = s + offs
        m = o < end
        x = tl.load(c_ptr + o, mask=m, other=0.0).to(tl.float64)
        y = tl.load(p_ptr + o, mask=m, other=0.0).to(tl.float64)
        # one rounding of the float64 result: never less accurate than torch's float32 add_(alpha=γ)
        tl.store(c_ptr + o, (x + g * y).to(tl.float32), mask=m)


def conflict_stats(cur: list[torch.Tensor], prev: list[torch.Tensor] | None) -> torch.Tensor:
    block, chunk = _chunking()
    tab, _, bounds, n_items = work_table(cur, prev, chunk)
    dev = cur[0].device
    partial = torch.zeros(max(n_items, 1), 3, dtype=torch.float64, device=dev)
    if n_items:
        _stats_chunk_kernel[(n_items,)](tab, partial, HAS_PREV=prev is not None, BLOCK=block)
    out = torch.empty(len(cur), 3, dtype=torch.float64, device=dev)
    _stats_reduce_kernel[(len(cur),)](partial, bounds, out, BLOCK=32 if dispatch.interpreting() else 128)
    return out


def surgery_(work: list[torch.Tensor], prev: list[torch.Tensor], gammas: torch.Tensor) -> None:
    block, chunk = _chunking()
    tab, layer, _, n_items = work_table(work, prev, chunk, skip=(gammas == 0).tolist())
    if n_items:
        _surgery_chunk_kernel[(n_items,)](tab, layer, gammas.to(work[0].device), BLOCK=block)
