"""Backend registry and selection for every fused op.

Each op registers one implementation per backend it has:

* ``torch``  – the reference: always present, float64-capable, the oracle for every test;
* ``triton`` – GPU kernels; on CPU tensors only under ``TRITON_INTERPRET=1`` (used by the tests);
* ``cuda``   – kernels of the native extension on CUDA tensors;
* ``cpp``    – kernels of the native extension on CPU tensors.

Default choice: CUDA tensors → cuda, else triton, else torch; CPU tensors → cpp, else torch.
``SLICE_KERNELS_BACKEND=torch|triton|cuda|cpp`` (or the ``use_backend`` context manager) forces one; a
forced backend that cannot run raises ``BackendUnavailableError`` listing why every backend was refused,
never a silent fallback.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from . import _ext

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "SLICE_KERNELS_BACKEND"

_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run an op; the message lists the reason for each backend."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    native_op: str | None  # for cuda/cpp: the operator name in torch.ops.slice_kernels_C
    auto: bool = True  # False: runs only when forced, never picked by the default order


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_override = threading.local()


def register(op: str, backend: str, *, native_op: str | None = None, auto: bool = True):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``.

    For ``cuda``/``cpp`` pass ``native_op``: the backend is offered only when the extension has a kernel of
    that name for the tensor's device. ``auto=False``: the backend runs only when forced (a kernel that is
    kept for parity with another device but measured slower than the reference on its own).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend in ("cuda", "cpp") and native_op is None:
        raise ValueError(f"register({op!r}, {backend!r}) needs native_op=")

    def deco(fn):
        _REGISTRY.setdefault(op, {})[backend] = _Impl(fn, native_op, auto)
        return fn

    return deco


def _triton_usable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def refusal(op: str, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device``, or None if it can."""
    impls = _REGISTRY.get(op)
    if impls is None:
        raise KeyError(f"no op named {op!r} is registered; known ops: {sorted(_REGISTRY)}")
    if backend not in BACKENDS:
        return f"unknown backend (choose from {', '.join(BACKENDS)})"
    impl = impls.get(backend)
    if impl is None:
        return f"{op} has no {backend} implementation"
    dt = device.type
    if backend == "torch":
        return None
    if backend == "triton":
        why = _triton_usable()
        if why:
            return why
        if dt == "cuda":
            return None
        if dt == "cpu" and interpreting():
            return None
        return f"triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 (got {dt})"
    want = "cuda" if backend == "cuda" else "cpu"
    if dt != want:
        return f"the {backend} backend runs on {want} tensors (got {dt})"
    if _ext.load() is None:
        return f"native extension slice_kernels._C is not loaded ({_ext.load_error()})"
    if not _ext.has_kernel(impl.native_op, dt):
        return f"slice_kernels._C has no {dt} kernel for {impl.native_op}"
    return None


def forced_backend() -> str | None:
    b = getattr(_override, "backend", None)
    if b is not None:
        return b
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return env or None


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force ``backend`` for ops called inside the block (this thread only); None restores the default."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    prev = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = prev


def select(op: str, device: torch.device | str) -> tuple[str, Callable]:
    """The backend name and implementation that will run ``op`` on ``device``."""
    device = torch.device(device)
    forced = forced_backend()
    if forced is not None:
        why = refusal(op, forced, device) if forced in BACKENDS else f"unknown backend {forced!r}"
        if why is None:
            return forced, _REGISTRY[op][forced].fn
        reasons = "\n".join(f"  - {b}: {refusal(op, b, device) or 'available'}" for b in BACKENDS)
        raise BackendUnavailableError(
            f"backend {forced!r} was forced (via {ENV_VAR} or use_backend) but cannot run {op!r} on "
            f"{device.type} tensors: {why}. Per backend:\n{reasons}\n"
            f"Unset {ENV_VAR} to let slice_kernels choose, or force an available backend."
        )
    for b in _DEFAULT_ORDER.get(device.type, ("torch",)):
        if refusal(op, b, device) is None and _REGISTRY[op][b].auto:
            return b, _REGISTRY[op][b].fn
    return "torch", _REGISTRY[op]["torch"].fn


def call(op: str, device: torch.device | str, *args, **kwargs):
    """Run ``op`` with the backend ``select`` picks for ``device``."""
    return select(op, device)[1](*args, **kwargs)


def implementations(op: str) -> dict[str, Callable]:
    """Every registered implementation of ``op`` by backend (tests compare each with ``torch``)."""
    return {b: i.fn for b, i in _REGISTRY[op].items()}


def ops() -> list[str]:
    return sorted(_REGISTRY)
