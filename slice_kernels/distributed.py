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


def comm_device(t: torch.Tensor) -> torch.device:
    # NCCL reduces CUDA tensors only; offloaded (CPU) accumulators travel through the current CUDA device.
    backend = torch.distributed.get_backend()
    if "nccl" in str(backend) and t.device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def _op_in_place(t: torch.Tensor, fn) -> None:
    dev = comm_device(t)
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
    return c.to(comm_device(tensors[0])) if tensors else c


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


# ---- agreement before mutation: every rank learns of any rank's failure, so none waits in a collective that
# ---- the failed rank never enters (the sharded and layer-parallel paths call these between phases)


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def agree(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when any rank passes an ``error``. The failing rank re-raises its own
    exception; the others raise a ``SliceInitError`` naming that rank and its message. No-op (re-raises a local
    error) without an active process group."""
    from .errors import SliceInitError

    if not active():
        if error is not None:
            raise error
        return
    msg = None if error is None else f"{type(error).__name__}: {error}"
    got: list = [None] * world_size()
    torch.distributed.all_gather_object(got, msg)
    failed = [(k, m) for k, m in enumerate(got) if m is not None]
    if not failed:
        return
    if error is not None:
        raise error
    k, m = failed[0]
    raise SliceInitError(f"rank {k} failed during {what} ({m}); every rank stops here and nothing was modified")


def same_signature(signature, what: str) -> None:
    """Collective: refuse on every rank when the ranks disagree on ``signature`` (a picklable description, e.g. the
    target layers' names and shapes), naming the first rank that differs from rank 0."""
    from .errors import SliceInitError

    if not active():
        return
    got: list = [None] * world_size()
    torch.distributed.all_gather_object(got, signature)
    for k, sig in enumerate(got):
        if sig != got[0]:
            raise SliceInitError(
                f"the ranks disagree on {what}: rank {k} has {_diff(sig, got[0])} where rank 0 has "
                f"{_diff(got[0], sig)}. Every rank must build the same model and the same target modules"
            )


def _diff(a, b) -> str:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        extra = [x for x in a if x not in b]
        return f"{len(a)} entries, e.g. {extra[:2]}" if extra else f"{len(a)} entries"
    return repr(a)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In place: ``t`` becomes its sum over ranks (collective; a no-op on one process)."""
    if active():
        _op_in_place(t, lambda x: torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.SUM))
    return t


def all_true(flag: bool) -> bool:
    """Collective: True when ``flag`` is True on every rank."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    all_reduce_sum_(t)
    return int(t.item()) == world_size()
