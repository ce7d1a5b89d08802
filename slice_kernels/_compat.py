"""Import paths of 0.1 that the layout redesign moved. They keep working for this release (0.2) with a
``DeprecationWarning`` naming the new path, and go in 0.3.

``MOVED`` is the whole list. A finder on ``sys.meta_path`` answers an old path with the new module itself (the
same object, so ``isinstance`` checks and monkeypatching see one module).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "slice_kernels.init": "slice_kernels.slice_init",
    "slice_kernels.config": "slice_kernels.slice_init.config",
    "slice_kernels.collect": "slice_kernels.slice_init.collect",
    "slice_kernels.peft_integration": "slice_kernels.slice_init.peft",
    "slice_kernels.history": "slice_kernels.ps_lora.history",
    "slice_kernels.stability": "slice_kernels.ps_lora",
    "slice_kernels.gorp_groups": "slice_kernels.gorp.groups",
    "slice_kernels._ext": "slice_kernels.extension",
    "slice_kernels.cli": "slice_kernels.runner.cli",
    "slice_kernels.runner.init_methods": "slice_kernels.runner.methods.init_methods",
}


def _stacklevel() -> int:
    """The stack level of the first frame outside this module, so the warning points at the user's import
    statement (where Python's default filters show it); ``warnings`` itself skips the import machinery's
    frames when it counts."""
    level, f = 1, sys._getframe(1)
    while f is not None and (f.f_code.co_filename.startswith("<frozen importlib") or f.f_code.co_filename == __file__):
        if f.f_code.co_filename == __file__:
            level += 1
        f = f.f_back
    return level


def warn_moved(old: str) -> None:
    warnings.warn(
        f"{old} moved to {MOVED[old]} in slice-kernels 0.2; the old path goes in 0.3: import "
        f"{MOVED[old]} (or the name from slice_kernels)",
        DeprecationWarning,
        stacklevel=_stacklevel(),
    )


class _Alias(importlib.abc.Loader):
    def __init__(self, old: str):
        self.old = old

    def create_module(self, spec):
        warn_moved(self.old)
        module = importlib.import_module(MOVED[self.old])
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system stamped the alias's spec on the real module: undo it


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(fullname))


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
