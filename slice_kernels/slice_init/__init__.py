"""SLICE initialization and its baselines (SPEC §1): the config, gradient collection, the init on plain
tensors, and the PEFT drop-in (``get_slice_model``, saving helpers)."""

from .artifacts import convert_adapter
from .collect import collect_gradients, collect_replay_gradients, default_loss
from .config import METHODS, SliceConfig
from .factors import absorb_, dst_basis, product_var, unbiased_var, variance_beta
from .finite import all_finite
from .grad_cache import gradient_fingerprint, load_gradient_cache, save_gradient_cache
from .init import init_from_gradients, validate_ranks
from .peft import get_slice_model, install_init, save_as_lora, save_initial_adapter
from .peft_options import slice_config_for
from .report import InitReport, InitResult, lora_scaling
from .sharded import init_sharded_

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
    "slice_config_for",
    "gradient_fingerprint",
    "save_gradient_cache",
    "load_gradient_cache",
    "convert_adapter",
    "init_sharded_",
]
