"""Multi-process SLICE init: every rank collects on its own batches, the float32 accumulators are averaged
across ranks before the surgery, and all ranks end with identical A, B and W.

Identity argument: after ``average_`` every rank holds bit-identical gradients (checked with a checksum, and
broadcast from rank 0 if a reduction algorithm ever left them different); the rest of the init is a
deterministic function of (weights, gradients, seed), the sketches being seeded per layer name. The adapter
factors are checked again after the init (``same_on_all_ranks``) and broadcast from rank 0 on a mismatch.
Everything here is a no-op when torch.distributed is not initialized or has one rank.
"""

from __future__ import annotations

from typing import Sequence

import torch


def active() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _comm_device(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; offloaded (CPU) accumulators travel through the current CUDA device.
    backend = torch.distributed.get_backend()
    if "nccl" in str(backend) and t.device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _op_in_place(t: torch.Tensor, fn) -> None:
    dev = _comm_device(t)
    if dev == t.device:
        fn(t)
        return
    tmp = t.to(dev)  # one layer at a time on the device
    fn(tmp)
    t.copy_(tmp)


def _checksums(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Two float64 fingerprints per tensor (sum and position-weighted sum) on the comm device; equal inputs
    give equal fingerprints bit for bit."""
    out = []
    for t in tensors:
        f = t.detach().reshape(-1).double()
        w = torch.arange(1, f.numel() + 1, dtype=torch.float64, device=f.device).remainder_(977.0).add_(1.0)
        out.append(torch.stack([f.sum(), (f * w).sum()]).cpu())
    c = torch.stack(out) if out else torch.zeros(0, 2, dtype=torch.float64)
    return c.to(_comm_device(tensors[0])) if tensors else c


def same_on_all_ranks(tensors: Sequence[torch.Tensor]) -> bool:
    """True when every rank holds bit-identical ``tensors`` (collective: call it on every rank)."""
    if not active() or not tensors:
        return True
    c = _checksums(tensors)
    lo, hi = c.clone(), c.clone()
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    for t in tensors:
        _op_in_place(t, lambda x: torch.distributed.broadcast(x, src=src))


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """In place: each tensor becomes its mean over ranks, identical on every rank (collective)."""
    if not active() or not tensors:
        return
    world = torch.distributed.get_world_size()
    for t in tensors:
        _op_in_place(t, lambda x: torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM))
        t.div_(world)
    if not same_on_all_ranks(tensors):
        broadcast_(tensors)


def make_identical_(tensors: Sequence[torch.Tensor]) -> bool:
    """Broadcast ``tensors`` from rank 0 when they differ across ranks; returns True if a broadcast happened."""
    if same_on_all_ranks(tensors):
        return False
    broadcast_(tensors)
    return True
