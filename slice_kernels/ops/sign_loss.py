"""PS-LoRA sign-consistency loss of one layer (SPEC §3), fused so no m×n tensor is materialized.

With ΔW = s·B·A (B m×r, A r×n), the history H given by its operands (factors H1·H2, a dense H1, or sign
bits H1 packed by ``sign_bits``) and α_ℓ = α / rms(H):

* tanh:  L_dir = mean_j [1 − tanh(α_ℓ ΔW_j) · t_j],  t_j = tanh(α_ℓ H_j) (sign(H_j) in bit form);
* hinge: L_dir = mean_j relu(−sign(H_j) · ΔW_j) / rms(H);
* L_mag = mean_j ΔW_j² / rms(H)², by the Gram identity (r×r matrices only, plain autograd);
* the layer's loss is L_dir + β·L_mag.

The fused part is L_dir and its gradient. Every backend walks tiles of ΔW (and of H from its factors, its
bits, or the dense input), reduces the loss on the fly, and for the backward forms the tile of
G = ∂L_dir/∂ΔW and contracts it at once: dB += s·G·Aᵀ, dA += s·Bᵀ·G (the flash-attention backward pattern).
Extra memory is O((m+n)·r) plus tiles.

Backends (``slice_kernels.dispatch``): ``torch`` (row-block chunked, float64-capable; the portable fallback),
``cpp`` (tiled, OpenMP, float32/float64), ``triton`` and ``cuda`` (compute in float32). The user-facing
``sign_consistency_loss`` (taking a ``History``) and the materializing oracle of the tests are in
``slice_kernels.ps_lora.loss``.

The autograd wrappers are ``torch.library`` custom ops with fake kernels and ``register_autograd``, so
``torch.compile`` traces them as single nodes: ``slice_kernels::sign_loss_dir`` (forward; its backward is
``sign_loss_dir_bwd``, one more pass over the tiles) and, when A or B requires grad,
``slice_kernels::sign_loss_dir_train``, which returns the loss and the gradients from one pass (the backward
only scales them).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import dispatch, extension
from ..errors import InvalidArgumentError
from .sign_bits import unpack_sign_bits

KIND = {"factors": 0, "dense": 1, "bits": 2}
MODES = {"tanh": 0, "hinge": 1}

SIGN_LOSS_FWD = dispatch.define("sign_loss_fwd")
SIGN_LOSS_BWD = dispatch.define("sign_loss_bwd")
SIGN_LOSS_FWD_BWD = dispatch.define("sign_loss_fwd_bwd")

# Rows per block of the torch backend: bounds its working set to a few row blocks of ΔW and H.
_TORCH_ROW_BLOCK = 128


# ---------------------------------------------------------------------------------------------- helpers
def _compute_dtype(A: torch.Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def _dir_terms(d, h, kind: int, mode: int, alpha_l: float, inv_rms: float, need_f: bool, need_g: bool):
    """Elementwise L_dir summand f and its derivative ∂f/∂ΔW on a tile (d = ΔW tile; h = H tile, or ±1
    in bit form)."""
    f = g = None
    if mode == 0:
        t = torch.sign(h) if kind == 2 else torch.tanh(alpha_l * h)
        td = torch.tanh(alpha_l * d)
        if need_f:
            f = 1.0 - td * t
        if need_g:
            g = -alpha_l * (1.0 - td * td) * t
    else:
        sg = torch.sign(h)
        v = -sg * d
        if need_f:
            f = torch.clamp_min(v, 0.0) * inv_rms
        if need_g:
            g = torch.where(v > 0, -sg * inv_rms, torch.zeros_like(v))
    return f, g


def _h_rows(kind, H1, H2, r0, r1, n, dtype):
    if kind == 0:
        return H1[r0:r1].to(dtype) @ H2.to(dtype)
    if kind == 1:
        return H1[r0:r1].to(dtype)
    return unpack_sign_bits(H1[r0:r1], n, dtype)


# ---------------------------------------------------------------------------------------------- torch backend
@SIGN_LOSS_FWD.register("torch")
def sign_loss_fwd_torch(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    m, n = B.shape[0], A.shape[1]
    dt = _compute_dtype(A)
    Ac, Bc = A.to(dt), B.to(dt)
    total = torch.zeros((), dtype=torch.float64, device=A.device)
    for r0 in range(0, m, _TORCH_ROW_BLOCK):
        r1 = min(m, r0 + _TORCH_ROW_BLOCK)
        d = scaling * (Bc[r0:r1] @ Ac)
        f, _ = _dir_terms(d, _h_rows(kind, H1, H2, r0, r1, n, dt), kind, mode, alpha_l, inv_rms, True, False)
        total += f.sum(dtype=torch.float64)
    return (total / (m * n)).to(dt)


def _row_block_pass(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, want_loss: bool):
    """One pass over row blocks of ΔW = s·B·A: (Σ L_dir summands or None, ∂L_dir/∂A, ∂L_dir/∂B) in the
    compute dtype; never more than a row block of ΔW and H alive."""
    m, n = B.shape[0], A.shape[1]
    dt = _compute_dtype(A)
    Ac, Bc = A.to(dt), B.to(dt)
    gs = scaling / (m * n)
    total = torch.zeros((), dtype=torch.float64, device=A.device) if want_loss else None
    dA = torch.zeros_like(Ac)
    dB = torch.empty_like(Bc)
    for r0 in range(0, m, _TORCH_ROW_BLOCK):
        r1 = min(m, r0 + _TORCH_ROW_BLOCK)
        d = scaling * (Bc[r0:r1] @ Ac)
        f, g = _dir_terms(d, _h_rows(kind, H1, H2, r0, r1, n, dt), kind, mode, alpha_l, inv_rms, want_loss, True)
        if want_loss:
            total += f.sum(dtype=torch.float64)
        g = g * gs
        dB[r0:r1] = g @ Ac.T
        dA += Bc[r0:r1].T @ g
    return total, dA, dB


@SIGN_LOSS_BWD.register("torch")
def sign_loss_bwd_torch(grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    _, dA, dB = _row_block_pass(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, want_loss=False)
    g = grad.to(dA.dtype)
    return (dA * g).to(A.dtype), (dB * g).to(B.dtype)


@SIGN_LOSS_FWD_BWD.register("torch")
def sign_loss_fwd_bwd_torch(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    """The training path: (L_dir, ∂L_dir/∂A, ∂L_dir/∂B) from one pass over the row blocks."""
    total, dA, dB = _row_block_pass(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, want_loss=True)
    m, n = B.shape[0], A.shape[1]
    return (total / (m * n)).to(dA.dtype), dA.to(A.dtype), dB.to(B.dtype)


# ---------------------------------------------------------------------------------------------- native backends
def _native_args(A, B, H1, H2, kind):
    dt = _compute_dtype(A)
    Ac, Bc = A.to(dt).contiguous(), B.to(dt).contiguous()
    if kind == 0:
        H1, H2 = H1.to(dt).contiguous(), H2.to(dt).contiguous()
    elif kind == 1:
        H1 = H1.to(dt).contiguous()
    return Ac, Bc, H1.contiguous(), H2


@SIGN_LOSS_FWD.register("cpp", native_op="sign_loss_fwd")
@SIGN_LOSS_FWD.register("cuda", native_op="sign_loss_fwd")
def sign_loss_fwd_native(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    Ac, Bc, H1, H2 = _native_args(A, B, H1, H2, kind)
    if A.device.type == "cuda":  # the CUDA kernels compute in float32 (mirroring Triton)
        Ac, Bc = Ac.float(), Bc.float()
        H1 = H1.float() if kind != 2 else H1
        H2 = H2.float() if H2 is not None else None
    return extension.native("sign_loss_fwd")(Ac, Bc, H1, H2, kind, mode, scaling, alpha_l, inv_rms).to(
        _compute_dtype(A)
    )


@SIGN_LOSS_BWD.register("cpp", native_op="sign_loss_bwd")
@SIGN_LOSS_BWD.register("cuda", native_op="sign_loss_bwd")
def sign_loss_bwd_native(grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    Ac, Bc, H1, H2 = _native_args(A, B, H1, H2, kind)
    if A.device.type == "cuda":
        Ac, Bc = Ac.float(), Bc.float()
        H1 = H1.float() if kind != 2 else H1
        H2 = H2.float() if H2 is not None else None
    dA, dB = extension.native("sign_loss_bwd")(
        grad.to(Ac.dtype).reshape(()), Ac, Bc, H1, H2, kind, mode, scaling, alpha_l, inv_rms
    )
    return dA.to(A.dtype), dB.to(B.dtype)


@SIGN_LOSS_FWD_BWD.register("cpp", native_op="sign_loss_fwd_bwd")
@SIGN_LOSS_FWD_BWD.register("cuda", native_op="sign_loss_fwd_bwd")
def sign_loss_fwd_bwd_native(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms):
    Ac, Bc, H1, H2 = _native_args(A, B, H1, H2, kind)
    if A.device.type == "cuda":
        Ac, Bc = Ac.float(), Bc.float()
        H1 = H1.float() if kind != 2 else H1
        H2 = H2.float() if H2 is not None else None
    loss, dA, dB = extension.native("sign_loss_fwd_bwd")(Ac, Bc, H1, H2, kind, mode, scaling, alpha_l, inv_rms)
    return loss.to(_compute_dtype(A)), dA.to(A.dtype), dB.to(B.dtype)


# ---------------------------------------------------------------------------------------------- triton backend
try:
    from . import _sign_loss_triton as _tri

    SIGN_LOSS_FWD.register("triton")(_tri.sign_loss_fwd_triton)
    SIGN_LOSS_BWD.register("triton")(_tri.sign_loss_bwd_triton)
    SIGN_LOSS_FWD_BWD.register("triton")(_tri.sign_loss_fwd_bwd_triton)
except ImportError:  # triton missing: the dispatcher reports "sign_loss_fwd has no triton implementation"
    _tri = None


# ---------------------------------------------------------------------------------------------- custom op
def _auto_backend(device, r: int, kind: int) -> str:
    """The dispatcher's choice, except that an automatic pick of Triton whose tiles at this rank would not fit
    a GPU block's shared memory (``_sign_loss_triton.fits_gpu``) goes to the torch reference instead; a forced
    Triton backend still raises, naming the limit."""
    backend = dispatch.select(SIGN_LOSS_FWD, device)[0]
    if backend == "triton" and dispatch.forced_backend() is None and not _tri.fits_gpu(r, kind):
        return "torch"
    return backend


def _run(op: dispatch.Op, backend: str, device, r: int, kind: int, *args):
    with dispatch.use_backend(backend or _auto_backend(device, r, kind)):
        return op(device, *args)


@torch.library.custom_op("slice_kernels::sign_loss_dir", mutates_args=())
def sign_loss_dir(
    A: torch.Tensor,
    B: torch.Tensor,
    H1: torch.Tensor,
    H2: Optional[torch.Tensor],
    kind: int,
    mode: int,
    scaling: float,
    alpha_l: float,
    inv_rms: float,
    backend: str,
) -> torch.Tensor:
    """L_dir of one layer (mean over its m·n entries); see the module doc. ``backend`` "" = dispatcher's choice."""
    return _run(SIGN_LOSS_FWD, backend, A.device, B.shape[1], kind, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms)


@sign_loss_dir.register_fake
def _(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, backend):
    return A.new_empty((), dtype=_compute_dtype(A))


@torch.library.custom_op("slice_kernels::sign_loss_dir_bwd", mutates_args=())
def sign_loss_dir_bwd(
    grad: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    H1: torch.Tensor,
    H2: Optional[torch.Tensor],
    kind: int,
    mode: int,
    scaling: float,
    alpha_l: float,
    inv_rms: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(
        SIGN_LOSS_BWD, backend, A.device, B.shape[1], kind, grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms
    )


@sign_loss_dir_bwd.register_fake
def _(grad, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, backend):
    return torch.empty_like(A), torch.empty_like(B)


def _setup_context(ctx, inputs, output):
    A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, backend = inputs
    ctx.save_for_backward(A, B, H1, H2)
    ctx.args = (kind, mode, scaling, alpha_l, inv_rms, backend)


def _backward(ctx, grad):
    A, B, H1, H2 = ctx.saved_tensors
    dA, dB = sign_loss_dir_bwd(grad, A, B, H1, H2, *ctx.args)
    return dA, dB, None, None, None, None, None, None, None, None


sign_loss_dir.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("slice_kernels::sign_loss_dir_train", mutates_args=())
def sign_loss_dir_train(
    A: torch.Tensor,
    B: torch.Tensor,
    H1: torch.Tensor,
    H2: Optional[torch.Tensor],
    kind: int,
    mode: int,
    scaling: float,
    alpha_l: float,
    inv_rms: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training form of ``sign_loss_dir``: (L_dir, ∂L_dir/∂A, ∂L_dir/∂B) from one pass over the tiles; its
    autograd backward only scales the saved gradients (O((m+n)·r) memory), so forward + backward cost one pass
    instead of two. Use the first output; the other two are the unit-upstream gradients."""
    return _run(
        SIGN_LOSS_FWD_BWD, backend, A.device, B.shape[1], kind, A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms
    )


@sign_loss_dir_train.register_fake
def _(A, B, H1, H2, kind, mode, scaling, alpha_l, inv_rms, backend):
    return A.new_empty((), dtype=_compute_dtype(A)), torch.empty_like(A), torch.empty_like(B)


def _train_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


def _train_backward(ctx, grad, _grad_dA, _grad_dB):
    dA, dB = ctx.saved_tensors
    return (grad * dA).to(dA.dtype), (grad * dB).to(dB.dtype), None, None, None, None, None, None, None, None


sign_loss_dir_train.register_autograd(_train_backward, setup_context=_train_setup_context)


# ---------------------------------------------------------------------------------------------- public op
def _check(A, B, shape, mode: str):
    if mode not in MODES:
        raise InvalidArgumentError(f"sign_consistency_loss: mode must be one of {tuple(MODES)}, got {mode!r}")
    if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
        raise InvalidArgumentError(
            f"sign_consistency_loss: A must be (r, n) and B (m, r); got A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if (B.shape[0], A.shape[1]) != tuple(shape):
        raise InvalidArgumentError(
            f"sign_consistency_loss: the update B·A is {B.shape[0]}×{A.shape[1]} but the history is "
            f"{shape[0]}×{shape[1]}; was the history recorded for another layer (Conv1D layers are (out, in) "
            f"here: pass the factors transposed)?"
        )
    if A.dtype != B.dtype or A.device != B.device:
        raise InvalidArgumentError(
            f"sign_consistency_loss: A and B differ in dtype/device ({A.dtype}/{A.device} vs {B.dtype}/{B.device})"
        )


def sign_consistency(
    A: torch.Tensor,
    B: torch.Tensor,
    H1: torch.Tensor,
    H2: torch.Tensor | None,
    *,
    kind: str,
    shape: tuple[int, int],
    rms: float,
    scaling: float,
    alpha: float,
    beta: float,
    mode: str = "tanh",
) -> torch.Tensor:
    """L_dir + β·L_mag of one layer with ΔW = s·B·A against a history H ≠ 0 given by its operands, differentiable
    in A and B, with no m×n tensor. ``kind`` "factors" (H = H1·H2), "dense" (H = H1) or "bits" (H1 the packed
    signs); ``shape`` = (m, n); ``rms`` = rms(H) > 0."""
    _check(A, B, shape, mode)
    k = KIND[kind]
    alpha_l = float(alpha) / rms
    inv_rms = 1.0 / rms
    backend = ""
    if not torch.compiler.is_compiling():
        backend = _auto_backend(A.device, B.shape[1], k)  # raises early, and backward uses the same
    args = (A, B, H1, H2, k, MODES[mode], float(scaling), alpha_l, inv_rms, backend)
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        l_dir = sign_loss_dir_train(*args)[0]  # loss and gradients in one pass
    else:
        l_dir = sign_loss_dir(*args)
    if beta == 0.0:
        return l_dir
    m, n = shape
    dt = _compute_dtype(A)
    Ad, Bd = A.to(dt), B.to(dt)
    sq = (scaling**2) * ((Bd.T @ Bd) * (Ad @ Ad.T)).sum()
    return l_dir + beta * sq / (m * n * rms**2)
