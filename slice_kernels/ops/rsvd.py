"""Truncated SVD of batches of same-shape matrices (SPEC §1 step 5).

``randomized_svd(G, omega, k, niter)``: G is (b, m, n), omega the (b, n, q) Gaussian sketch (made by
``sketch``, so every backend sees the same one); returns U (b, m, k), S (b, k), V (b, n, k) with
G ≈ U·diag(S)·Vᵀ and the sign convention applied: each pair (u_i, v_i) is flipped so that the entry of
largest magnitude in u_i is positive.

The torch reference is Halko–Martinsson–Tropp with Householder QR after every product; faster backends
may use cheaper normalizers as long as they span the same subspaces.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .. import dispatch


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, layer name): stable across processes and Python versions (no ``hash()``)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sketch(seeds: Sequence[int], n: int, q: int, device, dtype=torch.float32) -> torch.Tensor:
    """Gaussian sketches (b, n, q), matrix i drawn from its own generator seeded with ``seeds[i]``.

    Never touches the global RNG. Drawn on ``device`` with that device's generator (CPU and CUDA streams
    differ, so a sketch is reproducible per device type, not across them).
    """
    device = torch.device(device)
    out = torch.empty(len(seeds), n, q, device=device, dtype=dtype)
    for i, s in enumerate(seeds):
        gen = torch.Generator(device=device)
        gen.manual_seed(int(s))
        out[i].normal_(generator=gen)
    return out


def apply_sign_convention(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip (u_i, v_i) so that the largest-magnitude entry of each u_i is positive. U (b, m, k), V (b, n, k)."""
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (b, 1, k); first occurrence on ties
    signs = torch.sign(torch.gather(U, -2, idx))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, V * signs


@dispatch.register("randomized_svd", "torch")
def randomized_svd_torch(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int):
    Gt = G.transpose(-1, -2)
    Q, _ = torch.linalg.qr(G @ omega)
    for _ in range(niter):
        Z, _ = torch.linalg.qr(Gt @ Q)
        Q, _ = torch.linalg.qr(G @ Z)
    small = Q.transpose(-1, -2) @ G  # (b, q, n)
    Ub, S, Vh = torch.linalg.svd(small, full_matrices=False)
    U = Q @ Ub[..., :k]
    V = Vh[..., :k, :].transpose(-1, -2)
    U, V = apply_sign_convention(U, V)
    return U.contiguous(), S[..., :k].contiguous(), V.contiguous()


def _check(G: torch.Tensor, k: int) -> None:
    if G.dim() != 3:
        raise ValueError(f"expected a batch of matrices (b, m, n), got shape {tuple(G.shape)}")
    if not 1 <= k <= min(G.shape[-2:]):
        raise ValueError(f"k={k} must be in [1, min(m, n)={min(G.shape[-2:])}]")


def randomized_svd(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int = 4):
    """Top-k randomized SVD of each matrix of G (b, m, n) with sketch omega (b, n, q), q ≥ k."""
    _check(G, k)
    if omega.shape[0] != G.shape[0] or omega.shape[1] != G.shape[2] or omega.shape[2] < k:
        raise ValueError(f"sketch shape {tuple(omega.shape)} does not fit G {tuple(G.shape)} with k={k}")
    return dispatch.call("randomized_svd", G.device, G, omega, k, niter)


def exact_svd(G: torch.Tensor, k: int):
    """Top-k of the full SVD of each matrix of G (b, m, n), with the same sign convention."""
    _check(G, k)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    U, V = apply_sign_convention(U[..., :k], Vh[..., :k, :].transpose(-1, -2))
    return U.contiguous(), S[..., :k].contiguous(), V.contiguous()
