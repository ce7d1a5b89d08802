"""SLICE initialization and its baselines (SPEC §1): the config, gradient collection, the init on plain
tensors, and the PEFT drop-in (``get_slice_model``, saving helpers)."""

from .collect import collect_gradients, collect_replay_gradients, default_loss
from .config import METHODS, SliceConfig
from .factors import absorb_, dst_basis, product_var, unbiased_var, variance_beta
from .finite import all_finite
from .init import init_from_gradients, validate_ranks
from .peft import get_slice_model, install_init, save_as_lora, save_initial_adapter
from .report import InitReport, InitResult, lora_scaling

__all__ = [
    "METHODS",
    "SliceConfig",
    "InitReport",
    "InitResult",
    "init_from_gradients",
    "validate_ranks",
    "lora_scaling",
    "absorb_",
    "dst_basis",
    "product_var",
    "unbiased_var",
    "variance_beta",
    "all_finite",
    "collect_gradients",
    "collect_replay_gradients",
    "default_loss",
    "get_slice_model",
    "install_init",
    "save_initial_adapter",
    "save_as_lora",
]
