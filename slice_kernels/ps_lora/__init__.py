"""PS-LoRA (SPEC §3): the history of earlier task updates, the sign-consistency (parameter stability) loss of
one layer and of a whole PEFT model, its Trainer integration, and magnitude merging of the task updates."""

from .history import KINDS, History, HistoryStore, gram_sq_norm, history_from_updates
from .loss import (
    DEFAULT_BETA,
    ParameterStabilityLoss,
    effective_factors,
    reference_sign_consistency_loss,
    sign_consistency_loss,
)
from .merge import merge_magnitude_into_base
from .trainer import StabilityLossMixin


def __getattr__(name):
    if name == "PSLoRATrainer":  # transformers.Trainer is imported on first use only
        from . import trainer

        return trainer.PSLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KINDS",
    "History",
    "HistoryStore",
    "gram_sq_norm",
    "history_from_updates",
    "DEFAULT_BETA",
    "ParameterStabilityLoss",
    "effective_factors",
    "sign_consistency_loss",
    "reference_sign_consistency_loss",
    "merge_magnitude_into_base",
    "StabilityLossMixin",
    "PSLoRATrainer",
]
