"""The layer-parallel truncated SVD of a distributed init: each layer's G̃ is decomposed on exactly one rank,
which also applies the method's factor rule, and its A, B and report figures are broadcast to every rank.

Ranks are assigned by cost, greedy-balanced and deterministic: layers in decreasing order of m·n·q (the FLOPs
of a randomized SVD with q sketch columns; the layer's position breaks ties), each to the least-loaded rank
(the lowest rank on ties). Every rank computes the same assignment from the layer shapes alone, so no message
is needed to agree on it. An error on an owning rank is agreed by every rank before any broadcast.
"""

from __future__ import annotations

import torch

from .. import distributed
from ..ops import rsvd
from .config import SliceConfig
from .factors import FACTORS, LayerInput
from .report import InitReport, timed_phase
from .svd import top_triplets


def sketch_columns(m: int, n: int, r: int, config: SliceConfig) -> int:
    """q of one layer's randomized SVD, as ``svd.top_triplets`` chooses it."""
    k = config.svd_rank_factor * r
    return max(min(config.svd_sketch or 4 * r, min(m, n)), k)


def assign_owners(shapes: dict, r: int, config: SliceConfig, world: int) -> dict:
    """{layer name: rank} balancing Σ m·n·q over ``world`` ranks (see the module doc)."""
    pos = {n: i for i, n in enumerate(shapes)}
    cost = {n: m * k * sketch_columns(m, k, r, config) for n, (m, k) in shapes.items()}
    load = [0] * world
    owner = {}
    for n in sorted(shapes, key=lambda x: (-cost[x], pos[x])):
        j = min(range(world), key=lambda i: (load[i], i))
        owner[n] = j
        load[j] += cost[n]
    return owner


def decompose_owned(
    owned: dict, r: int, config: SliceConfig, report: InitReport, device, scaling: float
) -> tuple[dict, dict, dict]:
    """SVD and factor rule of this rank's layers. ``owned``: name -> (G̃ (m, n), W (m, n), adapter dtype,
    fan_in_fan_out); ``scaling``: the LoRA s. Returns (A, B, info) dicts for those layers."""
    names = list(owned)
    svd_out = {}
    if names and config.uses_gradients:
        svd_out = top_triplets(names, [owned[n][0] for n in names], r, config, report, device)
    A, B, info = {}, {}, {}
    rule = FACTORS[config.method]
    with timed_phase(report, "scale", device):
        for n in names:
            _, W, dtype, transposed = owned[n]
            layer = LayerInput(
                W=W,
                r=r,
                seed=rsvd.layer_seed(config.seed, n),
                dtype=dtype,
                config=config,
                svd=svd_out.get(n),
                fan_in_fan_out=transposed,
                scaling=scaling,
            )
            A[n], B[n], info[n] = rule(layer)
    return A, B, info


def share_factors(
    names: list, owner: dict, A: dict, B: dict, info: dict, r: int, shapes: dict, dtypes: dict, device, report
) -> None:
    """Collective: fill ``A``, ``B`` and ``info`` with every rank's layers, broadcast from their owners (A (r, n),
    B (m, r) in the layer's adapter dtype, allocated on ``device`` where this rank does not own the layer)."""
    me = distributed.rank()
    with timed_phase(report, "share_factors", device):
        for n in names:
            if owner[n] != me:
                m, k = shapes[n]
                A[n] = torch.empty(r, k, dtype=dtypes[n], device=device)
                B[n] = torch.empty(m, r, dtype=dtypes[n], device=device)
            A[n], B[n] = A[n].contiguous(), B[n].contiguous()
            distributed.broadcast_([A[n], B[n]], src=owner[n])
        got: list = [None] * distributed.world_size()
        torch.distributed.all_gather_object(got, {n: info[n] for n in names if owner[n] == me})
        for part in got:
            info.update(part)


def decompose_and_share(
    owned: dict,
    names: list,
    owner: dict,
    r: int,
    config: SliceConfig,
    report: InitReport,
    device,
    s: float,
    shapes: dict,
    dtypes: dict,
) -> tuple[dict, dict]:
    """Collective: this rank decomposes the layers it owns, the ranks agree that every owner succeeded (so no rank
    waits in a broadcast a failed owner never sends), then every layer's A, B and figures are broadcast from its
    owner. Returns (A, B) of every layer; the per-layer figures go into ``report.layers``."""
    err, A, B, info = None, {}, {}, {}
    try:
        A, B, info = decompose_owned(owned, r, config, report, device, s)
    except Exception as e:
        err = e
    distributed.agree(err, "the layer-parallel SVD")
    share_factors(names, owner, A, B, info, r, shapes, dtypes, device, report)
    for n in names:
        report.layers.setdefault(n, {"shape": list(shapes[n])}).update(info[n])
    return A, B
