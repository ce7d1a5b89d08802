"""Import paths of 0.1 that the layout redesign moved. They keep working for this release (0.2) with a
``DeprecationWarning`` naming the new path, and go in 0.3.

``MOVED`` lists the modules: a finder on ``sys.meta_path`` answers an old path with the new module itself (the
same object, so ``isinstance`` checks and monkeypatching see one module). ``NAMES`` lists the names that left a
module that is still there (or that an old path's module held and its new home does not): a module-level
``__getattr__`` forwards them, with the same warning.
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


# module -> {name it no longer defines: (module that holds it now, its name there)}
NAMES = {
    "slice_kernels.ops.sign_loss": {
        "sign_consistency_loss": ("slice_kernels.ps_lora.loss", "sign_consistency_loss"),
        "reference_sign_consistency_loss": ("slice_kernels.ps_lora.loss", "reference_sign_consistency_loss"),
        "DEFAULT_BETA": ("slice_kernels.ps_lora.loss", "DEFAULT_BETA"),
    },
    "slice_kernels.ops.gorp_update": {"OP": ("slice_kernels.ops.gorp_update", "GORP_UPDATE")},
    "slice_kernels.errors": {"all_finite": ("slice_kernels.slice_init.finite", "all_finite")},
    "slice_kernels.slice_init": {  # as slice_kernels.init
        "SliceInitError": ("slice_kernels.errors", "SliceInitError"),
        "NonFiniteGradientError": ("slice_kernels.errors", "NonFiniteGradientError"),
    },
    "slice_kernels.slice_init.collect": {  # as slice_kernels.collect
        "unsupported_reason": ("slice_kernels.modules", "unsupported_reason"),
        "weight_out_in": ("slice_kernels.modules", "weight_out_in"),
    },
    "slice_kernels.slice_init.peft": {  # as slice_kernels.peft_integration
        "peft_targets": ("slice_kernels.modules", "resolve_targets"),
        "unsupported_reason": ("slice_kernels.modules", "unsupported_reason"),
        "collect_streams": ("slice_kernels.slice_init.collect", "collect_streams"),
    },
    "slice_kernels.ps_lora": {  # as slice_kernels.stability
        "lora_layers": ("slice_kernels.modules", "lora_layers"),
        "lora_factors": ("slice_kernels.modules", "lora_factors"),
        "magnitude_merge": ("slice_kernels.ops.magnitude_merge", "magnitude_merge"),
        "MODES": ("slice_kernels.ops.sign_loss", "MODES"),
    },
}

_SKIPPED_FILES = {__file__, importlib.__file__, __file__.replace("_compat.py", "__init__.py")}


def _stacklevel() -> int:
    """The stack level of the first frame outside this module, the package's ``__init__`` and ``importlib``, so
    the warning points at the user's code (where Python's default filters show it); ``warnings`` itself skips
    the frozen import machinery when it counts."""
    level, f = 1, sys._getframe(1)
    while f is not None and (
        f.f_code.co_filename.startswith("<frozen importlib") or f.f_code.co_filename in _SKIPPED_FILES
    ):
        if f.f_code.co_filename in _SKIPPED_FILES:
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

    # python -m <old path> (runpy) asks for the code without importing the module
    def get_code(self, fullname):
        warn_moved(self.old)
        # run the new module as __main__ under its own name, so its relative imports resolve
        source = f"import runpy\nrunpy.run_module({MOVED[self.old]!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{self.old} moved to {MOVED[self.old]}>", "exec")

    def is_package(self, fullname):
        return False


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(fullname))


def _forwarder(modname: str, table: dict, previous):
    def __getattr__(name):
        if name in table:
            target, attr = table[name]
            warnings.warn(
                f"{modname}.{name} moved to {target}.{attr} in slice-kernels 0.2; the old name goes in 0.3",
                DeprecationWarning,
                stacklevel=_stacklevel(),
            )
            return getattr(importlib.import_module(target), attr)
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module {modname!r} has no attribute {name!r}")

    return __getattr__


def install() -> None:
    """Put the finder on ``sys.meta_path`` and the name forwarders on their (already imported) modules."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
    for modname, table in NAMES.items():
        module = importlib.import_module(modname)
        previous = module.__dict__.get("__getattr__")
        if getattr(previous, "_slice_kernels_forwarder", False):
            continue
        forward = _forwarder(modname, table, previous)
        forward._slice_kernels_forwarder = True
        module.__getattr__ = forward
