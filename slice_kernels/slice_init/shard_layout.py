"""Where each rank's piece of an FSDP2-sharded weight lies (``fully_shard``: a DTensor with ``Shard(0)`` on a 1-D
mesh, split like ``torch.chunk``: ⌈d/world⌉ rows per rank, the last ranks shorter or empty).

The init works on (out, in) matrices; a ``Linear`` weight is stored (out, in), so its shard is a block of rows of
W (``axis`` 0); a transformers ``Conv1D`` stores Wᵀ, so its shard is a block of columns of W (``axis`` 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SliceInitError
from ..sharded_guard import is_dtensor  # noqa: F401  (re-exported: the init's modules import it from here)


def local(t: torch.Tensor) -> torch.Tensor:
    """The rank's own piece of a DTensor (a view of its storage), or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def chunk_bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of ``rank``'s chunk of ``size`` rows under ``torch.chunk`` (FSDP2's split)."""
    per = -(-size // world) if size else 0
    start = min(rank * per, size)
    return start, min(start + per, size)


@dataclass(frozen=True)
class ShardLayout:
    """One sharded target: its global (out, in) shape, the W axis its shard runs along, and this rank's range."""

    shape: tuple  # (m, n) of W in (out, in) orientation
    axis: int  # 0: the shard holds rows of W (Linear); 1: columns (Conv1D, stored transposed)
    start: int
    stop: int


def dim0_bounds(name: str, t: torch.Tensor, what: str) -> tuple[int, int]:
    """This rank's rows of a ``Shard(0)`` DTensor ``t``, checked against its local piece."""
    from torch.distributed.tensor import Shard

    mesh = t.device_mesh
    if mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise SliceInitError(
            f"layer {name!r}: {what} is a DTensor with placements {tuple(t.placements)} on a {mesh.ndim}-D mesh; "
            f"the sharded init supports FSDP2's layout only (fully_shard on a 1-D mesh: Shard(0)). Shard the model "
            f"with torch.distributed.fsdp.fully_shard (no HSDP / tensor parallel) for the init"
        )
    start, stop = chunk_bounds(t.shape[0], mesh.size(), mesh.get_local_rank())
    if tuple(t.to_local().shape) != (stop - start, *t.shape[1:]):
        raise SliceInitError(
            f"layer {name!r}: {what}'s local shard has shape {tuple(t.to_local().shape)}, not the torch.chunk "
            f"split rows [{start}, {stop}) of {tuple(t.shape)} this init expects (FSDP2's default sharding)"
        )
    return start, stop


def layout(name: str, weight: torch.Tensor, conv1d: bool) -> ShardLayout:
    start, stop = dim0_bounds(name, weight, "the weight")
    rows, cols = weight.shape
    return ShardLayout(shape=(cols, rows) if conv1d else (rows, cols), axis=1 if conv1d else 0, start=start, stop=stop)
