"""DTensor detection, and the refusals for the methods that do not run on FSDP2-sharded parameters (DTensor shards): the stability loss and
GorpAdamW need each layer's full factors or full gradient. See docs/distributed.md."""

from __future__ import annotations


def dtensor_types() -> tuple:
    """``(DTensor,)``, or ``()`` in a torch build without torch.distributed: the one place that imports it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return ()
    return (DTensor,)


def is_dtensor(t) -> bool:
    return isinstance(t, dtensor_types())


def first_dtensor(tensors) -> int | None:
    """Index of the first DTensor in ``tensors``, or None."""
    for i, t in enumerate(tensors):
        if is_dtensor(t):
            return i
    return None
