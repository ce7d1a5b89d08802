"""GORP (SPEC §4): AdamW in a low-rank gradient subspace kept orthogonal to earlier tasks' shared spaces, and
the parameter groups it takes from a (PEFT) model."""

from ..errors import GorpGroupError
from .groups import REFERENCE_FULL_RANK_LR_RATIO, build_gorp_optimizer, gorp_param_groups
from .optimizer import KINDS, GorpAdamW, energy_count, grow_space
from .persist import (
    GorpCheckpointError,
    full_rank_parameters,
    load_full_rank_weights,
    load_gorp_adapter,
    save_full_rank_weights,
    save_gorp_adapter,
)

__all__ = [
    "GorpAdamW",
    "GorpGroupError",
    "KINDS",
    "REFERENCE_FULL_RANK_LR_RATIO",
    "energy_count",
    "grow_space",
    "gorp_param_groups",
    "build_gorp_optimizer",
    "GorpCheckpointError",
    "full_rank_parameters",
    "save_full_rank_weights",
    "load_full_rank_weights",
    "save_gorp_adapter",
    "load_gorp_adapter",
]
