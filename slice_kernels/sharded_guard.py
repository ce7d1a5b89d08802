"""Refusals for the methods that do not run on FSDP2-sharded parameters (DTensor shards): the stability loss and
GorpAdamW need each layer's full factors or full gradient. See docs/distributed.md."""

from __future__ import annotations


def first_dtensor(tensors) -> int | None:
    """Index of the first DTensor in ``tensors``, or None."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        return None
    for i, t in enumerate(tensors):
        if isinstance(t, DTensor):
            return i
    return None
