"""slice-kernels: fast, less forgetful continual LoRA fine-tuning (SLICE, PS-LoRA, GORP)."""
from __future__ import annotations

from . import dispatch
from .config import SliceConfig, SliceConfigError
from .errors import NonFiniteGradientError, SliceInitError
from .init import InitReport, InitResult, init_from_gradients, lora_scaling
from .ops import conflict as _conflict  # noqa: F401  (registers ops)
from .ops import grad_accum as _grad_accum  # noqa: F401
from .ops import rsvd as _rsvd  # noqa: F401

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
    "dispatch",
]
