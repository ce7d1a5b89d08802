"""PS-LoRA inside a ``transformers.Trainer``: a ``TrainerCallback`` cannot change the loss, so the stability loss
is added by a ``compute_loss`` mixin. ``class MyTrainer(StabilityLossMixin, Trainer)`` and set
``trainer.stability_loss = ParameterStabilityLoss(...)``; ``PSLoRATrainer`` is that class over
``transformers.Trainer`` (built on first use, so importing this module does not import the Trainer).
"""

from __future__ import annotations

from .loss import ParameterStabilityLoss


class StabilityLossMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it in the bases) to add ``self.stability_loss``
    (a ``ParameterStabilityLoss``, or None for none) to the task loss in ``compute_loss``."""

    stability_loss: ParameterStabilityLoss | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
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
            scaled = (
                bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            return 1.0  # the Trainer divides the whole loss, L_s included
        args = getattr(self, "args", None)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or getattr(
            args, "gradient_accumulation_steps", 1
        )
        return 1.0 / max(1, int(steps))


def __getattr__(name):
    if name == "PSLoRATrainer":  # built on first use so importing this module does not import Trainer
        from transformers import Trainer

        cls = type(
            "PSLoRATrainer",
            (StabilityLossMixin, Trainer),
            {
                "__doc__": "transformers.Trainer with the PS-LoRA stability loss: set ``trainer.stability_loss``.",
                "__module__": __name__,
            },
        )
        globals()["PSLoRATrainer"] = cls
        return cls
    raise AttributeError(name)
