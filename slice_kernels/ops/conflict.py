"""Conflict statistics and gradient surgery (SPEC §1 steps 3–4) over many layers at once.

``conflict_stats(cur, prev)`` → float64 tensor (L, 3) of per-layer [D_ℓ, N_p,ℓ, N_c,ℓ] with
D_ℓ = ⟨G_cur,ℓ, G_prev,ℓ⟩, N_p,ℓ = ‖G_prev,ℓ‖², N_c,ℓ = ‖G_cur,ℓ‖². ``prev=None`` gives D = N_p = 0.
The global figures are the column sums; per-module surgery uses the rows.

``surgery_(cur, prev, gammas)`` → in place: G_cur,ℓ += γ_ℓ · G_prev,ℓ.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _ext, dispatch

try:  # Triton is optional: the package imports (and the other backends run) without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None

# Elements per float64 chunk in the reference: bounds its temporary memory to 2 × 32 MiB whatever the layer.
_CHUNK = 1 << 22


def _check_pairs(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> None:
    # One device for every tensor: the fused kernels take raw addresses from one table in one launch, so a
    # tensor on another device would be read through a foreign pointer (illegal address, or garbage).
    dev = cur[0].device if len(cur) else None
    for what, ts in (("current", cur), ("replay", prev or [])):
        for i, t in enumerate(ts):
            if t.device != dev:
                raise ValueError(f"conflict ops: {what} gradient {i} is on {t.device} but current gradient 0 is on "
                                 f"{dev}; move every gradient to one device first (e.g. .to('{dev}'))")
    if prev is None:
        return
    if len(cur) != len(prev):
        raise ValueError(f"conflict ops need as many replay tensors as current ones ({len(prev)} vs {len(cur)})")
    for i, (c, p) in enumerate(zip(cur, prev)):
        if c.shape != p.shape:
            raise ValueError(f"tensor {i}: current gradient shape {tuple(c.shape)} != replay {tuple(p.shape)}")


@dispatch.register("conflict_stats", "torch")
def conflict_stats_torch(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
    out = torch.zeros(len(cur), 3, dtype=torch.float64, device=cur[0].device)
    for i, c in enumerate(cur):
        cf = c.reshape(-1)
        pf = prev[i].reshape(-1) if prev is not None else None
        for s in range(0, cf.numel(), _CHUNK):
            c64 = cf[s : s + _CHUNK].double()
            out[i, 2] += torch.dot(c64, c64)
            if pf is not None:
                p64 = pf[s : s + _CHUNK].double()
                out[i, 0] += torch.dot(c64, p64)
                out[i, 1] += torch.dot(p64, p64)
    return out


@dispatch.register("surgery", "torch")
def surgery_torch(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    g = gammas.detach().to("cpu", torch.float64).tolist()
    for c, p, gamma in zip(cur, prev, g):
        if gamma != 0.0:
            c.add_(p, alpha=gamma)


# ---------------------------------------------------------------------------------------------------------
# Multi-tensor work tables of the Triton backend (the CUDA glue builds the same table in C++).
#
# Every layer is cut into chunks of a fixed size; one program (Triton) or block (CUDA) handles one chunk, so
# a 58M-element MLP layer and a 1M-element k_proj load-balance within a single launch. The table rows are
# [cur address, prev address, start, end]; per-chunk float64 partials are then reduced per layer in chunk
# order, so the result does not depend on scheduling (no atomics).
# ---------------------------------------------------------------------------------------------------------


def _as_f32(ts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    # Gradients are float32 contiguous accumulators (SPEC §1); anything else is converted once here.
    return [t if (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous() for t in ts]


def _work_table(cur, prev, chunk: int, skip=None):
    """(table (n, 4) int64, layer of each row (n,), first row of each layer (L + 1,), n) on cur's device.
    Built with tensor ops, not a Python loop: 224 Llama-3-8B layers make ~100K rows."""
    L = len(cur)
    sizes = torch.tensor([0 if (skip is not None and skip[i]) else c.numel() for i, c in enumerate(cur)],
                         dtype=torch.int64)
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


def _triton_chunk() -> tuple[int, int]:
    """(BLOCK, elements per program): small under the interpreter so tests cover many chunks cheaply."""
    return (64, 256) if dispatch.interpreting() else (1024, 1 << 16)


if triton is not None:

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
        layer = tl.program_id(0)
        lo = tl.load(bounds + layer)
        hi = tl.load(bounds + layer + 1)
        acc0 = tl.zeros([BLOCK], dtype=tl.float64)
        acc1 = tl.zeros([BLOCK], dtype=tl.float64)
        acc2 = tl.zeros([BLOCK], dtype=tl.float64)
        offs = tl.arange(0, BLOCK)
        for s in range(lo, hi, BLOCK):
            o = s + offs
            m = o < hi
            acc0 += tl.load(partial + 3 * o, mask=m, other=0.0)
            acc1 += tl.load(partial + 3 * o + 1, mask=m, other=0.0)
            acc2 += tl.load(partial + 3 * o + 2, mask=m, other=0.0)
        tl.store(out + 3 * layer, tl.sum(acc0, 0))
        tl.store(out + 3 * layer + 1, tl.sum(acc1, 0))
        tl.store(out + 3 * layer + 2, tl.sum(acc2, 0))

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


@dispatch.register("conflict_stats", "triton")
def conflict_stats_triton(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
    cur = _as_f32(cur)
    prev = _as_f32(prev) if prev is not None else None
    block, chunk = _triton_chunk()
    tab, _, bounds, n_items = _work_table(cur, prev, chunk)
    dev = cur[0].device
    partial = torch.zeros(max(n_items, 1), 3, dtype=torch.float64, device=dev)
    if n_items:
        _stats_chunk_kernel[(n_items,)](tab, partial, HAS_PREV=prev is not None, BLOCK=block)
    out = torch.empty(len(cur), 3, dtype=torch.float64, device=dev)
    _stats_reduce_kernel[(len(cur),)](partial, bounds, out, BLOCK=32 if dispatch.interpreting() else 128)
    return out


@dispatch.register("surgery", "triton")
def surgery_triton(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    work, back = _f32_work(cur)
    prev = _as_f32(prev)
    g = gammas.detach().to(torch.float64)
    block, chunk = _triton_chunk()
    tab, layer, _, n_items = _work_table(work, prev, chunk, skip=(g == 0).tolist())
    if n_items:
        _surgery_chunk_kernel[(n_items,)](tab, layer, g.to(work[0].device), BLOCK=block)
    for i, c in back:
        c.copy_(work[i])


def _f32_work(cur: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[tuple[int, torch.Tensor]]]:
    """Buffers the fused kernels can update in place, and the (index, tensor) pairs to copy back: a
    non-float32 or non-contiguous gradient is updated through a float32 copy."""
    work, back = [], []
    for i, c in enumerate(cur):
        if c.dtype == torch.float32 and c.is_contiguous():
            work.append(c)
        else:
            work.append(c.float().contiguous())
            back.append((i, c))
    return work, back


@dispatch.register("conflict_stats", "cpp", native_op="conflict_stats")
@dispatch.register("conflict_stats", "cuda", native_op="conflict_stats")
def conflict_stats_native(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None) -> torch.Tensor:
    return _ext.native("conflict_stats")(_as_f32(cur), _as_f32(prev) if prev is not None else [])


# cpp runs only when forced: its float64 update (one rounding) measured 0.7–0.9× torch's float32 AVX2 add_ on
# CPU even with its AVX2 clone (benches/RESULTS.md); it stays as the CPU mirror of the CUDA kernel.
@dispatch.register("surgery", "cpp", native_op="surgery_", auto=False)
@dispatch.register("surgery", "cuda", native_op="surgery_")
def surgery_native(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas: torch.Tensor) -> None:
    work, back = _f32_work(cur)
    _ext.native("surgery_")(work, _as_f32(prev), gammas.detach().to("cpu", torch.float64).contiguous())
    for i, c in back:
        c.copy_(work[i])


def _has_float64(*lists) -> bool:
    return any(t.dtype == torch.float64 for ts in lists if ts is not None for t in ts)


def conflict_stats(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Per-layer [D, N_p, N_c] in float64, shape (L, 3), on the device of ``cur``.

    The fused kernels load float32 (the accumulators' dtype); float64 inputs always go to the torch
    reference, whatever backend is selected, because a float64 caller is asking for float64 accuracy.
    """
    if len(cur) == 0:
        raise ValueError("conflict_stats needs at least one layer")
    _check_pairs(cur, prev)
    prev = None if prev is None else list(prev)
    if _has_float64(cur, prev):
        return conflict_stats_torch(list(cur), prev)
    return dispatch.call("conflict_stats", cur[0].device, list(cur), prev)


def surgery_(cur: Sequence[torch.Tensor], prev: Sequence[torch.Tensor], gammas) -> None:
    """In place: ``cur[ℓ] += gammas[ℓ] * prev[ℓ]`` for every layer (one γ per layer, float64)."""
    _check_pairs(cur, prev)
    gammas = torch.as_tensor(gammas, dtype=torch.float64)
    if gammas.numel() != len(cur):
        raise ValueError(f"surgery_ needs one gamma per layer ({gammas.numel()} for {len(cur)} layers)")
    if len(cur) == 0 or not bool((gammas != 0).any()):
        return
    if _has_float64(cur, prev):  # float64 stays float64 (see conflict_stats)
        return surgery_torch(list(cur), list(prev), gammas)
    dispatch.call("surgery", cur[0].device, list(cur), list(prev), gammas)
