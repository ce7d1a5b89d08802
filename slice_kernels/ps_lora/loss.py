"""The PS-LoRA stability loss (SPEC §3): one layer's ``sign_consistency_loss`` against a ``History``, and the
model-level ``ParameterStabilityLoss``.

* ``sign_consistency_loss(A, B, history, ...)``: L_dir + β·L_mag of one layer through the fused op
  (``slice_kernels.ops.sign_loss``); 0 with no history (t = 1).
* ``ParameterStabilityLoss(history, lam=..., ...)``: an ``nn.Module`` whose ``forward(model)`` walks a PEFT
  model's active LoRA layers and returns L_s = λ·Σ_ℓ (L_dir,ℓ + β·L_mag,ℓ). Plain loop:
  ``loss = task + psl(model)``; with a Trainer see ``ps_lora.trainer``.

An adapter initialized with a non-zero product (SLICE absorbs s·B₀·A₀ into W) updates W by
s·(B·A − B₀·A₀), not s·B·A, and the loss penalizes that update, as the rank-2r factors [B, −B₀]·[A; A₀] (still no
m×n tensor). ``get_slice_model`` leaves B₀, A₀ on its LoRA layers (``slice_kernels.init_offsets``), and they are
used with no argument; ``init_offsets={name: (B₀, A₀)}`` overrides them per layer (e.g. for a model reloaded from
disk, which carries none).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..errors import HistoryError, InvalidTypeError
from ..init_offsets import effective_factors, init_offset
from ..modules import canonical_name, lora_factors, lora_layers
from ..ops.sign_bits import unpack_sign_bits
from ..ops.sign_loss import MODES, sign_consistency
from ..sharded_guard import first_dtensor
from .history import History, HistoryStore

log = logging.getLogger("slice_kernels")

DEFAULT_BETA = 0.1  # SPEC §3 leaves β to the caller; 0.1 keeps L_mag a tie-breaker next to L_dir ≤ 2.


def _compute_dtype(A: torch.Tensor) -> torch.dtype:
    return torch.float64 if A.dtype == torch.float64 else torch.float32


def sign_consistency_loss(
    A: torch.Tensor,
    B: torch.Tensor,
    history: History | None,
    *,
    scaling: float,
    alpha: float = 1.0,
    beta: float = DEFAULT_BETA,
    mode: str = "tanh",
) -> torch.Tensor:
    """L_dir + β·L_mag of one layer (SPEC §3), differentiable in A and B, with no m×n tensor.

    ``A`` (r×n) and ``B`` (m×r) are the new LoRA factors in (out, in) orientation, ``scaling`` the LoRA scale
    s; ``history`` the earlier updates of this layer. No history, or a zero one, gives 0 (the t = 1 case).
    The backend follows ``slice_kernels.dispatch``."""
    if mode not in MODES:
        raise HistoryError(f"sign_consistency_loss: mode must be one of {tuple(MODES)}, got {mode!r}")
    # checked before the t = 1 shortcut so a bad call fails at the first task, not silently until the second;
    # a negative alpha would flip tanh's sign and reward disagreeing with H (ParameterStabilityLoss refuses it too)
    if not (math.isfinite(float(alpha)) and float(alpha) > 0 and math.isfinite(float(beta)) and float(beta) >= 0):
        raise HistoryError(
            f"sign_consistency_loss: need alpha > 0 and beta ≥ 0, both finite (got alpha={alpha}, beta={beta})"
        )
    if history is not None and not isinstance(history, History):
        raise InvalidTypeError(
            f"sign_consistency_loss: history must be a slice_kernels.History or None, got "
            f"{type(history).__name__}; wrap a dense H as History.from_dense(H), or factors as "
            f"History.from_factors(Bs, As, scalings)"
        )
    for name, t in (("A", A), ("B", B)):
        # integer factors cannot carry a gradient (and with no history would give 0 without complaint)
        if not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidTypeError(
                f"sign_consistency_loss: {name} must be a floating-point tensor (the LoRA "
                f"factor), got {kind}; pass e.g. lora_{name}.weight, or convert with .float()"
            )
    if history is None or history.rms == 0.0:
        return (A.sum() + B.sum()) * 0.0  # zero, but connected to A and B so backward() works at t = 1
    H1, H2 = history.operands(A.device)
    return sign_consistency(
        A,
        B,
        H1,
        H2,
        kind=history.kind,
        shape=history.shape,
        rms=history.rms,
        scaling=scaling,
        alpha=alpha,
        beta=beta,
        mode=mode,
    )


def reference_sign_consistency_loss(A, B, history: History, *, scaling, alpha=1.0, beta=DEFAULT_BETA, mode="tanh"):
    """The oracle: materialize ΔW and H, then SPEC §3's formula term by term (tests only)."""
    if history is None or history.rms == 0.0:
        return (A.sum() + B.sum()) * 0.0
    dt = _compute_dtype(A)
    dW = scaling * (B.to(dt) @ A.to(dt))
    rms = history.rms
    if history.kind == "bits":
        sgn = unpack_sign_bits(history.bits, history.shape[1], dt)
        t, s = sgn, sgn
    else:
        H = history.to_dense(dt) if history.kind == "factors" else history.dense.to(dt)
        t, s = torch.tanh(alpha / rms * H), torch.sign(H)
    if mode == "tanh":
        l_dir = (1 - torch.tanh(alpha / rms * dW) * t).mean()
    else:
        l_dir = torch.relu(-s * dW).mean() / rms
    return l_dir + beta * (dW**2).mean() / rms**2


class ParameterStabilityLoss(nn.Module):
    """L_s = λ·Σ_ℓ (L_dir,ℓ + β·L_mag,ℓ) over the LoRA layers of a PEFT model (SPEC §3).

    ``history``: a ``HistoryStore`` or ``{layer name: History}`` (names from ``model.named_modules()``; a
    layer with no history contributes 0). ``lam`` = λ, ``alpha`` = α (α_ℓ = α/rms(H_ℓ)), ``beta`` = β,
    ``mode`` "tanh" | "hinge". ``init_offsets``: ``{name: (B₀, A₀)}`` or ``(B₀, A₀, s₀)`` of inits absorbed into
    W; they take precedence over the offsets an init left on the layers (see module doc). Names may carry DDP's
    ``module.`` or torch.compile's ``_orig_mod.`` (``modules.canonical_name``), in the history and in the model.
    """

    def __init__(
        self,
        history: HistoryStore | dict | None,
        *,
        lam: float = 1.0,
        alpha: float = 1.0,
        beta: float = DEFAULT_BETA,
        mode: str = "tanh",
        init_offsets: dict | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise HistoryError(f"ParameterStabilityLoss: mode must be one of {tuple(MODES)}, got {mode!r}")
        if lam < 0 or beta < 0 or alpha <= 0:
            raise HistoryError(
                f"ParameterStabilityLoss: need lam ≥ 0, beta ≥ 0, alpha > 0 (got lam={lam}, beta={beta}, alpha={alpha})"
            )
        layers = history.layers if isinstance(history, HistoryStore) else dict(history or {})
        self.layers: dict[str, History] = {canonical_name(k): v for k, v in layers.items()}
        self.offsets = {canonical_name(k): v for k, v in (init_offsets or {}).items()}
        self.lam, self.alpha, self.beta, self.mode = float(lam), float(alpha), float(beta), mode
        self._checked = False

    @property
    def active(self) -> bool:
        return self.lam > 0 and any(h.rms > 0 for h in self.layers.values())

    def forward(self, model: nn.Module) -> torch.Tensor:
        found = [(canonical_name(n), mod, ad) for n, mod, ad in lora_layers(model)]
        if not self._checked and self.layers:
            names = {n for n, _, _ in found}
            missing = sorted(set(self.layers) - names)
            if missing and len(missing) == len(self.layers):
                raise HistoryError(
                    f"ParameterStabilityLoss: none of the {len(self.layers)} history layers is a LoRA layer of "
                    f"this model (e.g. {missing[0]!r}; the model has {sorted(names)[:3]}...). Record the "
                    f"history from a PEFT model wrapped the same way (HistoryStore.record_task(peft_model))."
                )
            if missing:
                log.warning(
                    "ParameterStabilityLoss: %d history layers are not LoRA layers of the model (ignored), e.g. %s",
                    len(missing),
                    missing[0],
                )
            self._checked = True
        total = None
        for name, mod, ad in found:
            h = self.layers.get(name)
            if h is None or h.rms == 0.0:
                continue
            B, A, s = lora_factors(mod, ad)
            if first_dtensor((A, B)) is not None:
                raise HistoryError(
                    f"ParameterStabilityLoss on an FSDP2-sharded LoRA model is not supported: layer {name!r} holds "
                    f"DTensor shards of lora_A/lora_B, and the loss needs each layer's full A and B. Train with the "
                    f"stability loss on replicated ranks (DDP) instead, or without it on the sharded model "
                    f"(docs/distributed.md)"
                )
            if h.device != A.device:
                h = self.layers[name] = h.to(A.device)
            if (B.shape[0], A.shape[1]) != tuple(h.shape):  # name the layer: the op itself cannot
                raise HistoryError(
                    f"ParameterStabilityLoss: layer {name!r} makes a {B.shape[0]}×{A.shape[1]} update "
                    f"but its history is {h.shape[0]}×{h.shape[1]}: the history was recorded from "
                    f"another model"
                )
            offset = self.offsets.get(name)
            B, A = effective_factors(B, A, offset if offset is not None else init_offset(mod, ad), s)
            term = sign_consistency_loss(A, B, h, scaling=s, alpha=self.alpha, beta=self.beta, mode=self.mode)
            total = term if total is None else total + term
        if total is None or self.lam == 0.0:
            p = next(model.parameters())
            return torch.zeros((), device=p.device, dtype=torch.float32)
        return self.lam * total
