"""Registry of continual-learning methods the runner can compare side by side.

A method is a small object (subclass ``Method``) with five hooks, called by the runner at every stage t:

1. ``init_adapter(ctx) -> (peft_model, report)``: wrap ``ctx.model`` (the weights W^(t-1), adapters of
   earlier stages already merged) with a LoRA adapter and initialize it. ``report`` is a JSON-able dict; put
   ``gamma`` and ``cos`` in it when the method has them (they land in results.json per stage).
2. ``extra_loss(ctx, peft_model, batch) -> Tensor | None``: a term added to the task loss at every training
   step (e.g. a stability loss). Default: none.
3. ``make_optimizer(ctx, peft_model, params, lr) -> Optimizer | None``: a custom optimizer for the trainable
   ``params``. Default: None, the runner's AdamW.
4. ``end_of_task(ctx, peft_model)``: after training, before the merge (e.g. update a history of updates,
   grow GORP subspaces). Default: nothing.
5. ``merge(ctx, peft_model) -> nn.Module``: fold the adapter into the weights and return the plain model the
   next stage starts from. Default: PEFT's ``merge_and_unload()``.

State that must survive between stages (and a ``--resume``) goes in ``ctx.state``, a dict owned by the
method: the runner saves it in every checkpoint with ``torch.save`` (tensors, numbers, strings, lists, dicts
only) and hands the same dict back at the next stage. Methods must draw random numbers from generators
seeded by ``ctx.seed`` and ``ctx.stage``, never the global RNG, so a resumed run equals an uninterrupted one.

Registering a method (engineers C and D do this from their own modules)::

    from slice_kernels.runner.methods import Method, register

    class MyMethod(Method):
        def extra_loss(self, ctx, peft_model, batch): ...

    register("my_method", MyMethod)        # a factory: called with no arguments, once per run

``ctx`` is a ``StageContext`` (fields below). ``ctx.collect_gradients(batches)`` averages float32
gradients of the target weights over batches (sharded across ranks under torchrun), ``ctx.replay`` holds
the replay batches of every earlier task, ``ctx.lora`` the rank/alpha/targets.
"""
from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[[], "Method"]] = {}

# Modules that register methods on import; imported lazily so a missing or broken one does not take the
# runner down (its methods are then simply not listed, and the import error is shown when asked for).
_PLUGIN_MODULES = ("slice_kernels.stability", "slice_kernels.gorp")
_PLUGIN_ERRORS: dict[str, str] = {}

# Options a run may pass to its methods (``RunConfig.method_options``, CLI ``--method-option KEY=VALUE``),
# beside every ``SliceConfig`` field (read by the init methods). A name outside this table is an error, so
# a typo never silently leaves a method on its default.
METHOD_OPTIONS = {
    "ps_lambda": "PS-LoRA: λ, weight of the stability loss (1.0)",
    "ps_alpha": "PS-LoRA: α, tanh sharpness α/rms(H) (1.0)",
    "ps_beta": "PS-LoRA: β, weight of the magnitude term (0.1)",
    "ps_mode": "PS-LoRA: 'tanh' (default) or 'hinge'",
    "ps_history": "PS-LoRA: history form 'factors' (default), 'dense' or 'bits'",
    "gorp_full_rank": "GORP: module patterns trained full-rank (default the first of gate_proj/c_fc/fc1)",
    "gorp_rank": "GORP: projection rank (default the LoRA rank)",
    "gorp_scale": "GORP: update scale of the full-rank weights (0.25)",
    "gorp_gap": "GORP: projector refresh period T in steps (10)",
    "gorp_energy": "GORP: explained energy kept when a shared space grows (0.9)",
}


# SliceConfig fields the runner sets itself at every stage: passing them as method options would clash
# (a TypeError deep in the run), so they are refused up front with the run option to use instead.
RUNNER_SET_FIELDS = {
    "method": "--methods (the init method is the method's name)",
    "seed": "--seed (the init seed is derived from it and the stage)",
    "current_steps": "grad_batches (S_cur, the current-task gradient batches)",
    "replay_steps": "replay_batches (S_prev, the replay batches per earlier task)",
}


def check_method_options(options: dict) -> None:
    """Refuse unknown keys, keys the runner sets itself, and bad SliceConfig values, before any work."""
    from ..config import SliceConfig

    known = set(METHOD_OPTIONS) | set(SliceConfig.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise ValueError(f"unknown method option(s) {bad}; known: {sorted(known - set(RUNNER_SET_FIELDS))}")
    owned = sorted(set(options) & set(RUNNER_SET_FIELDS))
    if owned:
        raise ValueError(f"method option(s) {owned} are set by the runner; use "
                         + "; ".join(f"{k}: {RUNNER_SET_FIELDS[k]}" for k in owned))
    SliceConfig(**{k: v for k, v in options.items() if k in SliceConfig.__dataclass_fields__})  # names a bad value


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]

    def scaling(self) -> float:
        return self.alpha / self.rank**0.5 if self.use_rslora else self.alpha / self.rank


@dataclass
class StageContext:
    """What a method sees at stage ``stage`` (1-based) of a run."""

    model: nn.Module  # W^(t-1); init_adapter wraps it
    stage: int
    task_name: str
    current: list  # gradient batches of the current task (dicts for model(**batch))
    replay: list  # one list of batches per earlier task, oldest first ([] at stage 1)
    lora: LoraSettings
    seed: int
    state: dict  # the method's own persistent state (saved in checkpoints)
    collect_gradients: Callable[[list], dict]  # batches -> {module name: float32 (out, in) gradient}
    loss_fn: Callable[[nn.Module, dict], torch.Tensor]
    options: dict = field(default_factory=dict)  # method options from the run config (e.g. svd, scope)
    world_size: int = 1
    rank: int = 0


class Method(abc.ABC):
    """Base class: every hook has the default described in the module docstring, except ``init_adapter``,
    which a method must define (a subclass without it cannot be instantiated)."""

    name = "method"

    @abc.abstractmethod
    def init_adapter(self, ctx: StageContext):
        """Wrap ``ctx.model`` with an initialized adapter: return ``(peft_model, report_dict)``."""

    def extra_loss(self, ctx: StageContext, peft_model, batch) -> torch.Tensor | None:
        return None

    def make_optimizer(self, ctx: StageContext, peft_model, params, lr: float):
        return None

    def end_of_task(self, ctx: StageContext, peft_model) -> None:
        return None

    def merge(self, ctx: StageContext, peft_model) -> nn.Module:
        return peft_model.merge_and_unload()


def register(name: str, factory: Callable[[], Method], *, overwrite: bool = False) -> None:
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(f"method name {name!r} must be a non-empty string without commas")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"method {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def _load_plugins() -> None:
    import importlib

    for mod in _PLUGIN_MODULES:
        if mod in _PLUGIN_ERRORS:
            continue
        try:
            importlib.import_module(mod)
            _PLUGIN_ERRORS[mod] = ""
        except ModuleNotFoundError as e:
            _PLUGIN_ERRORS[mod] = "" if e.name == mod else f"{type(e).__name__}: {e}"
        except Exception as e:  # a plugin bug must not hide the built-in methods
            _PLUGIN_ERRORS[mod] = f"{type(e).__name__}: {e}"


def available() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    _load_plugins()
    if name not in _REGISTRY:
        broken = {m: e for m, e in _PLUGIN_ERRORS.items() if e}
        hint = f" (plugin modules that failed to import: {broken})" if broken else ""
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}{hint}")
    m = _REGISTRY[name]()
    m.name = name
    return m


# Built-in methods (SPEC §1 baselines and SLICE) are defined in init_methods.py and registered here.
from . import init_methods as _init_methods  # noqa: E402,F401
