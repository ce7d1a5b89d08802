"""Errors raised by slice_kernels. Each message names the thing at fault and the next step."""
from __future__ import annotations


class SliceInitError(ValueError):
    """Bad input to an initializer; nothing has been modified when this is raised."""


class NonFiniteGradientError(SliceInitError):
    """A gradient has NaN/Inf entries. ``layer`` and ``source`` say where."""

    def __init__(self, layer: str, source: str):
        self.layer, self.source = layer, source
        super().__init__(
            f"layer {layer!r}: the {source} has non-finite (NaN or Inf) entries. Nothing was modified. "
            f"Check the batches behind the {source} (an overflowing loss in float16/bfloat16, labels out of "
            f"range, a corrupt example) and collect the gradients again."
        )
