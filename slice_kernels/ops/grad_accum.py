"""Gradient accumulation for collection (SPEC §1 steps 1–2): ``acc += alpha · grad`` with a float32
accumulator whatever the gradient's dtype, called from a post-accumulate-grad hook so the parameter's
``.grad`` can be released at once.

Backends: torch (reference), triton and cuda/cpp kernels that fuse the dtype conversion into the axpy (a
bf16 gradient is never materialized as a float32 temporary). ``PinnedOffload`` copies finished GPU
accumulators to pinned CPU memory on a side stream, for pipelines of your own; ``collect_gradients(offload=True)``
does not use it: it keeps the accumulators in (pinned) CPU memory from the start and adds each layer's
gradient into them as soon as autograd produces it.
"""

from __future__ import annotations

import torch

from .. import dispatch, extension
from ..errors import InvalidArgumentError

try:  # Triton is optional
    from . import _grad_accum_triton as _tri
except ImportError:  # pragma: no cover
    _tri = None

GRAD_ACCUMULATE = dispatch.define("grad_accumulate")


@GRAD_ACCUMULATE.register("torch")
def grad_accumulate_torch(acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
    acc.add_(grad.to(acc.dtype), alpha=alpha)


if _tri is not None:

    @GRAD_ACCUMULATE.register("triton")
    def grad_accumulate_triton(acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
        if not acc.is_contiguous():  # validated before anything is written
            raise InvalidArgumentError("grad_accumulate with the triton backend needs a contiguous float32 accumulator")
        _tri.accumulate_(acc, grad.contiguous(), alpha)


@GRAD_ACCUMULATE.register("cpp", native_op="grad_accumulate_")
@GRAD_ACCUMULATE.register("cuda", native_op="grad_accumulate_")
def grad_accumulate_native(acc: torch.Tensor, grad: torch.Tensor, alpha: float) -> None:
    if not acc.is_contiguous():
        raise InvalidArgumentError("grad_accumulate with a native backend needs a contiguous float32 accumulator")
    g = grad if grad.dtype in (torch.float32, torch.bfloat16, torch.float16) else grad.float()
    extension.native("grad_accumulate_")(acc, g.contiguous(), float(alpha))


def accumulate_(acc: torch.Tensor, grad: torch.Tensor, alpha: float = 1.0) -> None:
    """In place: ``acc += alpha * grad`` (acc float32 on grad's device, same shape)."""
    if acc.dtype != torch.float32:
        raise InvalidArgumentError(f"gradient accumulators are float32, got {acc.dtype}")
    if acc.shape != grad.shape:
        raise InvalidArgumentError(f"accumulator shape {tuple(acc.shape)} != gradient shape {tuple(grad.shape)}")
    if acc.device != grad.device:
        raise InvalidArgumentError(
            f"accumulator on {acc.device} but gradient on {grad.device}; offload after accumulating"
        )
    GRAD_ACCUMULATE(grad.device, acc, grad, float(alpha))


def accumulator(device: torch.device | str):
    """The backend implementation of ``acc += alpha * grad`` for tensors on ``device``, chosen once, without
    ``accumulate_``'s per-call checks: for a caller that adds many gradients into accumulators it made itself
    (float32, contiguous, the gradients' shapes and device), as ``collect_gradients``' hook does once per
    layer and batch: inside a backward pass the per-call selection costs more than a small layer's axpy
    (benches/RESULTS.md). Honours the backend forced (``use_backend`` or the environment variable) when it is
    called."""
    return GRAD_ACCUMULATE.select(torch.device(device))[1]


def accumulate_hook(acc: torch.Tensor, alpha: float = 1.0):
    """A ``register_post_accumulate_grad_hook`` callback: adds ``alpha · p.grad`` into ``acc`` and frees
    ``p.grad`` at once, so at most one layer's gradient is alive beside the accumulators.

    ``acc`` may be in the parameter's layout or transposed (an (out, in) accumulator for a Conv1D weight stored
    (in, out)); the orientation is read from the shapes, so for a SQUARE Conv1D weight it cannot be told apart:
    give such a weight an accumulator in its own layout and transpose once at the end (``collect_gradients``
    does this for every layer)."""

    def hook(p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        # Conv1D stores Wᵀ: the accumulator is (out, in), so accept the transposed gradient too.
        accumulate_(acc, g if g.shape == acc.shape else g.t(), alpha)
        p.grad = None

    return hook


class PinnedOffload:
    """Asynchronous copies of GPU accumulators to pinned CPU memory.

    ``offload(name, acc)`` enqueues ``acc`` → pinned buffer on a side stream that first waits for the work
    already queued on the current stream (the last accumulation), and returns at once; ``wait()`` blocks until
    every copy has landed and returns ``{name: cpu_tensor}``. Do not modify ``acc`` until ``wait()``: the copy
    reads it asynchronously (it is kept alive here until then). On CPU tensors it is a plain clone.
    """

    def __init__(self):
        self._out: dict[str, torch.Tensor] = {}
        self._keep: list[torch.Tensor] = []
        self._stream = None
        self._event = None

    def offload(self, name: str, acc: torch.Tensor) -> None:
        if name in self._out:
            raise InvalidArgumentError(f"{name!r} was already offloaded; call wait() and start a new PinnedOffload")
        if acc.device.type != "cuda":
            self._out[name] = acc.detach().clone()
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=acc.device)
        buf = torch.empty(acc.shape, dtype=acc.dtype, pin_memory=True)
        self._stream.wait_stream(torch.cuda.current_stream(acc.device))
        with torch.cuda.stream(self._stream):
            buf.copy_(acc, non_blocking=True)
        self._keep.append(acc)
        self._out[name] = buf

    def wait(self) -> dict[str, torch.Tensor]:
        if self._stream is not None:
            self._stream.synchronize()
        self._keep.clear()
        out, self._out = self._out, {}
        return out
