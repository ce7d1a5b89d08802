"""Conflict statistics and the conflict-gated projection of SPEC §1 steps 3–4, over every target layer, with the
surgery variants of the authors' code (RamiroNB/slice, cl_lora/slice/projections.py and gradients.py).

Every variant is a per-layer linear combination G̃_ℓ = a_ℓ·G_cur,ℓ + b_ℓ·G_prev,ℓ, built from the
statistics (D, N_p, N_c) of each layer and applied in place by the fused ``surgery`` op:

* projection (``grad_project=True``, the paper's): b = γ_ℓ = −c·D/(N_p + ε) where the gate is open (cos < τ;
  always with ``grad_project_always``; cos_ℓ < median − delta with ``per_layer_threshold``), else 0;
  ``magnitude_preserve`` then multiplies a projected layer by a_ℓ = ‖G_cur,ℓ‖ / ‖G_cur,ℓ + γ_ℓ·G_prev,ℓ‖,
  and ``add_retain_grad`` adds 1·G_prev,ℓ on every layer;
* plain difference (``grad_project=False``): a = 1, b = −λ (``retain_scale``) for every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import distributed
from ..errors import NonFiniteGradientError
from ..ops import conflict
from .config import SliceConfig
from .finite import all_finite
from .report import InitReport, timed_phase


@dataclass
class SurgeryPlan:
    """What the surgery does to each layer: its projection coefficient γ_ℓ (−λ for the plain difference), whether
    the gate let the projection act, its threshold τ_ℓ (None where no gate applies), the global (γ, cos) (None with
    per-module scope or without a replay gradient) and the variant's description for the report."""

    gammas: torch.Tensor  # float64 (L,)
    projected: list
    taus: list
    glob: tuple | None
    variant: dict


def variant_name(config: SliceConfig) -> str:
    """A short label of the configured surgery, e.g. ``pcgrad``, ``pcgrad+always+add_retain_grad``,
    ``difference(retain_scale=0.5)``."""
    if not config.grad_project:
        parts = [f"difference(retain_scale={config.retain_scale:g})"]
    else:
        parts = ["pcgrad"]
        if config.grad_project_always:
            parts.append("always")
        if config.per_layer_threshold:
            parts.append("per_layer_median")
        if config.magnitude_preserve:
            parts.append("magnitude_preserve")
        if config.add_retain_grad:
            parts.append("add_retain_grad")
    if config.single_retain_task_mode:
        parts.append("single_retain_task")
    return "+".join(parts)


def describe_variant(config: SliceConfig, applied: bool) -> dict:
    """The report's account of the surgery: ``applied`` is False when no replay gradient took part (task 1, or a
    method that reads none: its ``name`` is then "none"); the other entries say what was (or would have been)
    run."""
    projecting = config.grad_project
    if not config.uses_replay:
        return {
            "name": "none",
            "applied": False,
            "surgery": "none",
            "gate": None,
            "tau": None,
            "median_cos": None,
            "per_layer_threshold_delta": None,
            "strength": None,
            "retain_scale": None,
            "scope": None,
            "magnitude_preserve": False,
            "add_retain_grad": False,
            "replay_tasks": None,
            "replay_steps": None,
            "replay_batch_size": None,
            "direction": _direction(config),
        }
    if not projecting:
        gate = None
    elif config.grad_project_always:
        gate = "always"
    elif config.per_layer_threshold:
        gate = "per_layer_median"
    else:
        gate = "cos<tau"
    return {
        "name": variant_name(config),
        "applied": bool(applied),
        "surgery": "pcgrad" if projecting else "difference",
        "gate": gate,
        "tau": config.conflict_threshold if gate == "cos<tau" else None,
        "median_cos": None,
        "per_layer_threshold_delta": config.per_layer_threshold_delta if config.per_layer_threshold else None,
        "strength": config.projection_strength if projecting else None,
        "retain_scale": None if projecting else config.retain_scale,
        "scope": config.projection_scope,
        "magnitude_preserve": config.magnitude_preserve,
        "add_retain_grad": config.add_retain_grad,
        "replay_tasks": "last" if config.single_retain_task_mode else "all",
        "replay_steps": config.effective_replay_steps,
        "replay_batch_size": config.retain_batch_size,
        "direction": _direction(config),
    }


def _direction(config: SliceConfig) -> str | None:
    if not config.uses_gradients:
        return None  # lora, loram: no SVD
    return config.peft_direction if config.method == "lora_ga_peft" else config.direction


def _cos(D: float, Np: float, Nc: float) -> float:
    denom = math.sqrt(Np * Nc)
    return D / denom if denom > 0 else 0.0


def plan_surgery(stats: torch.Tensor, config: SliceConfig, has_prev: bool) -> SurgeryPlan:
    """The per-layer coefficients of SPEC §1 step 4 and of the configured variant, from the (L, 3) statistics."""
    L = stats.shape[0]
    applied = has_prev and config.uses_replay
    variant = describe_variant(config, applied)
    if not applied:
        return SurgeryPlan(torch.zeros(L, dtype=torch.float64), [False] * L, [None] * L, None, variant)
    s = stats.cpu()
    rows = [tuple(float(v) for v in s[i]) for i in range(L)]
    c, eps = config.projection_strength, config.eps

    def coef(D, Np):
        # N_p + ε = 0 (a zero replay gradient with eps=0, gated on by τ > 0): then D = 0 too and there is
        # nothing to project out; γ = 0 instead of 0/0
        return -c * D / (Np + eps) if Np + eps > 0 else 0.0

    D_t, Np_t, Nc_t = (float(v) for v in s.sum(0))
    if not config.grad_project:  # the reference's plain difference G_cur − λ·G_prev (gradients.combine_grads)
        lam = -config.retain_scale
        return SurgeryPlan(
            torch.full((L,), lam, dtype=torch.float64), [False] * L, [None] * L, (lam, _cos(D_t, Np_t, Nc_t)), variant
        )
    always = config.grad_project_always
    if config.projection_scope == "global":
        cos = _cos(D_t, Np_t, Nc_t)
        tau = None if always else config.conflict_threshold
        on = always or cos < tau
        gamma = coef(D_t, Np_t) if on else 0.0
        return SurgeryPlan(torch.full((L,), gamma, dtype=torch.float64), [on] * L, [tau] * L, (gamma, cos), variant)
    cos_l = [_cos(*row) for row in rows]
    if always:
        taus = [None] * L
    elif config.per_layer_threshold:
        # the reference's gate (projections._decide_cosine_thresholds): the upper median of the layers' cosines
        median = sorted(cos_l)[L // 2]
        tau = median - config.per_layer_threshold_delta
        variant["median_cos"], variant["tau"] = median, tau
        taus = [tau] * L
    else:
        taus = [config.conflict_threshold] * L
    on_l = [always or cos_l[i] < taus[i] for i in range(L)]
    gam = [coef(rows[i][0], rows[i][1]) if on_l[i] else 0.0 for i in range(L)]
    return SurgeryPlan(torch.tensor(gam, dtype=torch.float64), on_l, taus, None, variant)


def gammas_from_stats(stats: torch.Tensor, config: SliceConfig, has_prev: bool):
    """Per-layer γ (float64, (L,)) and the global (γ, cos) — None with per-module scope (SPEC §1 step 4)."""
    plan = plan_surgery(stats, config, has_prev)
    return plan.gammas, plan.glob


def _overflow(name, what, gamma, Np, dtype, config: SliceConfig):
    fix = "raise SliceConfig.eps" if config.grad_project else "lower SliceConfig.retain_scale"
    return NonFiniteGradientError(
        name,
        f"surgery result G̃ = {what} (γ = {gamma:.3e}{' overflows ' + str(dtype) if dtype else ''}; N_p of the "
        f"replay gradient is {Np:.3e}: {fix})",
    )


def _summed(stats: torch.Tensor, sharded: bool) -> torch.Tensor:
    # sharded gradients: each rank's statistics are partial sums over its shard; one all-reduce makes them global
    return distributed.all_reduce_sum_(stats) if sharded else stats


def reconcile(names, cur, prev, config: SliceConfig, report: InitReport, device, *, inplace: bool, sharded=False):
    """G̃ of every layer (``prev`` None: G̃ = G_cur), per the configured variant. Fills the report's global and
    per-layer figures and returns the list of G̃ (``cur`` itself when nothing is changed or ``inplace``).
    Every layer is checked before any buffer is written. ``sharded``: ``cur`` and ``prev`` are this rank's shards
    of each layer (collective: the statistics are summed over the ranks, the checks agreed by every rank)."""
    has_prev = prev is not None
    with timed_phase(report, "statistics", device):
        report.backends["conflict_stats"] = conflict.CONFLICT_STATS.select(cur[0].device)[0]
        stats = _summed(conflict.conflict_stats(cur, prev), sharded).cpu()
    for i, n in enumerate(names):
        if not math.isfinite(float(stats[i, 2])):
            raise NonFiniteGradientError(n, "current-task gradient (g_cur)")
        if has_prev and not (math.isfinite(float(stats[i, 1])) and math.isfinite(float(stats[i, 0]))):
            raise NonFiniteGradientError(n, "replay gradient (g_prev)")
    plan = plan_surgery(stats, config, has_prev)
    gammas, glob = plan.gammas, plan.glob
    report.variant = plan.variant
    tot = stats.sum(0)
    report.D, report.Np, report.Nc = float(tot[0]), float(tot[1]), float(tot[2])
    if glob is not None:
        report.gamma, report.cos = glob
    elif not has_prev:
        report.gamma, report.cos = 0.0, None
    applied = has_prev and config.uses_replay
    add = 1.0 if (applied and config.grad_project and config.add_retain_grad) else 0.0
    rescale = applied and config.grad_project and config.magnitude_preserve
    if has_prev:
        # finite inputs can still overflow when N_p is tiny and γ huge: refuse before touching anything
        fmax = max(float(torch.finfo(c.dtype).max) for c in cur)
        for i, n in enumerate(names):
            if not abs(float(gammas[i])) < fmax:
                raise _overflow(n, "G_cur + γ·G_prev", float(gammas[i]), float(stats[i, 1]), cur[i].dtype, config)
    L = len(names)
    scales = [1.0] * L
    measured = None  # ‖G̃_ℓ‖² measured after the surgery, when the closed form does not apply
    with timed_phase(report, "surgery", device):
        project = has_prev and bool((gammas != 0).any())
        if project or add:
            if not inplace:
                cur = [c.clone() for c in cur]
            report.backends["surgery"] = conflict.SURGERY.select(cur[0].device)[0]
        if project:
            conflict.surgery_(cur, prev, gammas)
        if rescale:
            # ‖G_cur,ℓ + γ_ℓ·G_prev,ℓ‖ measured on the result (the closed form N_c + 2γD + γ²N_p cancels
            # catastrophically when G_cur is nearly parallel to G_prev); the reference's per-layer rescale
            # (a layer whose γ is 0 is G_cur itself: its factor is 1)
            norms2 = _summed(conflict.conflict_stats(cur, None), sharded)[:, 2].cpu() if project else None
            for i in range(L):
                if not (plan.projected[i] and float(gammas[i]) != 0.0):
                    continue
                nrm = math.sqrt(max(float(norms2[i]), 0.0))
                if nrm > 0.0 and nrm >= config.eps:  # the reference keeps a G̃ of norm below ε as it is
                    scales[i] = math.sqrt(float(stats[i, 2])) / nrm
                    cur[i].mul_(scales[i])
        if add:
            conflict.surgery_(cur, prev, torch.full((L,), add, dtype=torch.float64))
        changed = [i for i in range(L) if float(gammas[i]) != 0.0 or scales[i] != 1.0 or add]
        # a representable γ can still overflow the product γ·G_prev in some entry: check G̃ itself
        bad = next((i for i in changed if not all_finite(cur[i])), None)
        err = None
        if bad is not None:
            err = _overflow(
                names[bad], "a·(G_cur + γ·G_prev) + b·G_prev", float(gammas[bad]), float(stats[bad, 1]), None, config
            )
        if sharded:  # an overflow in one rank's shard stops every rank
            distributed.agree(err, "the surgery")
        elif err is not None:
            raise err
        if rescale or add:
            measured = _summed(conflict.conflict_stats(cur, None), sharded)[:, 2].cpu()
    for i, n in enumerate(names):
        D, Np, Nc = (float(v) for v in stats[i])
        g = float(gammas[i])
        if measured is not None:
            gn = math.sqrt(max(float(measured[i]), 0.0))
        else:  # ‖G̃‖² = N_c + 2γD + γ²N_p: no extra pass over the gradient
            gn = math.sqrt(max(Nc + 2 * g * D + g * g * Np, 0.0))
        report.layers[n] = {
            "shape": list(cur[i].shape),
            "D": D,
            "Np": Np,
            "Nc": Nc,
            "cos": _cos(D, Np, Nc),
            "gamma": g,
            "grad_norm": gn,
            "projected": bool(plan.projected[i]),
            "tau": plan.taus[i],
            # G̃ = cur_coef·G_cur + prev_coef·G_prev
            "cur_coef": scales[i],
            "prev_coef": scales[i] * g + add,
        }
    return cur
