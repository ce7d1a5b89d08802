"""The error classes of slice_kernels. Each derives from ``SliceKernelsError`` (catch that for "anything the
library refused") and from the builtin a caller would expect (``ValueError`` for a bad value,
``TypeError`` for a wrong kind of argument), so code written against the builtins keeps working. Each
message names the thing at fault and the next step; nothing has been modified when one is raised.
"""

from __future__ import annotations


class SliceKernelsError(Exception):
    """Base class of every error class of slice_kernels (the runner's TaskError, ModelError, ResumeError too;
    the runner's option checks still raise plain ``ValueError``)."""


class InvalidArgumentError(SliceKernelsError, ValueError):
    """An argument of an op or a helper has a bad value (shape, device, range)."""


class InvalidTypeError(SliceKernelsError, TypeError):
    """An argument is not of an accepted kind (a tensor where a tuple was expected, an integer factor)."""


class SliceInitError(SliceKernelsError, ValueError):
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


class SliceConfigError(SliceKernelsError, ValueError):
    """A ``SliceConfig`` field has a bad value; the message names the field and what it accepts."""


class HistoryError(SliceKernelsError, ValueError):
    """A PS-LoRA history (or a stability-loss argument) does not fit the model or layer it is used with."""


class GorpGroupError(SliceKernelsError, ValueError):
    """A parameter group cannot be trained by GorpAdamW as given; the message names the parameter."""


class BackendUnavailableError(SliceKernelsError, RuntimeError):
    """A forced backend cannot run an op; the message lists the reason for each backend."""


class NotFoundError(SliceKernelsError, KeyError):
    """A name or object looked up is not there (an op name, a tensor that is not an optimizer's parameter)."""


class UnknownOpError(NotFoundError):
    """No fused op of that name is defined."""


class UnsupportedInputError(SliceKernelsError, RuntimeError):
    """An input of a kind the package cannot process at all (a sparse gradient)."""


class ExtensionError(SliceKernelsError, RuntimeError):
    """The native extension is missing kernels that were required (a GPU build check)."""
