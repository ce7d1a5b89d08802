"""Parameter groups for ``GorpAdamW`` from a (PEFT) model and module-name patterns.

GORP's LLaMA setting: LoRA on the attention projections (their A matrices in ``lora_a`` groups, B in
``adamw``), and full-rank ``gate_proj`` weights unfrozen and trained in a low-rank gradient subspace
(``lowrank``). ``gorp_param_groups(model, full_rank=("gate_proj",), rank=...)`` builds exactly that.

Names. Every parameter gets a stable name that keys its shared space and seeds its sketches. LoRA A is named
after its module, without PEFT's adapter name (``...q_proj.lora_A``), so a runner that creates a new adapter
per task (``task1``, ``task2``, …) still finds the space of the earlier tasks. A full-rank weight is named
``<module>.weight`` with PEFT's ``.base_layer`` removed, so it is the same name with or without a LoRA
wrapper on that module.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..errors import GorpGroupError
from ..modules import base_linears, lora_layers, matches
from .optimizer import GorpAdamW, is_positive_int


def gorp_param_groups(
    model: nn.Module,
    *,
    full_rank: Sequence[str] = ("gate_proj",),
    lora_modules: Sequence[str] | None = None,
    rank: int = 8,
    unfreeze: bool = True,
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
        *_options: per-group overrides (lr, scale, weight_decay, update_proj_gap, …).

    Raises GorpGroupError (before touching the model) for a pattern that matches nothing or r > min(m, n).
    """
    if not is_positive_int(rank):  # int(2.7) would train rank 2 silently
        raise GorpGroupError(f"rank must be a positive integer, got {rank!r}; pass a whole number such as 8")
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
    for name, mod, ad in lora_layers(model):
        p = mod.lora_A[ad].weight
        if p.requires_grad:
            lora_names[id(p)] = (name, p)
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
    for kind, items, opts in (
        ("lowrank", lowrank, {"rank": rank, **(lowrank_options or {})}),
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
    shared_spaces=None,
    lowrank_options=None,
    lora_a_options=None,
    adamw_options=None,
    **defaults,
) -> GorpAdamW:
    """``GorpAdamW(gorp_param_groups(model, ...), **defaults)``; ``shared_spaces`` from an earlier task's optimizer."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    groups = gorp_param_groups(
        model,
        full_rank=full_rank,
        lora_modules=lora_modules,
        rank=rank,
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


__all__ = ["gorp_param_groups", "build_gorp_optimizer"]
