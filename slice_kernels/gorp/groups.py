"""Parameter groups for ``GorpAdamW`` from a (PEFT) model and module-name patterns.

GORP's LLaMA setting (the reference's scripts_llama/run_llama.sh): LoRA on ``q_proj`` and ``v_proj`` (their A
matrices in ``lora_a`` groups, B in ``adamw``), and full-rank ``gate_proj`` weights unfrozen and trained in a
low-rank gradient subspace (``lowrank``) at their own, much smaller learning rate (1e-6 against LoRA's 2e-4).
``build_gorp_optimizer(model, full_rank=("gate_proj",), rank=8, lr=2e-4)`` builds exactly that: the full-rank
group's lr is ``full_rank_lr_ratio`` (default 1/200, the reference's 1e-6/2e-4) times ``lr``. A weight is
trained either full-rank or through a LoRA adapter, never both: a full-rank pattern that matches a
LoRA-adapted module is refused (``allow_lora_overlap=True`` trains both, as 0.1.0 did).

Names. Every parameter gets a stable name that keys its shared space and seeds its sketches. LoRA A is named
after its module, without PEFT's adapter name (``...q_proj.lora_A``), so a runner that creates a new adapter
per task (``task1``, ``task2``, …) still finds the space of the earlier tasks. A full-rank weight is named
``<module>.weight`` with PEFT's ``.base_layer`` removed, so it is the same name with or without a LoRA
wrapper on that module.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Sequence

from torch import nn

from ..errors import GorpGroupError
from ..modules import base_linears, lora_layers, matches
from .optimizer import GorpAdamW, is_positive_int

# The reference's LLaMA recipe: gate_proj at 1e-6 against LoRA's 2e-4 (scripts_llama/run_llama.sh:1)
REFERENCE_FULL_RANK_LR_RATIO = 1e-6 / 2e-4


def _check_lr(value, what: str, *, positive: bool) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        raise GorpGroupError(f"{what} must be a finite number {'> 0' if positive else '≥ 0'}, got {value!r}")
    return float(value)


def gorp_param_groups(
    model: nn.Module,
    *,
    full_rank: Sequence[str] = ("gate_proj",),
    lora_modules: Sequence[str] | None = None,
    rank: int = 8,
    unfreeze: bool = True,
    full_rank_lr: float | None = None,
    allow_lora_overlap: bool = False,
    lowrank_options: dict | None = None,
    lora_a_options: dict | None = None,
    adamw_options: dict | None = None,
) -> list[dict]:
    """Parameter groups for ``GorpAdamW``: [lowrank, lora_a, adamw] (empty groups left out).

    Args:
        model: a PEFT model (or any model; LoRA A matrices are found by PEFT's ``lora_A.<adapter>`` names).
        full_rank: module-name patterns of linears whose weights train full-rank in a rank-``rank`` gradient
            subspace (PEFT's convention: exact name, dotted suffix, or a regex over the whole name). Each
            pattern must match at least one linear. Their weights are unfrozen when ``unfreeze``.
        lora_modules: patterns restricting which LoRA A matrices get orthogonalized (default: all trainable).
            A pattern that matches no LoRA module is an error; the others' A go to the adamw group.
        rank: r of the low-rank groups; must be ≤ min(m, n) of every matched weight.
        full_rank_lr: learning rate of the ``lowrank`` group (None: the optimizer's ``lr``;
            ``build_gorp_optimizer`` sets it from ``full_rank_lr_ratio``). Same as ``lowrank_options={"lr": …}``;
            giving both is an error.
        allow_lora_overlap: let a full-rank pattern match a LoRA-adapted module (its base weight then trains
            full-rank beside the adapter). Default False: refused, as the reference never does it.
        *_options: per-group overrides (lr, scale, weight_decay, update_proj_gap, …).

    Raises GorpGroupError (before touching the model) for a pattern that matches nothing, r > min(m, n), or a
    full-rank module that carries a LoRA adapter.
    """
    if not is_positive_int(rank):  # int(2.7) would train rank 2 silently
        raise GorpGroupError(f"rank must be a positive integer, got {rank!r}; pass a whole number such as 8")
    if full_rank_lr is not None:
        full_rank_lr = _check_lr(full_rank_lr, "full_rank_lr", positive=False)
        if "lr" in (lowrank_options or {}):
            raise GorpGroupError(
                f"full_rank_lr={full_rank_lr} and lowrank_options={{'lr': {lowrank_options['lr']!r}}} both set the "
                f"full-rank group's learning rate; pass one of them"
            )
    linears = base_linears(model)
    chosen: dict[str, nn.Module] = {}
    for pat in full_rank:
        hits = [n for n in linears if matches(pat, n)]
        if not hits:
            sample = ", ".join(sorted(linears)[:6])
            raise GorpGroupError(
                f"full-rank pattern {pat!r} matches no linear module of the model (e.g. {sample}); use a module "
                f"name, a dotted suffix such as 'gate_proj', or a regex over the whole name"
            )
        for n in hits:
            chosen[n] = linears[n]
    for n, mod in chosen.items():
        if rank > min(mod.weight.shape):
            raise GorpGroupError(
                f"{n}.weight: rank {rank} is larger than the matrix allows (min(m, n) = {min(mod.weight.shape)} for "
                f"shape {tuple(mod.weight.shape)}); lower rank to at most {min(mod.weight.shape)}"
            )

    lora_a: list[tuple[str, nn.Parameter]] = []
    lora_names = {}  # id(A) -> (LoRA module name, A) for every trainable LoRA A
    adapted = set()
    for name, mod, ad in lora_layers(model):
        adapted.add(name)
        p = mod.lora_A[ad].weight
        if p.requires_grad:
            lora_names[id(p)] = (name, p)
    both = sorted(set(chosen) & adapted)
    if both and not allow_lora_overlap:
        pats = [pat for pat in full_rank if any(matches(pat, n) for n in both)]
        raise GorpGroupError(
            f"{both[0]}{f' (and {len(both) - 1} more)' if len(both) > 1 else ''} carries a LoRA adapter and is also "
            f"matched by the full-rank pattern(s) {pats}: GORP trains a weight either full-rank or through LoRA, "
            f"never both (the reference puts LoRA on q_proj/v_proj and trains gate_proj full-rank). Remove it from "
            f"the LoRA config's target_modules or from full_rank (allow_lora_overlap=True trains both)"
        )
    if lora_modules is not None:
        for pat in lora_modules:
            if not any(matches(pat, mod) for mod, _ in lora_names.values()):
                raise GorpGroupError(
                    f"LoRA pattern {pat!r} matches no module with a trainable LoRA A "
                    f"(have: {sorted({mod for mod, _ in lora_names.values()})[:6]}); check the adapter's target_modules"
                )
    full_ids = {id(mod.weight) for mod in chosen.values()}

    # all checks passed: now touch the model
    if unfreeze:
        for mod in chosen.values():
            mod.weight.requires_grad_(True)
    lowrank = [(f"{n}.weight", mod.weight) for n, mod in chosen.items()]
    seen = set(full_ids)
    for pid, (mod, p) in lora_names.items():
        if pid not in seen and (lora_modules is None or any(matches(pat, mod) for pat in lora_modules)):
            lora_a.append((f"{mod}.lora_A", p))
            seen.add(pid)
    rest = []
    for pname, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            rest.append((pname, p))
            seen.add(id(p))

    groups = []
    low_opts = {"rank": rank, **({} if full_rank_lr is None else {"lr": full_rank_lr}), **(lowrank_options or {})}
    for kind, items, opts in (
        ("lowrank", lowrank, low_opts),
        ("lora_a", lora_a, dict(lora_a_options or {})),
        ("adamw", rest, dict(adamw_options or {})),
    ):
        if items:
            groups.append({"kind": kind, "params": [p for _, p in items], "names": [n for n, _ in items], **opts})
    if not groups:
        raise GorpGroupError("the model has no trainable parameter and no full-rank pattern was given")
    return groups


def build_gorp_optimizer(
    model: nn.Module,
    *,
    full_rank=("gate_proj",),
    lora_modules=None,
    rank: int = 8,
    full_rank_lr: float | None = None,
    full_rank_lr_ratio: float = REFERENCE_FULL_RANK_LR_RATIO,
    allow_lora_overlap: bool = False,
    shared_spaces=None,
    lowrank_options=None,
    lora_a_options=None,
    adamw_options=None,
    **defaults,
) -> GorpAdamW:
    """``GorpAdamW(gorp_param_groups(model, ...), **defaults)``; ``shared_spaces`` from an earlier task's optimizer.

    The full-rank (``lowrank``) group trains at its own learning rate: ``full_rank_lr`` when given, else
    ``full_rank_lr_ratio × lr`` (``lr`` from ``defaults``, GorpAdamW's default when absent). The default ratio is
    the reference's, 1e-6 / 2e-4 = 1/200; ``full_rank_lr_ratio=1.0`` trains every group at ``lr`` (the behaviour
    before the option). ``lowrank_options={"lr": …}`` overrides the ratio too.
    """
    ratio = _check_lr(full_rank_lr_ratio, "full_rank_lr_ratio", positive=True)  # checked even when overridden
    if full_rank_lr is None and "lr" not in (lowrank_options or {}):
        lr = defaults.get("lr", inspect.signature(GorpAdamW).parameters["lr"].default)
        full_rank_lr = ratio * _check_lr(lr, "lr", positive=False)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    groups = gorp_param_groups(
        model,
        full_rank=full_rank,
        lora_modules=lora_modules,
        rank=rank,
        full_rank_lr=full_rank_lr,
        allow_lora_overlap=allow_lora_overlap,
        lowrank_options=lowrank_options,
        lora_a_options=lora_a_options,
        adamw_options=adamw_options,
    )
    try:
        return GorpAdamW(groups, rank=rank, shared_spaces=shared_spaces, **defaults)
    except Exception:
        for p in frozen:  # leave the model as it was
            p.requires_grad_(False)
        raise


__all__ = ["REFERENCE_FULL_RANK_LR_RATIO", "gorp_param_groups", "build_gorp_optimizer"]
