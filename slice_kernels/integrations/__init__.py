"""Integrations with training frameworks (transformers Trainer callbacks)."""

from .gorp_callback import GorpCheckpointCallback
from .trainer_callback import SliceSaveCallback

__all__ = ["GorpCheckpointCallback", "SliceSaveCallback"]
