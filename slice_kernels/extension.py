"""Loading of the optional native extension ``slice_kernels._C``.

The extension registers its kernels as torch operators in the ``slice_kernels_C`` namespace
(``torch.ops.slice_kernels_C.<op>``), with a CPU kernel, a CUDA kernel, or both. A missing or broken
extension is logged once and the package carries on with the Python backends: it is never an import error.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

from .errors import ExtensionError

log = logging.getLogger("slice_kernels")

NAMESPACE = "slice_kernels_C"
SKIP_ENV = "SLICE_KERNELS_SKIP_EXT"
# setup.py reads the same variable with the same spellings (it cannot import the package it builds)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")

_state: dict = {"tried": False, "module": None, "error": None}


def skip_requested() -> bool:
    """Whether ``SLICE_KERNELS_SKIP_EXT`` asks for the pure-Python package. An unrecognised value warns and
    counts as unset: a typo must not make the package unimportable, and loading the extension is the default."""
    raw = os.environ.get(SKIP_ENV)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value not in _FALSE:
        warnings.warn(
            f"{SKIP_ENV}={raw!r} is not recognised; use one of {'/'.join(_TRUE)} to skip the native "
            f"extension or {'/'.join(_FALSE[:-1])}/empty to load it (case-insensitive); loading it",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def load():
    """Import ``slice_kernels._C`` once; return the module or None (the reason is in ``load_error()``)."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if skip_requested():
        _state["error"] = f"{SKIP_ENV}={os.environ[SKIP_ENV]} is set"
        return None
    try:
        from slice_kernels import _C  # noqa: F401  (registers the torch operators as a side effect)

        _state["module"] = _C
    except Exception as exc:  # ImportError, or an undefined symbol from a torch ABI mismatch
        _state["error"] = f"{type(exc).__name__}: {exc}"
        log.info("slice_kernels: native extension unavailable (%s); using the Python backends", _state["error"])
    return _state["module"]


def load_error() -> str | None:
    load()
    return _state["error"]


def has_kernel(op: str, device_type: str) -> bool:
    """Whether ``torch.ops.slice_kernels_C.<op>`` exists with a kernel for ``device_type`` ("cpu" | "cuda")."""
    if load() is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)
    except RuntimeError:  # the operator is not registered at all
        return False


def native(op: str):
    """The native operator ``torch.ops.slice_kernels_C.<op>`` (call ``has_kernel`` first)."""
    return getattr(getattr(torch.ops, NAMESPACE), op)


def declared_ops() -> list[str]:
    """Every operator the extension declares (the schemas of csrc/bindings.cpp), with or without kernels."""
    if load() is None:
        return []
    prefix = f"{NAMESPACE}::"
    return sorted(n[len(prefix) :] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def kernel_report(device_type: str) -> dict[str, bool]:
    """{declared operator: whether it has a ``device_type`` kernel}."""
    return {op: has_kernel(op, device_type) for op in declared_ops()}


def require_kernels(device_type: str) -> dict[str, bool]:
    """Raise unless the extension is loaded and every declared operator has a ``device_type`` kernel: after a
    CUDA build, an op whose kernel did not register would silently run another backend (or fail its tests).
    Returns ``kernel_report(device_type)``."""
    if load() is None:
        raise ExtensionError(f"slice_kernels._C is not loaded: {load_error()}")
    report = kernel_report(device_type)
    missing = [op for op, ok in report.items() if not ok]
    if not report or missing:
        how = "with CUDA torch and nvcc" if device_type == "cuda" else "python setup.py build_ext --inplace"
        raise ExtensionError(f"no {device_type} kernel for {missing or 'any operator'}: rebuild the extension ({how})")
    return report
