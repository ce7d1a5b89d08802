"""The runner's PS-LoRA methods (SPEC §3): ``ps_lora`` (vanilla LoRA init + the stability loss against all
earlier tasks + magnitude merge of all task updates, W = W₀ + merge(ΔW₁..ΔW_t)) and ``slice+ps`` (SLICE init
+ the stability loss, plain merge)."""

from __future__ import annotations

from ...modules import canonical_name, lora_factors, lora_layers
from ...ops.sign_loss import MODES
from ...ps_lora import (
    DEFAULT_BETA,
    ParameterStabilityLoss,
    effective_factors,
    history_from_updates,
    merge_magnitude_into_base,
)
from ...ps_lora.history import KINDS as HISTORY_KINDS
from .base import Option, number, one_of, register
from .init_methods import InitMethod


class PSMethod(InitMethod):
    """LoRA (or SLICE) init + the stability loss; ``magnitude`` selects the magnitude merge."""

    init = "lora"
    magnitude = True
    options = {
        "ps_lambda": Option(1.0, number(minimum=0), "PS-LoRA: λ, weight of the stability loss"),
        "ps_alpha": Option(1.0, number(above=0), "PS-LoRA: α, tanh sharpness α/rms(H)"),
        "ps_beta": Option(DEFAULT_BETA, number(minimum=0), "PS-LoRA: β, weight of the magnitude term"),
        "ps_mode": Option("tanh", one_of(*MODES), "PS-LoRA: 'tanh' or 'hinge'"),
        "ps_history": Option("factors", one_of(*HISTORY_KINDS), "PS-LoRA: history form 'factors', 'dense' or 'bits'"),
    }

    def init_adapter(self, ctx):
        peft_model, report = super().init_adapter(ctx)
        updates = ctx.state.setdefault("updates", {})
        hist = history_from_updates(updates, self.option(ctx, "ps_history"))
        offsets = {}
        for name, mod, ad in lora_layers(peft_model):
            B, A, _ = lora_factors(mod, ad)
            if bool(B.detach().abs().max() > 0):  # an init absorbed into W (SLICE); vanilla LoRA has B = 0
                offsets[canonical_name(name)] = (B.detach().clone(), A.detach().clone())
        self.offsets = offsets
        self.loss = ParameterStabilityLoss(
            hist,
            lam=self.option(ctx, "ps_lambda"),
            alpha=self.option(ctx, "ps_alpha"),
            beta=self.option(ctx, "ps_beta"),
            mode=self.option(ctx, "ps_mode"),
            init_offsets=offsets,
        )
        report.update({"ps_history_layers": len(hist), "ps_history_form": hist.kind})
        return peft_model, report

    def extra_loss(self, ctx, peft_model, batch):
        return self.loss(peft_model) if self.loss.active else None

    def end_of_task(self, ctx, peft_model):
        updates = ctx.state.setdefault("updates", {})
        for name, mod, ad in lora_layers(peft_model):
            name = canonical_name(name)
            B, A, s = lora_factors(mod, ad)
            B, A = effective_factors(B.detach(), A.detach(), self.offsets.get(name))
            updates.setdefault(name, []).append(
                {"B": B.float().cpu().clone(), "A": A.float().cpu().clone(), "s": float(s)}
            )

    def merge(self, ctx, peft_model):
        if not self.magnitude:
            return super().merge(ctx, peft_model)
        return merge_magnitude_into_base(peft_model, ctx.state["updates"])


class SlicePSMethod(PSMethod):
    init = "slice"
    magnitude = False


register("ps_lora", PSMethod, overwrite=True)  # overwrite: importlib.reload re-registers
register("slice+ps", SlicePSMethod, overwrite=True)
