"""slice-kernels: fast, less forgetful continual LoRA fine-tuning (SLICE, PS-LoRA, GORP).

Layout: ``slice_init/`` (SLICE and its baselines), ``ps_lora/`` (stability loss, magnitude merge), ``gorp/``
(the optimizer), ``ops/`` (the fused kernels, one module per op), ``runner/`` (the continual-learning
application, which imports the library and never the reverse); at the top the shared infrastructure.
"""

from __future__ import annotations

import importlib

from . import _compat, dispatch
from .errors import (
    BackendUnavailableError,
    GorpGroupError,
    HistoryError,
    NonFiniteGradientError,
    SliceConfigError,
    SliceInitError,
    SliceKernelsError,
)
from .gorp import GorpAdamW, build_gorp_optimizer, gorp_param_groups, load_gorp_adapter, save_gorp_adapter
from .init_offsets import init_offsets
from .ops.magnitude_merge import magnitude_merge
from .ps_lora import History, HistoryStore, ParameterStabilityLoss, StabilityLossMixin, sign_consistency_loss
from .slice_init import (
    InitReport,
    InitResult,
    SliceConfig,
    collect_gradients,
    collect_replay_gradients,
    convert_adapter,
    get_slice_model,
    init_from_gradients,
    init_sharded_,
    lora_scaling,
    save_as_lora,
    save_initial_adapter,
)

__version__ = "0.2.1"

_compat.install()


def __getattr__(name):
    if name == "PSLoRATrainer":  # transformers.Trainer is imported on first use only
        from .ps_lora import trainer

        return trainer.PSLoRATrainer
    if name == "SliceSaveCallback":  # transformers.TrainerCallback, imported on first use only
        from .integrations.trainer_callback import SliceSaveCallback

        return SliceSaveCallback
    if name == "GorpCheckpointCallback":  # transformers.TrainerCallback, imported on first use only
        from .integrations.gorp_callback import GorpCheckpointCallback

        return GorpCheckpointCallback
    old = f"{__name__}.{name}"
    if old in _compat.MOVED:  # slice_kernels.history etc. as attributes, as 0.1's eager imports made them
        return importlib.import_module(old)
    raise AttributeError(f"module 'slice_kernels' has no attribute {name!r}")


__all__ = [
    "SliceConfig",
    "SliceConfigError",
    "SliceInitError",
    "SliceKernelsError",
    "NonFiniteGradientError",
    "BackendUnavailableError",
    "HistoryError",
    "InitReport",
    "InitResult",
    "init_from_gradients",
    "lora_scaling",
    "collect_gradients",
    "collect_replay_gradients",
    "get_slice_model",
    "save_initial_adapter",
    "save_as_lora",
    "convert_adapter",
    "init_sharded_",
    "init_offsets",
    "SliceSaveCallback",
    "dispatch",
    "History",
    "HistoryStore",
    "sign_consistency_loss",
    "magnitude_merge",
    "ParameterStabilityLoss",
    "StabilityLossMixin",
    "PSLoRATrainer",
    "GorpAdamW",
    "GorpGroupError",
    "gorp_param_groups",
    "build_gorp_optimizer",
    "save_gorp_adapter",
    "load_gorp_adapter",
    "GorpCheckpointCallback",
]
