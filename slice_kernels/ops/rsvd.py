"""Truncated SVD of batches of same-shape matrices (SPEC §1 step 5).

``randomized_svd(G, omega, k, niter)``: G is (b, m, n), omega the (b, n, q) Gaussian sketch (made by
``sketch``, so every backend sees the same one); returns U (b, m, k), S (b, k), V (b, n, k) with
G ≈ U·diag(S)·Vᵀ and the sign convention applied: each pair (u_i, v_i) is flipped so that the entry of
largest magnitude in u_i is positive.

The torch reference is Halko–Martinsson–Tropp with Householder QR after every product (2·niter + 1 QRs).
The fused backends (triton, cuda, cpp) run ``_rsvd_cholqr``: the same products and the same sketch, but
each normalization is a Cholesky-QR — one Gram matrix YᵀY (a batched GEMM), a q×q Cholesky in float64 with
a shift fallback (the backend's kernel), one triangular solve — and only the last one is made fully
orthonormal (shifted Cholesky-QR3, with a Householder fallback for a matrix whose check fails); the wide
q×n matrix QᵀG is reduced to q×q the same way before the small SVD. See docs/init_kernels.md.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from .. import dispatch, extension
from ..errors import InvalidArgumentError

try:  # Triton is optional
    from . import _rsvd_triton as _tri
except ImportError:  # pragma: no cover
    _tri = None

RANDOMIZED_SVD = dispatch.define("randomized_svd")


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


@RANDOMIZED_SVD.register("torch")
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


# ---------------------------------------------------------------------------------------------------------
# Fast backend: randomized SVD with Cholesky-QR normalization.
# ---------------------------------------------------------------------------------------------------------

# A pivot whose Schur complement falls below _REL_FLOOR_Q · q · u · max(diag) is rounding noise of the Gram
# matrix (formed in the working precision): the kernels floor it there instead of failing.
_REL_FLOOR_Q = 1.0


def _unit_roundoff(dtype: torch.dtype) -> float:
    return {torch.float64: 2.0**-53, torch.float32: 2.0**-24}.get(dtype, 2.0**-24)


def _cholqr_pass(Y: torch.Tensor, chol, shift: bool = False) -> torch.Tensor:
    """One Cholesky-QR pass: Q = Y·R⁻¹ with RᵀR = YᵀY (+ s·I), pivots floored by the kernel.

    span(Q) = span(Y) whatever R is, as long as it is triangular with a positive diagonal, which flooring
    guarantees. The Gram matrix and the solve run in float64: the Gram squares the condition number, and
    in float32 it would lose every direction of G weaker than √u₃₂ ≈ 2.4e-4 of the strongest (real gradients
    reach that well inside the top 2r), while Householder keeps them. The float64 part costs 2·m·q² flops per
    pass against m·n·q for the float32 product it normalizes (12% at q = 256, n = 4096)."""
    m, q = Y.shape[-2:]
    Y64 = Y.double()
    u = _unit_roundoff(torch.float64)
    gram = (Y64.transpose(-1, -2) @ Y64).contiguous()
    # Fukaya et al.'s shift for shifted Cholesky-QR: s = 11(mq + q(q+1))·u·‖Y‖², with ‖Y‖_F² ≥ ‖Y‖₂².
    rel_shift = 11.0 * (m * q + q * (q + 1)) * u if shift else 0.0
    R, _ = chol(gram, rel_shift, _REL_FLOOR_Q * q * u)
    return torch.linalg.solve_triangular(R, Y64, upper=True, left=False).to(Y.dtype)


def _orthonormalize(Y: torch.Tensor, chol) -> torch.Tensor:
    """Shifted Cholesky-QR3 (one shifted pass, then Cholesky-QR2), then a check of the last Gram matrix;
    a matrix whose basis is not orthonormal to ~√u (only when Y was numerically rank-deficient beyond what
    the shift repairs) is redone with Householder QR."""
    Q = _cholqr_pass(Y, chol, shift=True)
    Q = _cholqr_pass(Q, chol)
    q = Q.shape[-1]
    eye = torch.eye(q, dtype=Q.dtype, device=Q.device)
    err = ((Q.transpose(-1, -2) @ Q) - eye).abs().amax(dim=(-2, -1))
    Q = _cholqr_pass(Q, chol)
    bad = (err > 0.25) | ~torch.isfinite(err)  # CholQR of a basis with ‖QᵀQ − I‖ < 1/4 is orthonormal to O(u)
    idx = bad.nonzero().flatten().tolist()
    if idx:
        Q[idx] = torch.linalg.qr(Y[idx])[0]
    return Q


def _rsvd_cholqr(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int, chol):
    """The fused backends' randomized SVD; ``chol(gram64, rel_shift, rel_floor) -> (R, floored)`` is the
    backend's batched Cholesky kernel (shift·trace added to the diagonal, pivots floored)."""
    G = G.contiguous()
    Gt = G.transpose(-1, -2)
    omega = omega.to(G.dtype)
    Y = G @ omega
    if niter == 0:
        Q = _orthonormalize(Y, chol)
    else:
        Q = _cholqr_pass(Y, chol)
        for i in range(niter):
            Z = _cholqr_pass(Gt @ Q, chol)
            Y = G @ Z
            Q = _orthonormalize(Y, chol) if i == niter - 1 else _cholqr_pass(Y, chol)
    small = Q.transpose(-1, -2) @ G  # (b, q, n), wide
    # Reduce the wide q×n matrix to q×q before the SVD: an orthonormal basis Q₂ (n×q) of its rows by the
    # same Cholesky-QR (with its Householder fallback), then small = (small·Q₂)·Q₂ᵀ exactly, and only the
    # q×q factor small·Q₂ goes to the dense SVD. cuSOLVER's default Jacobi SVD loops over the batch and
    # would otherwise sweep the whole q×n matrix of every layer.
    Q2 = _orthonormalize(small.transpose(-1, -2), chol)  # (b, n, q)
    Ur, S, Vrh = torch.linalg.svd(small @ Q2)  # (b, q, q)
    U = Q @ Ur[..., :k]
    V = Q2 @ Vrh[..., :k, :].transpose(-1, -2)
    U, V = apply_sign_convention(U, V)
    return U.contiguous(), S[..., :k].contiguous(), V.contiguous()


def _cholesky_shifted_native(gram: torch.Tensor, rel_shift: float, rel_tol: float):
    extension.load()  # cached; lets tests call the kernel directly
    return extension.native("cholesky_shifted")(gram, float(rel_shift), float(rel_tol))


if _tri is not None:

    @RANDOMIZED_SVD.register("triton")
    def randomized_svd_triton(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int):
        return _rsvd_cholqr(G, omega, k, niter, _tri.cholesky_shifted)


# cpp runs only when forced: on CPU, LAPACK's Householder QR of a tall 512×64 panel is cheap and the float64
# Gram passes are not, so this algorithm measured 0.66–0.9× the torch reference there (benches/RESULTS.md).
# It stays as the CPU mirror of the CUDA path (same algorithm, testable in CI) and for the forced-backend runs.
@RANDOMIZED_SVD.register("cpp", native_op="cholesky_shifted", auto=False)
@RANDOMIZED_SVD.register("cuda", native_op="cholesky_shifted")
def randomized_svd_native(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int):
    return _rsvd_cholqr(G, omega, k, niter, _cholesky_shifted_native)


def _check(G: torch.Tensor, k: int) -> None:
    if G.dim() != 3:
        raise InvalidArgumentError(f"expected a batch of matrices (b, m, n), got shape {tuple(G.shape)}")
    if not 1 <= k <= min(G.shape[-2:]):
        raise InvalidArgumentError(f"k={k} must be in [1, min(m, n)={min(G.shape[-2:])}]")


def randomized_svd(G: torch.Tensor, omega: torch.Tensor, k: int, niter: int = 4):
    """Top-k randomized SVD of each matrix of G (b, m, n) with sketch omega (b, n, q), q ≥ k."""
    _check(G, k)
    if omega.shape[0] != G.shape[0] or omega.shape[1] != G.shape[2] or omega.shape[2] < k:
        raise InvalidArgumentError(f"sketch shape {tuple(omega.shape)} does not fit G {tuple(G.shape)} with k={k}")
    return RANDOMIZED_SVD(G.device, G, omega, k, niter)


def exact_svd(G: torch.Tensor, k: int):
    """Top-k of the full SVD of each matrix of G (b, m, n), with the same sign convention."""
    _check(G, k)
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    U, V = apply_sign_convention(U[..., :k], Vh[..., :k, :].transpose(-1, -2))
    return U.contiguous(), S[..., :k].contiguous(), V.contiguous()
