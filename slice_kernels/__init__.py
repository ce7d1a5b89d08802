"""slice-kernels: fast, less forgetful continual LoRA fine-tuning (SLICE, PS-LoRA, GORP)."""
from __future__ import annotations

from . import dispatch
from .config import SliceConfig, SliceConfigError
from .errors import NonFiniteGradientError, SliceInitError
from .init import InitReport, InitResult, init_from_gradients, lora_scaling
from .collect import collect_gradients, collect_replay_gradients
from .peft_integration import get_slice_model, save_as_lora, save_initial_adapter
from .ops import conflict as _conflict  # noqa: F401  (registers ops)
from .ops import grad_accum as _grad_accum  # noqa: F401
from .ops import rsvd as _rsvd  # noqa: F401
from .ops import gorp_update as _gorp_update  # noqa: F401
# GORP (issue 6): slice_kernels.gorp registers the runner's `gorp` method, which imports the runner, so it is
# loaded on first use of its names (the __getattr__ below), after this package has finished initializing.
_LAZY_GORP = {"GorpAdamW": "gorp", "GorpGroupError": "gorp", "gorp_param_groups": "gorp_groups",
              "build_gorp_optimizer": "gorp_groups"}
# PS-LoRA (issue 5). The stability module registers the runner methods, which imports the runner: it is
# loaded on first use of its names (PEP 562 __getattr__ below) so `import slice_kernels` stays light.
from .history import History, HistoryStore
from .ops.magnitude_merge import magnitude_merge
from .ops.sign_loss import sign_consistency_loss

_LAZY_STABILITY = ("ParameterStabilityLoss", "StabilityLossMixin", "PSLoRATrainer")


def __getattr__(name):
    if name in _LAZY_STABILITY:
        from . import stability

        return getattr(stability, name)
    if name in _LAZY_GORP:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY_GORP[name]}"), name)
    raise AttributeError(f"module 'slice_kernels' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "SliceConfig",
    "SliceConfigError",
    "SliceInitError",
    "NonFiniteGradientError",
    "InitReport",
    "InitResult",
    "init_from_gradients",
    "lora_scaling",
    "collect_gradients",
    "collect_replay_gradients",
    "get_slice_model",
    "save_initial_adapter",
    "save_as_lora",
    "dispatch",
    "GorpAdamW",
    "GorpGroupError",
    "gorp_param_groups",
    "build_gorp_optimizer",
    "History",
    "HistoryStore",
    "sign_consistency_loss",
    "magnitude_merge",
    "ParameterStabilityLoss",
    "StabilityLossMixin",
    "PSLoRATrainer",
]
