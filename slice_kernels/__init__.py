"""slice-kernels: fast, less forgetful continual LoRA fine-tuning (SLICE, PS-LoRA, GORP)."""
from __future__ import annotations

import importlib

from . import dispatch
from .collect import collect_gradients, collect_replay_gradients
from .config import SliceConfig, SliceConfigError
from .errors import NonFiniteGradientError, SliceInitError
from .history import History, HistoryStore
from .init import InitReport, InitResult, init_from_gradients, lora_scaling
from .ops import conflict as _conflict  # noqa: F401  (importing an op module registers its backends)
from .ops import gorp_update as _gorp_update  # noqa: F401
from .ops import grad_accum as _grad_accum  # noqa: F401
from .ops import rsvd as _rsvd  # noqa: F401
from .ops.magnitude_merge import magnitude_merge
from .ops.sign_loss import sign_consistency_loss
from .peft_integration import get_slice_model, save_as_lora, save_initial_adapter

__version__ = "0.1.0"

# The stability (PS-LoRA) and GORP modules register runner methods, which imports the runner; they load on
# first use of their names (PEP 562), so `import slice_kernels` stays light and never half-initialized.
_LAZY = {
    "ParameterStabilityLoss": "stability",
    "StabilityLossMixin": "stability",
    "PSLoRATrainer": "stability",
    "GorpAdamW": "gorp",
    "GorpGroupError": "gorp",
    "gorp_param_groups": "gorp_groups",
    "build_gorp_optimizer": "gorp_groups",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'slice_kernels' has no attribute {name!r}")


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
    "History",
    "HistoryStore",
    "sign_consistency_loss",
    "magnitude_merge",
    *_LAZY,
]
