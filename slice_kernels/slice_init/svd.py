"""The truncated SVD of every G̃ (SPEC §1 step 5), batched over layers of one shape."""

from __future__ import annotations

import torch

from ..ops import rsvd
from .config import SliceConfig
from .report import InitReport, timed_phase

# Layers stacked per randomized-SVD call are capped so the batch holds at most this many float32 elements.
SVD_BATCH_ELEMENTS = 1 << 28


def top_triplets(names, grads, r: int, config: SliceConfig, report: InitReport, device) -> dict:
    """{name: (U (m, k), S (k,), V (n, k))} of each layer's G̃, on ``device``; sketches seeded per layer. k = 2r,
    or r for the ``top_r_no_sigma`` slices (``SliceConfig.svd_rank_factor``)."""
    out: dict = {}
    with timed_phase(report, "svd", device):
        k = config.svd_rank_factor * r
        groups: dict = {}
        for i, g in enumerate(grads):
            groups.setdefault(tuple(g.shape), []).append(i)
        for (m, n_), idxs in groups.items():
            q = max(min(config.svd_sketch or 4 * r, min(m, n_)), k)
            per = max(1, SVD_BATCH_ELEMENTS // (m * n_))
            for j in range(0, len(idxs), per):
                chunk = idxs[j : j + per]
                G = torch.stack([grads[i].to(device, torch.float32) for i in chunk])
                if config.svd == "exact":
                    U, S, V = rsvd.exact_svd(G, k)
                else:
                    seeds = [rsvd.layer_seed(config.seed, names[i]) for i in chunk]
                    omega = rsvd.sketch(seeds, n_, q, G.device)
                    report.backends["randomized_svd"] = rsvd.RANDOMIZED_SVD.select(G.device)[0]
                    U, S, V = rsvd.randomized_svd(G, omega, k, config.svd_niter)
                del G
                for b, i in enumerate(chunk):
                    out[names[i]] = (U[b], S[b], V[b])
    return out
