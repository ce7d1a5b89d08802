"""Backend registry and selection for every fused op.

An op is declared once, by name, and its backends register on the handle::

    CONFLICT_STATS = dispatch.define("conflict_stats")

    @CONFLICT_STATS.register("torch")
    def conflict_stats_torch(cur, prev): ...

    backend, fn = CONFLICT_STATS.select(device)      # or CONFLICT_STATS(device, cur, prev)

Backends:

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
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import extension
from .errors import BackendUnavailableError, InvalidArgumentError, UnknownOpError

BACKENDS = ("torch", "triton", "cuda", "cpp")
ENV_VAR = "SLICE_KERNELS_BACKEND"

_DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_override = threading.local()


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    native_op: str | None  # for cuda/cpp: the operator name in torch.ops.slice_kernels_C
    auto: bool = True  # False: runs only when forced, never picked by the default order


def _triton_usable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


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
        raise InvalidArgumentError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    prev = getattr(_override, "backend", None)
    _override.backend = backend
    try:
        yield
    finally:
        _override.backend = prev


class Op:
    """One fused op: its name and its registered backends. Made by ``define``."""

    def __init__(self, name: str):
        self.name = name
        self._impls: dict[str, _Impl] = {}

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={sorted(self._impls)})"

    def register(self, backend: str, *, native_op: str | None = None, auto: bool = True):
        """Decorator: register ``fn`` as ``backend``'s implementation.

        For ``cuda``/``cpp`` pass ``native_op``: the backend is offered only when the extension has a kernel of
        that name for the tensor's device. ``auto=False``: the backend runs only when forced (a kernel kept for
        parity with another device but measured slower than the reference on its own).
        """
        if backend not in BACKENDS:
            raise InvalidArgumentError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if backend in ("cuda", "cpp") and native_op is None:
            raise InvalidArgumentError(f"{self.name}.register({backend!r}) needs native_op=")

        def deco(fn):
            self._impls[backend] = _Impl(fn, native_op, auto)
            return fn

        return deco

    def refusal(self, backend: str, device: torch.device) -> str | None:
        """Why ``backend`` cannot run this op on ``device``, or None if it can."""
        if backend not in BACKENDS:
            return f"unknown backend (choose from {', '.join(BACKENDS)})"
        impl = self._impls.get(backend)
        if impl is None:
            return f"{self.name} has no {backend} implementation"
        dt = torch.device(device).type
        if backend == "torch":
            return None
        if backend == "triton":
            why = _triton_usable()
            if why:
                return why
            if dt == "cuda" or (dt == "cpu" and interpreting()):
                return None
            return f"triton runs on CUDA tensors, or on CPU tensors only with TRITON_INTERPRET=1 (got {dt})"
        want = "cuda" if backend == "cuda" else "cpu"
        if dt != want:
            return f"the {backend} backend runs on {want} tensors (got {dt})"
        if extension.load() is None:
            return f"native extension slice_kernels._C is not loaded ({extension.load_error()})"
        if not extension.has_kernel(impl.native_op, dt):
            return f"slice_kernels._C has no {dt} kernel for {impl.native_op}"
        return None

    def select(self, device: torch.device | str) -> tuple[str, Callable]:
        """The backend name and implementation that will run this op on ``device``."""
        device = torch.device(device)
        forced = forced_backend()
        if forced is not None:
            why = self.refusal(forced, device)
            if why is None:
                return forced, self._impls[forced].fn
            reasons = "\n".join(f"  - {b}: {self.refusal(b, device) or 'available'}" for b in BACKENDS)
            raise BackendUnavailableError(
                f"backend {forced!r} was forced (via {ENV_VAR} or use_backend) but cannot run {self.name!r} on "
                f"{device.type} tensors: {why}. Per backend:\n{reasons}\n"
                f"Unset {ENV_VAR} to let slice_kernels choose, or force an available backend."
            )
        for b in _DEFAULT_ORDER.get(device.type, ("torch",)):
            if self.refusal(b, device) is None and self._impls[b].auto:
                return b, self._impls[b].fn
        return "torch", self._impls["torch"].fn

    def __call__(self, device: torch.device | str, *args, **kwargs):
        """Run the op with the backend ``select`` picks for ``device``."""
        return self.select(device)[1](*args, **kwargs)

    def implementations(self) -> dict[str, Callable]:
        """Every registered implementation by backend (tests compare each with ``torch``)."""
        return {b: i.fn for b, i in self._impls.items()}


_OPS: dict[str, Op] = {}
_OWNERS: dict[str, str | None] = {}  # op name -> the module that defined it


def define(name: str) -> Op:
    """Declare the fused op ``name`` (once per process) and return its handle. The module that defined it may
    run again (``importlib.reload``): it gets its own handle back and re-registers its backends."""
    owner = sys._getframe(1).f_globals.get("__name__")
    if name in _OPS:
        if _OWNERS.get(name) != owner:
            raise InvalidArgumentError(
                f"op {name!r} is already defined by {_OWNERS.get(name)} ({_OPS[name]!r}); use that handle"
            )
        return _OPS[name]
    _OPS[name] = op = Op(name)
    _OWNERS[name] = owner
    return op


def get(op: Op | str) -> Op:
    """The handle of an op, given the handle or its name."""
    if isinstance(op, Op):
        return op
    if op not in _OPS:
        raise UnknownOpError(f"no op named {op!r} is defined; known ops: {sorted(_OPS)}")
    return _OPS[op]


# By-name access, for callers that hold a name (tests, benchmarks, the README's examples).
def select(op: Op | str, device: torch.device | str) -> tuple[str, Callable]:
    return get(op).select(device)


def refusal(op: Op | str, backend: str, device: torch.device | str) -> str | None:
    return get(op).refusal(backend, torch.device(device))


def implementations(op: Op | str) -> dict[str, Callable]:
    return get(op).implementations()


def defined() -> list[str]:
    """The name of every op defined so far (importing ``slice_kernels.ops`` defines them all)."""
    return sorted(_OPS)


# 0.1's registration by name, kept for code outside the package until 0.3.
def register(op: str, backend: str, *, native_op: str | None = None, auto: bool = True):
    """Deprecated: declare the op once with ``MY_OP = dispatch.define(name)`` and use ``MY_OP.register(backend)``."""
    warnings.warn(
        "dispatch.register(name, backend) is deprecated since 0.2 and goes in 0.3: define the op once "
        "with MY_OP = dispatch.define(name) and register with @MY_OP.register(backend)",
        DeprecationWarning,
        stacklevel=2,
    )
    handle = _OPS[op] if op in _OPS else define(op)
    return handle.register(backend, native_op=native_op, auto=auto)


def call(op: Op | str, device: torch.device | str, *args, **kwargs):
    """Deprecated: call the op's handle, ``MY_OP(device, *args)``."""
    warnings.warn(
        "dispatch.call(name, device, ...) is deprecated since 0.2 and goes in 0.3: call the op's handle, "
        "MY_OP(device, ...)",
        DeprecationWarning,
        stacklevel=2,
    )
    return get(op)(device, *args, **kwargs)
