"""Conflict statistics and the conflict-gated projection of SPEC §1 steps 3–4, over every target layer."""

from __future__ import annotations

import math

import torch

from ..errors import NonFiniteGradientError
from ..ops import conflict
from .config import SliceConfig
from .finite import all_finite
from .report import InitReport, timed_phase


def gammas_from_stats(stats: torch.Tensor, config: SliceConfig, has_prev: bool):
    """Per-layer γ (float64, (L,)) and the global (γ, cos) — None with per-module scope (SPEC §1 step 4)."""
    L = stats.shape[0]
    c, tau, eps = config.projection_strength, config.conflict_threshold, config.eps
    if not has_prev or not config.uses_replay:
        return torch.zeros(L, dtype=torch.float64), None

    def gate(D, Np, Nc):
        denom = math.sqrt(Np * Nc)
        cos = D / denom if denom > 0 else 0.0
        # N_p + ε = 0 (a zero replay gradient with eps=0, gated on by τ > 0): then D = 0 too and there is
        # nothing to project out; γ = 0 instead of 0/0
        if cos < tau and Np + eps > 0:
            return -c * D / (Np + eps), cos
        return 0.0, cos

    s = stats.cpu()
    if config.projection_scope == "global":
        D, Np, Nc = (float(v) for v in s.sum(0))
        gamma, cos = gate(D, Np, Nc)
        return torch.full((L,), gamma, dtype=torch.float64), (gamma, cos)
    gam = [gate(*(float(v) for v in s[i]))[0] for i in range(L)]
    return torch.tensor(gam, dtype=torch.float64), None


def reconcile(names, cur, prev, config: SliceConfig, report: InitReport, device, *, inplace: bool):
    """G̃ = G_cur + γ·G_prev for every layer (``prev`` None: G̃ = G_cur). Fills the report's global and
    per-layer figures and returns the list of G̃ (``cur`` itself when nothing is projected or ``inplace``).
    Every layer is checked before any buffer is written."""
    has_prev = prev is not None
    with timed_phase(report, "statistics", device):
        report.backends["conflict_stats"] = conflict.CONFLICT_STATS.select(cur[0].device)[0]
        stats = conflict.conflict_stats(cur, prev).cpu()
    for i, n in enumerate(names):
        if not math.isfinite(float(stats[i, 2])):
            raise NonFiniteGradientError(n, "current-task gradient (g_cur)")
        if has_prev and not (math.isfinite(float(stats[i, 1])) and math.isfinite(float(stats[i, 0]))):
            raise NonFiniteGradientError(n, "replay gradient (g_prev)")
    gammas, glob = gammas_from_stats(stats, config, has_prev)
    tot = stats.sum(0)
    report.D, report.Np, report.Nc = float(tot[0]), float(tot[1]), float(tot[2])
    if glob is not None:
        report.gamma, report.cos = glob
    elif not has_prev:
        report.gamma, report.cos = 0.0, None
    if has_prev:
        # finite inputs can still overflow when N_p is tiny and γ huge: refuse before touching anything
        fmax = max(float(torch.finfo(c.dtype).max) for c in cur)
        for i, n in enumerate(names):
            if not abs(float(gammas[i])) < fmax:
                raise NonFiniteGradientError(
                    n,
                    f"surgery result G̃ = G_cur + γ·G_prev (γ = {float(gammas[i]):.3e} overflows "
                    f"{cur[i].dtype}; N_p = {float(stats[i, 1]):.3e}: raise SliceConfig.eps)",
                )
    with timed_phase(report, "surgery", device):
        if has_prev and bool((gammas != 0).any()):
            if not inplace:
                cur = [c.clone() for c in cur]
            report.backends["surgery"] = conflict.SURGERY.select(cur[0].device)[0]
            conflict.surgery_(cur, prev, gammas)
            # a representable γ can still overflow the product γ·G_prev in some entry: check G̃ itself
            for i, n in enumerate(names):
                if float(gammas[i]) != 0.0 and not all_finite(cur[i]):
                    raise NonFiniteGradientError(
                        n,
                        f"surgery result G̃ = G_cur + γ·G_prev (γ = {float(gammas[i]):.3e}; N_p of the replay "
                        f"gradient is {float(stats[i, 1]):.3e}, raise SliceConfig.eps)",
                    )
    for i, n in enumerate(names):
        D, Np, Nc = (float(v) for v in stats[i])
        g = float(gammas[i])
        denom = math.sqrt(Np * Nc)
        report.layers[n] = {
            "shape": list(cur[i].shape),
            "D": D,
            "Np": Np,
            "Nc": Nc,
            "cos": D / denom if denom > 0 else 0.0,
            "gamma": g,
            # ‖G̃‖² = N_c + 2γD + γ²N_p: no extra pass over the gradient
            "grad_norm": math.sqrt(max(Nc + 2 * g * D + g * g * Np, 0.0)),
        }
    return cur
