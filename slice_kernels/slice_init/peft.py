"""The drop-in for transformers + PEFT: ``get_slice_model`` and the saving helpers.

``get_slice_model`` validates everything and computes the whole init (gradients, surgery, SVD, scales)
on the untouched model first; only then does it wrap the model with PEFT and write A, B and the absorbed W.
A bad input therefore raises with the model exactly as it was.

Saving, the way PEFT users know it from PiSSA/OLoRA/LoRA-GA (the init changes the base weights, so the
trained adapter alone does not fit the original model):

* ``save_initial_adapter(peft_model, init_dir)`` right after ``get_slice_model``, before training;
* after training, ``save_as_lora(peft_model, out_dir, init_dir)`` (PEFT's
  ``save_pretrained(..., path_initial_model_for_weight_conversion=init_dir)``): a plain LoRA of rank 2r,
  ΔW = s·B·A − s·B₀·A₀ = [B | −B₀]·[A; A₀] with α adjusted so the scaling is unchanged, which loads with
  ``PeftModel.from_pretrained`` on the original, untouched base model;
* or ``peft_model.merge_and_unload()``: the absorbed W plus s·B·A, i.e. the original W plus the update.
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from .. import distributed
from ..errors import SliceInitError
from ..modules import is_conv1d, resolve_targets, weight_out_in
from .collect import BatchStream, collect_gradients, collect_replay_gradients, replay_streams
from .config import SliceConfig
from .factors import absorb_
from .init import init_from_gradients, validate_finite_weights, validate_ranks
from .report import InitReport, InitResult, timed_phase

_HALF = (torch.float16, torch.bfloat16)


def _check_lora_config(lora_config):
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise SliceInitError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if getattr(lora_config, "use_dora", False):
        raise SliceInitError(
            "LoraConfig.use_dora=True is not supported: DoRA's magnitude is computed from W, which "
            "the SLICE init changes; use plain LoRA (use_dora=False)"
        )
    if getattr(lora_config, "rank_pattern", None) or getattr(lora_config, "alpha_pattern", None):
        raise SliceInitError(
            "LoraConfig.rank_pattern/alpha_pattern are not supported: SLICE uses one rank and "
            "alpha for every target; drop the patterns (or init the groups in separate calls)"
        )
    if getattr(lora_config, "target_parameters", None):
        raise SliceInitError("LoraConfig.target_parameters is not supported; target modules (Linear/Conv1D) only")
    r = lora_config.r
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise SliceInitError(f"LoraConfig.r={r!r} must be a positive integer")


def _refuse_shared_weights(model: nn.Module, targets: dict) -> None:
    """A target whose weight tensor is also held by another module (tied lm_head/embeddings, two Linear layers
    sharing a weight) cannot take the offset W − s·B·A: the other holder sees the changed W without the adapter
    that adds s·B·A back, so the model's outputs would change at initialization."""
    holders: dict = {}
    for name, mod in model.named_modules():  # each module object once, so a shared module is one holder
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    for n, m in targets.items():
        others = [h for h in holders.get(id(m.weight), []) if h != n]
        if others:
            raise SliceInitError(
                f"target layer {n!r} shares its weight tensor with {others[:3]} (tied weights): the init absorbs "
                f"W − s·B·A into that shared tensor, which would change the outputs of the other module(s). Drop "
                f"{n!r} from target_modules (or untie the weights), or use method='lora' (no offset)"
            )


def _adapter_dtypes(weights, method: str, autocast_adapter_dtype: bool) -> dict:
    # What PEFT itself does: adapters of fp16/bf16 layers are float32 when autocast_adapter_dtype (its
    # default); LoRA-GA in PEFT casts A and B to the base weight's dtype.
    out = {}
    for n, w in weights.items():
        if method == "lora_ga_peft":
            out[n] = w.dtype
        elif w.dtype in _HALF:
            out[n] = torch.float32 if autocast_adapter_dtype else w.dtype
        else:
            out[n] = w.dtype
    return out


def check_init_targets(model: nn.Module, lora_config, slice_config: SliceConfig) -> dict[str, nn.Module]:
    """Every refusal of ``get_slice_model`` that needs only the model and the configs (no batch, no collective):
    bad configs, LoRA layers already present, targets matching nothing, a rank too large for a layer, a target
    sharing its weight with another module. Returns the target modules. The runner calls it for every method
    of a run before the first stage."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(slice_config, SliceConfig):
        raise SliceInitError(f"slice_config must be a SliceConfig, got {type(slice_config).__name__}")
    slice_config.validate()
    _check_lora_config(lora_config)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise SliceInitError(
            "the model already has LoRA layers: merge them first (merge_and_unload()) so the "
            "model is at W^(t-1), or pass the base model"
        )
    targets = resolve_targets(model, lora_config)  # PEFT's own matching rules
    validate_ranks({n: weight_out_in(m) for n, m in targets.items()}, lora_config.r, slice_config)
    if slice_config.method != "lora":  # every other method absorbs an offset into W
        _refuse_shared_weights(model, targets)
    return targets


def get_slice_model(
    model: nn.Module,
    lora_config,
    slice_config: SliceConfig | None = None,
    current=None,
    replay=None,
    loss_fn=None,
    *,
    adapter_name: str = "default",
    progress: bool = False,
    autocast_adapter_dtype: bool = True,
):
    """Wrap ``model`` with PEFT LoRA adapters initialized by SLICE or a baseline (SPEC §1).

    Args:
        model: a transformers model (or any module with Linear/Conv1D layers) at W^(t−1).
        lora_config: ``peft.LoraConfig``; r, lora_alpha, use_rslora, target_modules, lora_dropout are used.
            Its ``init_lora_weights`` is ignored (the adapter is written by SLICE; the saved config says True,
            which is what PEFT's conversion to plain LoRA expects).
        slice_config: ``SliceConfig`` (default: the paper's SLICE settings).
        current: iterable of batches of task t (needed by slice / lora_ga / lora_ga_peft); the first
            ``slice_config.current_steps`` are used. Batches are dicts for ``model(**batch)`` with ``labels``.
        replay: earlier tasks' batches for "slice": a list with one iterable per earlier task, oldest first
            (``replay_mode="per_task"``) or one iterable (``replay_mode="pooled"``); None at task 1.
            Ignored by the other methods. ``slice_config.retain_batch_size`` regroups its rows into batches of
            that size; ``slice_config.single_retain_task_mode`` replays its last entry only, with
            ``current_steps`` batches.
        loss_fn: optional ``loss_fn(model, batch) -> scalar loss``.
        adapter_name: the PEFT adapter name.
        progress: tqdm bars during collection.
        autocast_adapter_dtype: PEFT's switch (float32 adapters on fp16/bf16 models).

    Returns:
        the ``PeftModel``, with the ``InitReport`` as ``peft_model.slice_init_report``. Its outputs equal the
        original model's at initialization (up to rounding of W − s·B·A in W's dtype).

    Raises:
        SliceInitError (and subclasses) with the model unmodified.
    """

    slice_config = slice_config if slice_config is not None else SliceConfig()
    targets = check_init_targets(model, lora_config, slice_config)
    cfg = copy.deepcopy(lora_config)
    cfg.init_lora_weights = True
    r = cfg.r
    weights = {n: weight_out_in(m).detach() for n, m in targets.items()}
    # before any batch runs: a NaN weight would otherwise surface as a NaN gradient of some other layer; and
    # before the collective check, where NaN ≠ NaN would read as "the ranks hold different weights"
    validate_finite_weights(weights)
    if not distributed.same_on_all_ranks(list(weights.values())):  # collective; same answer on every rank
        raise SliceInitError(
            "the ranks hold different weights for the target layers: every rank must start from "
            "the same W^(t-1) (load the same checkpoint, merge the same adapters) before the init"
        )

    g_cur = g_prev = None
    collected = InitReport(method=slice_config.method)  # holds the collection phases until the init's report
    kw = dict(offload=slice_config.offload_gradients, progress=progress, train_mode=slice_config.collect_train_mode)
    if slice_config.uses_gradients:
        if current is None:
            raise SliceInitError(f"method {slice_config.method!r} needs the current task's batches (current=...)")
        # both sources are validated before any forward pass (no batch is consumed)
        BatchStream(current, slice_config.current_steps, 1.0, "current-task batches")
        replay_given = slice_config.uses_replay and replay is not None
        replay_kw = dict(batch_size=slice_config.retain_batch_size, last_task_only=slice_config.single_retain_task_mode)
        replay_steps = slice_config.effective_replay_steps
        if replay_given:
            replay_given = bool(replay_streams(replay, replay_steps, slice_config.replay_mode, **replay_kw))
        device = next(iter(targets.values())).weight.device
        with timed_phase(collected, "collect_current", device):
            g_cur = collect_gradients(model, targets, current, slice_config.current_steps, loss_fn, **kw)
        if replay_given:
            with timed_phase(collected, "collect_replay", device):
                g_prev = collect_replay_gradients(
                    model, targets, replay, replay_steps, slice_config.replay_mode, loss_fn, **kw, **replay_kw
                )

    res = init_from_gradients(
        weights,
        g_cur,
        g_prev,
        r=r,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        config=slice_config,
        adapter_dtype=_adapter_dtypes(weights, slice_config.method, autocast_adapter_dtype),
        inplace_gradients=True,
        absorb=False,
        fan_in_fan_out=[n for n, m in targets.items() if is_conv1d(m)],
    )
    del g_cur, g_prev
    res.report.phases = {**collected.phases, **res.report.phases}
    names = list(targets)
    distributed.make_identical_([res.A[n] for n in names] + [res.B[n] for n in names])

    # ---- everything is validated and computed: from here on the model is modified ----
    return install_init(
        model, cfg, targets, res, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )


def install_init(
    model: nn.Module,
    lora_config,
    targets: dict,
    result: InitResult,
    *,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
):
    """The one path from an ``InitResult`` into a PEFT model: wrap ``model`` with ``lora_config`` and write each
    target's A and B and, where the init has an offset, W − s·B·A in place. ``targets`` are the modules the
    result was computed for (``resolve_targets``); call it only after everything is validated."""
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    peft_model = get_peft_model(
        model, lora_config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )
    by_base = {id(m.get_base_layer()): m for m in peft_model.modules() if isinstance(m, LoraLayer)}
    for n, base in targets.items():
        layer = by_base[id(base)]
        dev = base.weight.device
        with torch.no_grad():
            layer.lora_A[adapter_name].weight.data = result.A[n].to(dev).contiguous()
            layer.lora_B[adapter_name].weight.data = result.B[n].to(dev).contiguous()
            if result.report.layers[n].get("offset", False):
                absorb_(weight_out_in(base), result.B[n].to(dev), result.A[n].to(dev), result.scaling)
    peft_model.slice_init_report = result.report
    return peft_model


def _check_save_names(peft_model, initial_path: str, adapter_name: str) -> None:
    # PEFT saves a non-default adapter into a subfolder named after it, and loads the initial adapter under the
    # name basename(initial_path) for the conversion: both must fit or the conversion reads the wrong files.
    if adapter_name not in peft_model.peft_config:
        raise SliceInitError(f"no adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}")
    if adapter_name != "default":
        raise SliceInitError(
            f"saving with conversion supports the adapter named 'default' (got {adapter_name!r}); "
            f"create the model with get_slice_model(..., adapter_name='default')"
        )
    base = os.path.basename(os.path.normpath(initial_path))
    if not base or base in peft_model.peft_config:
        raise SliceInitError(
            f"initial adapter path {initial_path!r}: its last component {base!r} is used by PEFT "
            f"as a temporary adapter name and must not be empty or an existing adapter's name; "
            f"use e.g. '<run>/slice_init'"
        )


def save_initial_adapter(peft_model, path: str, adapter_name: str = "default") -> None:
    """Save the adapter as initialized (before training), for ``save_as_lora`` later. ``path``'s last
    component is used by PEFT as a temporary adapter name, so make it a plain word (e.g. ``.../slice_init``)."""
    _check_save_names(peft_model, path, adapter_name)
    cfg = peft_model.peft_config[adapter_name]
    if cfg.init_lora_weights is not True:
        raise SliceInitError(
            f"adapter {adapter_name!r} has init_lora_weights={cfg.init_lora_weights!r}; the "
            f"initial adapter must be saved with True (get_slice_model sets it)"
        )
    peft_model.save_pretrained(path, selected_adapters=[adapter_name])


def save_as_lora(peft_model, out_dir: str, initial_path: str, adapter_name: str = "default", **kwargs) -> None:
    """Save the trained adapter as a plain rank-2r LoRA that loads on the original, untouched base model
    (PEFT's ``path_initial_model_for_weight_conversion``). ``initial_path`` is what ``save_initial_adapter``
    wrote."""
    _check_save_names(peft_model, initial_path, adapter_name)
    if not os.path.isdir(initial_path):
        raise SliceInitError(
            f"initial adapter {initial_path!r} not found; call save_initial_adapter(peft_model, "
            f"path) right after get_slice_model, before training"
        )
    peft_model.save_pretrained(
        out_dir, selected_adapters=[adapter_name], path_initial_model_for_weight_conversion=initial_path, **kwargs
    )
