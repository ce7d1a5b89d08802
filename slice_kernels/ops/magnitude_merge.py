"""PS-LoRA magnitude merge (SPEC §3): merged_j = ΔW_{k*, j}, k* = argmax_k |ΔW_{k, j}|, ties to the earliest.

Updates are given as factors ``(B_k, A_k, s_k)`` (ΔW_k = s_k·B_k·A_k, (out, in) orientation) or as dense
m×n tensors. Output: a new dense matrix, or ``into=W`` to add the merged update into W in place.

From factors, every backend walks tiles of the output, forms each task's tile on chip and keeps the largest
magnitude (a later task wins only when strictly larger): no m×n buffer besides the output (none at all with
``into=``). Dense inputs are m×n already; they take the torch path row block by row block.

Backends of ``magnitude_merge_factors``: ``torch`` (row blocks), ``cpp`` (tiled, OpenMP), ``triton`` and
``cuda`` (float32 arithmetic).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from .. import dispatch, extension
from ..errors import InvalidArgumentError, InvalidTypeError

Update = Union[torch.Tensor, tuple]
_ROW_BLOCK = 128
# What the CUDA kernel can store; another output dtype (float64) runs on the torch path (see magnitude_merge).
_CUDA_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# What every backend can merge into (the cpp kernel's list; the torch path takes the same, so all agree)
_INTO_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

MAGNITUDE_MERGE_FACTORS = dispatch.define("magnitude_merge_factors")


@MAGNITUDE_MERGE_FACTORS.register("torch")
def merge_factors_torch(B, A, offsets, scalings, out, accumulate):
    m = B.shape[0]
    for r0 in range(0, m, _ROW_BLOCK):
        r1 = min(m, r0 + _ROW_BLOCK)
        best = None
        for k, s in enumerate(scalings):
            cur = s * (B[r0:r1, offsets[k] : offsets[k + 1]] @ A[offsets[k] : offsets[k + 1]])
            best = cur if best is None else torch.where(cur.abs() > best.abs(), cur, best)
        if accumulate:
            out[r0:r1] += best.to(out.dtype)
        else:
            out[r0:r1] = best.to(out.dtype)


@MAGNITUDE_MERGE_FACTORS.register("cpp", native_op="magnitude_merge_factors")
@MAGNITUDE_MERGE_FACTORS.register("cuda", native_op="magnitude_merge_factors")
def merge_factors_native(B, A, offsets, scalings, out, accumulate):
    if B.device.type == "cuda":  # the CUDA kernel computes in float32 (mirroring Triton)
        B, A = B.float(), A.float()
    extension.native("magnitude_merge_factors")(
        B.contiguous(), A.contiguous(), list(offsets), list(scalings), out, bool(accumulate)
    )


try:
    from ._magnitude_merge_triton import merge_factors_triton

    MAGNITUDE_MERGE_FACTORS.register("triton")(merge_factors_triton)
except ImportError:  # no triton: the dispatcher says so when it is forced
    pass


def _normalize(updates: Sequence[Update]):
    """[(kind, payload)] with kind 'factors' → (B, A, s) or 'dense' → H; and the common (m, n)."""
    if isinstance(updates, torch.Tensor) or not len(updates):
        raise InvalidArgumentError(
            "magnitude_merge: pass a non-empty list of updates, each a dense m×n tensor or a "
            "(B, A) / (B, A, scaling) tuple"
        )
    items, shape = [], None
    form = (
        "each update must be a (B, A, scaling) factor tuple (B (m, r) and A (r, n) tensors, scaling a number; "
        "(B, A) means scaling 1) or a dense m×n tensor"
    )
    for k, u in enumerate(updates):
        if isinstance(u, torch.Tensor):
            if u.dim() != 2:
                raise InvalidArgumentError(
                    f"magnitude_merge: update {k} is a tensor of shape {tuple(u.shape)}; dense updates must be m×n"
                )
            items.append(("dense", u))
            sh = tuple(u.shape)
        elif isinstance(u, (tuple, list)) and len(u) in (2, 3):
            B, A = u[0], u[1]
            if not (isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor)):
                raise InvalidTypeError(
                    f"magnitude_merge: update {k} is a {type(u).__name__} of {type(B).__name__} and "
                    f"{type(A).__name__}; {form}"
                )
            try:
                s = float(u[2]) if len(u) == 3 else 1.0
            except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor scaling with several elements
                raise InvalidTypeError(f"magnitude_merge: update {k} has scaling {u[2]!r}; {form}") from None
            if not math.isfinite(s):  # NaN loses every |·| comparison and Inf wins every one: a silently wrong merge
                raise InvalidArgumentError(
                    f"magnitude_merge: update {k} has scaling {s}; the scaling must be a finite number (the "
                    f"adapter's s = α/√r or α/r): check the LoRA alpha and rank it came from"
                )
            if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
                raise InvalidArgumentError(
                    f"magnitude_merge: update {k} has B {tuple(B.shape)} and A {tuple(A.shape)}; "
                    f"expected B (m, r) and A (r, n)"
                )
            items.append(("factors", (B, A, s)))
            sh = (B.shape[0], A.shape[1])
        else:
            raise InvalidTypeError(
                f"magnitude_merge: update {k} is a {type(u).__name__}"
                f"{f' of length {len(u)}' if isinstance(u, (tuple, list)) else ''}; {form}"
            )
        if shape is None:
            shape = sh
        elif sh != shape:
            raise InvalidArgumentError(
                f"magnitude_merge: update {k} is {sh[0]}×{sh[1]} but update 0 is {shape[0]}×{shape[1]}"
            )
    return items, shape


@torch.no_grad()  # a selection, not differentiable: every backend returns a plain tensor and may write into a Parameter
def magnitude_merge(updates: Sequence[Update], *, into: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise max-|·| merge of K updates of one layer, ties to the earliest (SPEC §3).

    ``updates``: dense m×n tensors and/or ``(B, A)`` / ``(B, A, scaling)`` factor tuples, in task order.
    Returns the merged m×n update, or with ``into=W`` (m×n; float32, float64, bfloat16 or float16) adds it into
    W in place and returns W. From factors no m×n buffer is allocated besides the result (none with ``into``)."""
    items, (m, n) = _normalize(updates)
    if into is not None and not (isinstance(into, torch.Tensor) and into.dtype in _INTO_DTYPES):
        # checked here, not per backend: torch and Triton would truncate into an integer W, cpp refuses it
        what = f"a {into.dtype} tensor" if isinstance(into, torch.Tensor) else f"a {type(into).__name__}"
        raise InvalidTypeError(
            f"magnitude_merge: into is {what}; it must be a floating-point m×n weight (float32, float64, "
            f"bfloat16 or float16). Merge into a floating-point copy of W, or leave into out to get the update"
        )
    if into is not None and tuple(into.shape) != (m, n):
        raise InvalidArgumentError(
            f"magnitude_merge: into has shape {tuple(into.shape)} but the updates are {m}×{n}; "
            f"for a transformers Conv1D weight pass weight.T"
        )
    tensors = [p for kind, p in items if kind == "dense"] + [t for kind, p in items if kind == "factors" for t in p[:2]]
    device = (into if into is not None else tensors[0]).device
    if any(t.device != device for t in tensors):
        raise InvalidArgumentError(f"magnitude_merge: every update must be on {device}")
    # float64 arithmetic when any input or the target W is float64 (the cpp kernel merges float32 factors only
    # into float32/bf16/fp16 outputs)
    f64 = any(t.dtype == torch.float64 for t in tensors) or (into is not None and into.dtype == torch.float64)
    dt = torch.float64 if f64 else torch.float32
    out = into if into is not None else torch.empty((m, n), dtype=dt, device=device)
    accumulate = into is not None

    if all(kind == "factors" for kind, _ in items):
        Bs = [p[0] for _, p in items]
        As = [p[1] for _, p in items]
        scal = [p[2] for _, p in items]
        offsets = [0]
        for B in Bs:
            offsets.append(offsets[-1] + B.shape[1])
        target = out
        Bc = torch.cat([B.to(dt) for B in Bs], dim=1).contiguous()
        Ac = torch.cat([A.to(dt) for A in As], dim=0).contiguous()
        if target.stride(-1) != 1 and target.stride(0) == 1:
            # A transposed view (e.g. Conv1D's weight.T): merge ΔWᵀ = s·Aᵀ·Bᵀ into the row-major storage.
            target, Bc, Ac = target.T, Ac.T.contiguous(), Bc.T.contiguous()
        elif target.stride(-1) != 1:
            raise InvalidArgumentError("magnitude_merge: into must have unit stride along one of its dimensions")
        backend, merge = MAGNITUDE_MERGE_FACTORS.select(device)
        if backend == "cuda" and target.dtype not in _CUDA_OUT_DTYPES:
            # a float64 W asks for float64 accuracy, which the float32 CUDA kernel cannot store: the row-block
            # torch path (as conflict_stats routes float64 inputs)
            merge = merge_factors_torch
        merge(Bc, Ac, offsets, scal, target, accumulate)
        return out

    # Dense (or mixed) inputs: already m×n each; merged row block by row block straight into `out`.
    for r0 in range(0, m, _ROW_BLOCK):
        r1 = min(m, r0 + _ROW_BLOCK)
        best = None
        for kind, p in items:
            if kind == "dense":
                cur = p[r0:r1].to(dt)
            else:
                B, A, s = p
                cur = s * (B[r0:r1].to(dt) @ A.to(dt))
            best = cur if best is None else torch.where(cur.abs() > best.abs(), cur, best)
        if accumulate:
            out[r0:r1] += best.to(out.dtype)
        else:
            out[r0:r1] = best.to(out.dtype)
    return out


def reference_magnitude_merge(updates: Sequence[Update]) -> torch.Tensor:
    """The oracle (tests only): materialize every ΔW_k in float64, stack, argmax |·| (first index wins)."""
    items, _ = _normalize(updates)
    mats = [p.double() if kind == "dense" else p[2] * (p[0].double() @ p[1].double()) for kind, p in items]
    stack = torch.stack(mats)
    mag = stack.abs()
    # argmax over k of |·| with ties to the earliest: the first k whose magnitude equals the max.
    is_max = mag == mag.max(dim=0, keepdim=True).values
    k_star = is_max.to(torch.int8).argmax(dim=0)
    return stack.gather(0, k_star.unsqueeze(0)).squeeze(0)
