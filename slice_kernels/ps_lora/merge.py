"""Magnitude merging of the sequential task updates into a PEFT model's base weights (SPEC §3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import HistoryError
from ..modules import canonical_name, lora_layers, weight_out_in
from ..ops.magnitude_merge import magnitude_merge


def merge_magnitude_into_base(peft_model, updates: dict) -> nn.Module:
    """Make every LoRA layer's base weight W_0 + merge(ΔW_1..ΔW_t) and unload the adapter.

    Each base weight holds W_0 + merge(ΔW_1..ΔW_{t−1}) and the adapter is not merged yet: the previous merge
    is removed by merging the negated earlier updates into W (|−x| = |x|, same winners), then the merge of all
    t updates is added. Both steps run in place, tile by tile from factors: no m×n buffer."""
    plan = []  # every layer is checked before any weight is written, so an error leaves the model as it was
    for name, mod, _ in lora_layers(peft_model):
        ups = updates.get(canonical_name(name))
        if not ups:
            raise HistoryError(
                f"merge_magnitude_into_base: no recorded update for layer {name!r}; call end_of_task before merge"
            )
        Wv = weight_out_in(mod.get_base_layer()).data
        for k, u in enumerate(ups):
            if (u["B"].shape[0], u["A"].shape[1]) != tuple(Wv.shape):
                raise HistoryError(
                    f"merge_magnitude_into_base: layer {name!r}: task {k}'s update is "
                    f"{u['B'].shape[0]}×{u['A'].shape[1]} but the weight is {Wv.shape[0]}×{Wv.shape[1]} "
                    f"(out, in); were the updates recorded from another model?"
                )
            # magnitude_merge refuses it too, but only when this layer's turn comes, after earlier layers are written
            if not math.isfinite(float(u["s"])):
                raise HistoryError(
                    f"merge_magnitude_into_base: layer {name!r}: task {k}'s update has scaling {u['s']}, not a finite "
                    f"number; nothing was merged. Record the updates again (end_of_task) from a finite LoRA scaling"
                )
        plan.append((Wv, ups))
    for Wv, ups in plan:
        with torch.no_grad():
            if len(ups) > 1:
                magnitude_merge([(-u["B"].to(Wv.device), u["A"].to(Wv.device), u["s"]) for u in ups[:-1]], into=Wv)
            magnitude_merge([(u["B"].to(Wv.device), u["A"].to(Wv.device), u["s"]) for u in ups], into=Wv)
    return peft_model.unload()
