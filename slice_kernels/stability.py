"""PS-LoRA training integration: the model-level stability loss, a Trainer mixin, and the runner methods.

* ``ParameterStabilityLoss(history, lam=..., ...)``: an ``nn.Module`` whose ``forward(model)`` walks a PEFT
  model's active LoRA layers and returns L_s = λ·Σ_ℓ (L_dir,ℓ + β·L_mag,ℓ) (SPEC §3) through the fused
  ``sign_consistency_loss``; 0 when the history is empty (t = 1). Plain loop: ``loss = task + psl(model)``.
* ``StabilityLossMixin``: a ``transformers.Trainer`` mixin overriding ``compute_loss`` (a ``TrainerCallback``
  cannot change the loss): ``class MyTrainer(StabilityLossMixin, Trainer)`` and set
  ``trainer.stability_loss = psl``. ``PSLoRATrainer`` is that class over ``transformers.Trainer``.
* Runner methods ``ps_lora`` (vanilla LoRA init + stability loss + magnitude merge of all task updates) and
  ``slice+ps`` (SLICE init + stability loss, plain merge), registered in ``slice_kernels.runner.methods``.

An adapter initialized with a non-zero product (SLICE absorbs s·B₀·A₀ into W) updates W by
s·(B·A − B₀·A₀), not s·B·A: pass ``init_offsets={name: (B₀, A₀)}`` and the loss penalizes that update,
as the rank-2r factors [B, −B₀]·[A; A₀] (still no m×n tensor).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .history import History, HistoryStore, lora_factors, lora_layers
from .ops.magnitude_merge import magnitude_merge
from .ops.sign_loss import DEFAULT_BETA, MODES, sign_consistency_loss

log = logging.getLogger("slice_kernels")


def _canonical(name: str) -> str:
    """Layer names without the wrappers DDP/DataParallel put in front ("module.")."""
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def effective_factors(B, A, offset=None):
    """Factors of the update the adapter makes to W: (B, A), or ([B, −B₀], [A; A₀]) when s·B₀·A₀ was absorbed
    into W at init."""
    if offset is None:
        return B, A
    B0, A0 = offset
    return torch.cat([B, -B0.to(B)], dim=1), torch.cat([A, A0.to(A)], dim=0)


class ParameterStabilityLoss(nn.Module):
    """L_s = λ·Σ_ℓ (L_dir,ℓ + β·L_mag,ℓ) over the LoRA layers of a PEFT model (SPEC §3).

    ``history``: a ``HistoryStore`` or ``{layer name: History}`` (names from ``model.named_modules()``; a
    layer with no history contributes 0). ``lam`` = λ, ``alpha`` = α (α_ℓ = α/rms(H_ℓ)), ``beta`` = β,
    ``mode`` "tanh" | "hinge". ``init_offsets``: ``{name: (B₀, A₀)}`` of inits absorbed into W (see module doc).
    """

    def __init__(self, history: HistoryStore | dict | None, *, lam: float = 1.0, alpha: float = 1.0,
                 beta: float = DEFAULT_BETA, mode: str = "tanh", init_offsets: dict | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ParameterStabilityLoss: mode must be one of {tuple(MODES)}, got {mode!r}")
        if lam < 0 or beta < 0 or alpha <= 0:
            raise ValueError(f"ParameterStabilityLoss: need lam ≥ 0, beta ≥ 0, alpha > 0 (got lam={lam}, "
                             f"beta={beta}, alpha={alpha})")
        layers = history.layers if isinstance(history, HistoryStore) else dict(history or {})
        self.layers: dict[str, History] = {_canonical(k): v for k, v in layers.items()}
        self.offsets = {_canonical(k): v for k, v in (init_offsets or {}).items()}
        self.lam, self.alpha, self.beta, self.mode = float(lam), float(alpha), float(beta), mode
        self._checked = False

    @property
    def active(self) -> bool:
        return self.lam > 0 and any(h.rms > 0 for h in self.layers.values())

    def forward(self, model: nn.Module) -> torch.Tensor:
        found = [(_canonical(n), mod, ad) for n, mod, ad in lora_layers(model)]
        if not self._checked and self.layers:
            names = {n for n, _, _ in found}
            missing = sorted(set(self.layers) - names)
            if missing and len(missing) == len(self.layers):
                raise ValueError(
                    f"ParameterStabilityLoss: none of the {len(self.layers)} history layers is a LoRA layer of "
                    f"this model (e.g. {missing[0]!r}; the model has {sorted(names)[:3]}...). Record the "
                    f"history from a PEFT model wrapped the same way (HistoryStore.record_task(peft_model))."
                )
            if missing:
                log.warning("ParameterStabilityLoss: %d history layers are not LoRA layers of the model "
                            "(ignored), e.g. %s", len(missing), missing[0])
            self._checked = True
        total = None
        for name, mod, ad in found:
            h = self.layers.get(name)
            if h is None or h.rms == 0.0:
                continue
            B, A, s = lora_factors(mod, ad)
            if h.device != A.device:
                h = self.layers[name] = h.to(A.device)
            if (B.shape[0], A.shape[1]) != tuple(h.shape):  # name the layer: the op itself cannot
                raise ValueError(f"ParameterStabilityLoss: layer {name!r} makes a {B.shape[0]}×{A.shape[1]} update "
                                 f"but its history is {h.shape[0]}×{h.shape[1]}: the history was recorded from "
                                 f"another model")
            B, A = effective_factors(B, A, self.offsets.get(name))
            term = sign_consistency_loss(A, B, h, scaling=s, alpha=self.alpha, beta=self.beta, mode=self.mode)
            total = term if total is None else total + term
        if total is None or self.lam == 0.0:
            p = next(model.parameters())
            return torch.zeros((), device=p.device, dtype=torch.float32)
        return self.lam * total


class StabilityLossMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it in the bases) to add ``self.stability_loss``
    (a ``ParameterStabilityLoss``, or None for none) to the task loss in ``compute_loss``."""

    stability_loss: ParameterStabilityLoss | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if self.stability_loss is None:
            return out
        share = self._stability_share(model, num_items_in_batch)
        if return_outputs:
            loss, outputs = out
            return loss + share * self.stability_loss(model).to(loss.dtype), outputs
        return out + share * self.stability_loss(model).to(out.dtype)

    def _stability_share(self, model, num_items_in_batch) -> float:
        """The part of L_s this micro-batch carries, so L_s counts once per optimizer step.

        compute_loss runs once per micro-batch. The Trainer divides that loss by the accumulation steps only
        when it was not already normalized by ``num_items_in_batch`` (the rule of ``Trainer.training_step``);
        in the other case the task loss is a share of the accumulated batch's mean, but an added L_s would
        count once per micro-batch, i.e. λ·gradient_accumulation_steps. Divide it here in that case."""
        if not getattr(model, "training", False):
            return 1.0  # evaluation: L_s once per batch
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None) \
                or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            return 1.0  # the Trainer divides the whole loss, L_s included
        args = getattr(self, "args", None)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or getattr(
            args, "gradient_accumulation_steps", 1)
        return 1.0 / max(1, int(steps))


def __getattr__(name):
    if name == "PSLoRATrainer":  # built on first use so importing this module does not import Trainer
        from transformers import Trainer

        cls = type("PSLoRATrainer", (StabilityLossMixin, Trainer), {
            "__doc__": "transformers.Trainer with the PS-LoRA stability loss: set ``trainer.stability_loss``.",
            "__module__": __name__,
        })
        globals()["PSLoRATrainer"] = cls
        return cls
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------- runner
def history_from_updates(updates: dict, kind: str = "factors") -> HistoryStore:
    """``{layer: [{"B", "A", "s"}, ...]}`` (task order) → a ``HistoryStore`` of the requested form."""
    layers = {}
    for name, ups in updates.items():
        if not ups:
            continue
        h = History.from_factors([u["B"] for u in ups], [u["A"] for u in ups], [u["s"] for u in ups])
        if kind == "dense":
            h = History.from_dense(h.to_dense())
        elif kind == "bits":
            h = h.to_sign_bits()
        layers[name] = h
    return HistoryStore(kind, layers, tasks=max((len(u) for u in updates.values()), default=0))


def merge_magnitude_into_base(peft_model, updates: dict) -> nn.Module:
    """Make every LoRA layer's base weight W_0 + merge(ΔW_1..ΔW_t) and unload the adapter.

    Each base weight holds W_0 + merge(ΔW_1..ΔW_{t−1}) and the adapter is not merged yet: the previous merge
    is removed by merging the negated earlier updates into W (|−x| = |x|, same winners), then the merge of all
    t updates is added. Both steps run in place, tile by tile from factors: no m×n buffer."""
    plan = []  # every layer is checked before any weight is written, so an error leaves the model as it was
    for name, mod, ad in lora_layers(peft_model):
        ups = updates.get(_canonical(name))
        if not ups:
            raise ValueError(f"merge_magnitude_into_base: no recorded update for layer {name!r}; call "
                             f"end_of_task before merge")
        W = mod.get_base_layer().weight
        Wv = W.data.T if getattr(mod, "fan_in_fan_out", False) else W.data  # (out, in) view
        for k, u in enumerate(ups):
            if (u["B"].shape[0], u["A"].shape[1]) != tuple(Wv.shape):
                raise ValueError(f"merge_magnitude_into_base: layer {name!r}: task {k}'s update is "
                                 f"{u['B'].shape[0]}×{u['A'].shape[1]} but the weight is {Wv.shape[0]}×{Wv.shape[1]} "
                                 f"(out, in); were the updates recorded from another model?")
        plan.append((Wv, ups))
    for Wv, ups in plan:
        with torch.no_grad():
            if len(ups) > 1:
                magnitude_merge([(-u["B"].to(Wv.device), u["A"].to(Wv.device), u["s"]) for u in ups[:-1]], into=Wv)
            magnitude_merge([(u["B"].to(Wv.device), u["A"].to(Wv.device), u["s"]) for u in ups], into=Wv)
    return peft_model.unload()


def _register_runner_methods():
    from .runner.init_methods import InitMethod
    from .runner.methods import register

    class PSMethod(InitMethod):
        """LoRA/SLICE init + the stability loss against all earlier tasks; ``ps_lora`` also merges by
        magnitude. Options (run config): ps_lambda (1.0), ps_alpha (1.0), ps_beta (0.1), ps_mode ("tanh"),
        ps_history ("factors" | "dense" | "bits")."""

        init = "lora"
        magnitude = True

        def init_adapter(self, ctx):
            peft_model, report = super().init_adapter(ctx)
            o = ctx.options
            updates = ctx.state.setdefault("updates", {})
            hist = history_from_updates(updates, o.get("ps_history", "factors"))
            offsets = {}
            for name, mod, ad in lora_layers(peft_model):
                B, A, _ = lora_factors(mod, ad)
                if bool(B.detach().abs().max() > 0):  # an init absorbed into W (SLICE); vanilla LoRA has B = 0
                    offsets[_canonical(name)] = (B.detach().clone(), A.detach().clone())
            self.offsets = offsets
            self.loss = ParameterStabilityLoss(
                hist, lam=float(o.get("ps_lambda", 1.0)), alpha=float(o.get("ps_alpha", 1.0)),
                beta=float(o.get("ps_beta", DEFAULT_BETA)), mode=o.get("ps_mode", "tanh"), init_offsets=offsets,
            )
            report.update({"ps_history_layers": len(hist), "ps_history_form": hist.kind})
            return peft_model, report

        def extra_loss(self, ctx, peft_model, batch):
            return self.loss(peft_model) if self.loss.active else None

        def end_of_task(self, ctx, peft_model):
            updates = ctx.state.setdefault("updates", {})
            for name, mod, ad in lora_layers(peft_model):
                name = _canonical(name)
                B, A, s = lora_factors(mod, ad)
                B, A = effective_factors(B.detach(), A.detach(), self.offsets.get(name))
                updates.setdefault(name, []).append({"B": B.float().cpu().clone(), "A": A.float().cpu().clone(),
                                                     "s": float(s)})

        def merge(self, ctx, peft_model):
            if not self.magnitude:
                return super().merge(ctx, peft_model)
            return merge_magnitude_into_base(peft_model, ctx.state["updates"])

    def _factory(init: str, magnitude: bool):
        def make():
            m = PSMethod()
            m.init, m.magnitude = init, magnitude
            return m

        return make

    register("ps_lora", _factory("lora", True), overwrite=True)
    register("slice+ps", _factory("slice", False), overwrite=True)


try:
    _register_runner_methods()
except ImportError as exc:  # a package without the runner still has the loss and the mixin
    log.info("slice_kernels.stability: runner methods not registered (%s)", exc)
