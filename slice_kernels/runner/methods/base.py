"""The method interface of the runner, its registry, and the options a run passes to its methods.

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

And two checks, called for every method of the run before the first stage of any method, so a run fails
before it has spent time on the earlier methods: ``check_config(cfg)`` before the model is loaded (the run
options a method needs in a certain relation, e.g. a replay batch size that fits the replay buffer), and
``check_model(model, lora, options)`` once it is loaded (a rank too large for a layer, a target it lacks).
Both raise ``RunnerError``.

State that must survive between stages (and a ``--resume``) goes in ``ctx.state``, a dict owned by the
method: the runner saves it in every checkpoint (tensors, numpy arrays, numbers, strings, booleans, None,
lists, tuples and dicts only: the checkpoint format stores data, never code) and hands the same dict back at
the next stage. Methods draw random numbers from generators seeded by
``ctx.seed`` and ``ctx.stage``, never the global RNG, so a resumed run equals an uninterrupted one.

Options. A method declares the run options it reads, with their defaults, in its class attribute
``options = {"my_lambda": Option(1.0, number(minimum=0), "what it does")}`` and reads them with
``self.option(ctx, name)``. The converter also validates: it raises ``ValueError`` saying what the value must
be (``number``, ``positive_int`` and ``one_of`` below do). A run may set any declared option of a method it
runs, or any ``SliceConfig`` field (``--method-option KEY=VALUE``); anything else, and any value a converter
refuses, is refused before the model is loaded.

Registering a method::

    from slice_kernels.runner.methods import Method, Option, register

    class MyMethod(Method):
        options = {"my_lambda": Option(1.0, float, "weight of my extra loss")}

        def init_adapter(self, ctx): ...
        def extra_loss(self, ctx, peft_model, batch):
            return self.option(ctx, "my_lambda") * ...

    register("my_method", MyMethod)        # a factory: called with no arguments, once per run

``ctx`` is a ``StageContext`` (fields below). ``ctx.collect_gradients(batches)`` averages float32
gradients of the target weights over batches (sharded across ranks under torchrun), ``ctx.replay`` holds
the replay batches of every earlier task, ``ctx.lora`` the rank/alpha/targets.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ...slice_init.config import SliceConfig
from ..errors import RunnerError

_REGISTRY: dict[str, Callable[[], "Method"]] = {}

# SliceConfig fields the runner sets itself at every stage: passing them as method options would clash, so
# they are refused up front with the run option to use instead.
RUNNER_SET_FIELDS = {
    "method": "--methods (the init method is the method's name)",
    "seed": "--seed (the init seed is derived from it and the stage)",
    "current_steps": "grad_batches (S_cur, the current-task gradient batches)",
    "replay_steps": "replay_batches (S_prev, the replay batches per earlier task)",
}


@dataclass(frozen=True)
class Option:
    """A run option a method reads: its default (None: the method computes one), how a given value is
    converted, and a line of help."""

    default: Any
    convert: Callable[[Any], Any] = lambda v: v
    help: str = ""


def number(*, minimum: float | None = None, above: float | None = None, maximum: float | None = None):
    """A converter to a finite float within bounds (``above``: strictly greater than)."""

    def convert(v) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"must be a number, got {type(v).__name__} {v!r}")
        try:
            x = float(v)
        except OverflowError:
            raise ValueError("is too large") from None
        if not math.isfinite(x):
            raise ValueError("must be finite")
        if minimum is not None and x < minimum:
            raise ValueError(f"must be ≥ {minimum:g}")
        if above is not None and x <= above:
            raise ValueError(f"must be > {above:g}")
        if maximum is not None and x > maximum:
            raise ValueError(f"must be ≤ {maximum:g}")
        return x

    return convert


def positive_int(v) -> int:
    """A converter to an int ≥ 1 that refuses what ``int`` would round (2.7) or reinterpret (True)."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"must be a positive integer, got {v!r}")
    return v


def one_of(*choices: str):
    def convert(v) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return v

    return convert


@dataclass
class LoraSettings:
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str]


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
    progress: bool = False  # show progress bars (gradient collection) on this rank
    fsdp: bool = False  # the stage runs on an FSDP2-sharded copy of the model (runner/fsdp.py)


class Method(abc.ABC):
    """Base class: every hook has the default described in the module docstring, except ``init_adapter``,
    which a method must define (a subclass without it cannot be instantiated)."""

    name = "method"
    options: dict[str, Option] = {}

    @abc.abstractmethod
    def init_adapter(self, ctx: StageContext):
        """Wrap ``ctx.model`` with an initialized adapter: return ``(peft_model, report_dict)``."""

    def option(self, ctx: StageContext, name: str):
        """The value of this method's option ``name`` in this run (its declared default when unset)."""
        opt = self.options[name]
        value = ctx.options.get(name, opt.default)
        return value if value is None else opt.convert(value)

    def check_config(self, cfg) -> None:
        return None

    def check_model(self, model: nn.Module, lora: LoraSettings, options: dict) -> None:
        return None

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
        raise RunnerError(f"method name {name!r} must be a non-empty string without commas")
    if name in _REGISTRY and not overwrite:
        raise RunnerError(f"method {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    if name not in _REGISTRY:
        raise RunnerError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    m = _REGISTRY[name]()
    m.name = name
    return m


def declared_options() -> dict[str, Option]:
    """Every option a registered method declares (a factory that is not a ``Method`` class may carry an
    ``options`` attribute of its own)."""
    out: dict[str, Option] = {}
    for factory in _REGISTRY.values():
        out.update(getattr(factory, "options", {}) or {})
    return out


def _owners() -> dict[str, list[str]]:
    owners: dict[str, list[str]] = {}
    for name, factory in sorted(_REGISTRY.items()):
        for opt in getattr(factory, "options", {}) or {}:
            owners.setdefault(opt, []).append(name)
    return owners


def check_method_options(options: dict, methods: list[str] | None = None) -> None:
    """Refuse, before any work: unknown keys, keys the runner sets itself, options of methods the run does not
    include (``methods``; they would do nothing), values an option's converter refuses, bad SliceConfig values."""
    declared = declared_options()
    known = set(declared) | set(SliceConfig.__dataclass_fields__)
    bad = sorted(set(options) - known)
    if bad:
        raise RunnerError(f"unknown method option(s) {bad}; known: {sorted(known - set(RUNNER_SET_FIELDS))}")
    owned = sorted(set(options) & set(RUNNER_SET_FIELDS))
    if owned:
        raise RunnerError(
            f"method option(s) {owned} are set by the runner; use "
            + "; ".join(f"{k}: {RUNNER_SET_FIELDS[k]}" for k in owned)
        )
    if methods is not None:
        owners = _owners()
        idle = {k: owners[k] for k in sorted(options) if k in owners and not set(owners[k]) & set(methods)}
        if idle:
            raise RunnerError(
                "method option(s) for methods this run does not include: "
                + "; ".join(f"{k} is read by {', '.join(v)}" for k, v in idle.items())
                + f" (--methods {','.join(methods)}); add the method or drop the option"
            )
    for k in sorted(set(options) & set(declared)):
        try:
            declared[k].convert(options[k])
        except (TypeError, ValueError) as e:
            raise RunnerError(
                f"method option {k}={options[k]!r}: {e} ({declared[k].help}); fix the value of --method-option {k}"
            ) from None
    SliceConfig(**{k: v for k, v in options.items() if k in SliceConfig.__dataclass_fields__})  # names a bad value
