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

An init with an offset marks the adapter's config (``artifacts.py``): every plain save of it (Trainer and TRL
checkpoints too) is refused by ``PeftModel.from_pretrained`` with a message naming ``slice-kernels convert``
(offline: ``convert_adapter``) and the ``SliceSaveCallback``; converted adapters carry no mark.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import torch
from torch import nn

from .. import distributed
from ..errors import SliceInitError
from ..init_offsets import attach_init_offset
from ..modules import is_conv1d, resolve_targets, weight_out_in
from ..wrappers import refuse_wrapped_model
from . import grad_cache
from .artifacts import check_out_dir, convert_adapter, mark_changed_base, parse_mark
from .batches import as_batches
from .collect import BatchStream, collect_gradients, collect_replay_gradients, replay_streams
from .config import SliceConfig
from .factors import absorb_
from .init import init_from_gradients, validate_finite_weights, validate_ranks
from .peft_options import slice_config_for
from .report import InitReport, InitResult, timed_phase

_HALF = (torch.float16, torch.bfloat16)


def check_lora_config(lora_config):
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


def refuse_shared_weights(model: nn.Module, targets: dict) -> None:
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


def autocasts_adapter_dtype(method: str, autocast_adapter_dtype: bool = True) -> bool:
    """Whether adapters of fp16/bf16 layers are float32, as PEFT makes them: when autocast_adapter_dtype (its
    default), except LoRA-GA, which PEFT casts to the base weight's dtype. Every path that wraps a model for an
    init (here, and the runner's sharded stages) asks this, so their adapters agree."""
    return autocast_adapter_dtype and method != "lora_ga_peft"


def _adapter_dtypes(weights, method: str, autocast_adapter_dtype: bool) -> dict:
    up = autocasts_adapter_dtype(method, autocast_adapter_dtype)
    return {n: torch.float32 if up and w.dtype in _HALF else w.dtype for n, w in weights.items()}


def check_init_targets(
    model: nn.Module, lora_config, slice_config: SliceConfig, *, strict_targets: bool = False
) -> dict[str, nn.Module]:
    """Every refusal of ``get_slice_model`` that needs only the model and the configs (no batch, no collective):
    bad configs, a LoraConfig init option that would be ignored or conflicts with ``slice_config``
    (``peft_options.slice_config_for``), LoRA layers already present, targets matching nothing, quantized targets,
    a rank too large for a layer, a target sharing its weight with another module. Returns the target modules:
    matched modules SLICE cannot initialize but PEFT wraps (embeddings, Conv2d) are left out with a warning, or
    refused with ``strict_targets=True``. The runner calls it for every method of a run before the first stage."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(slice_config, SliceConfig):
        raise SliceInitError(f"slice_config must be a SliceConfig, got {type(slice_config).__name__}")
    slice_config.validate()
    check_lora_config(lora_config)
    slice_config_for(lora_config, slice_config)  # init_lora_weights / lora_ga_config against slice_config
    if not isinstance(strict_targets, bool):
        raise SliceInitError(f"strict_targets={strict_targets!r} must be True or False")
    refuse_wrapped_model(model)  # DDP / accelerate's prepare: the init must come first (slice_kernels/wrappers.py)
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise SliceInitError(
            "the model already has LoRA layers: merge them first (merge_and_unload()) so the "
            "model is at W^(t-1), or pass the base model"
        )
    targets = resolve_targets(model, lora_config, skip_unsupported=not strict_targets)  # PEFT's own matching rules
    validate_ranks({n: weight_out_in(m) for n, m in targets.items()}, lora_config.r, slice_config)
    if slice_config.method != "lora":  # every other method absorbs an offset into W
        refuse_shared_weights(model, targets)
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
    strict_targets: bool = False,
    gradient_cache: str | os.PathLike | None = None,
    data_collator=None,
    batch_size: int | None = None,
):
    """Wrap ``model`` with PEFT LoRA adapters initialized by SLICE or a baseline (SPEC §1).

    Args:
        model: a transformers model (or any module with Linear/Conv1D layers) at W^(t−1).
        lora_config: ``peft.LoraConfig``; r, lora_alpha, use_rslora, target_modules, lora_dropout are used.
            ``init_lora_weights``: True (PEFT's default) leaves the init to ``slice_config``; "lora_ga" with
            ``lora_ga_config=LoraGAConfig(...)`` runs PEFT's LoRA-GA (method "lora_ga_peft", every LoraGAConfig
            field mapped to ``SliceConfig.peft_*``); any other value is refused (docs/peft_compat.md). When the init
            changed base weights, the returned adapter's ``init_lora_weights`` holds slice-kernels' mark, so plain
            PEFT refuses its saves on the original model (docs/saving.md); PEFT's conversion resets it to True.
        slice_config: ``SliceConfig`` (default: the paper's SLICE settings, or the LoRA-GA preset that
            ``init_lora_weights="lora_ga"`` selects; an explicit one must then agree with it).
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
        strict_targets: refuse modules matched by ``target_modules`` that SLICE cannot initialize (embeddings,
            Conv2d); by default they are skipped with a warning, as PEFT's LoRA-GA does, and PEFT gives them
            its ordinary LoRA init (a zero update, no offset). Quantized targets are always refused.
        gradient_cache: a file path (safetensors). Missing: the gradients are collected and written there.
            Present: they are read from it instead of running the model (``current`` may then be None), after
            checking its fingerprint (targets, shapes, dtypes, weight checksums, which gradients, collection
            settings; ``grad_cache.gradient_fingerprint``); a cache for anything else is refused.
        data_collator: for ``current``/``replay`` sources that hold tokenized examples (a ``datasets.Dataset``,
            a list of ``{"input_ids": [...], ...}``) rather than collated batches: collates a list of examples
            into a batch, e.g. ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``. Collated sources (lists
            of batches, DataLoaders) are used as they are (docs/init.md, "Data you can pass").
        batch_size: examples per batch for ``data_collator`` (replay: ``slice_config.retain_batch_size`` when set).

    Returns:
        the ``PeftModel``, with the ``InitReport`` as ``peft_model.slice_init_report``. Its outputs equal the
        original model's at initialization (up to rounding of W − s·B·A in W's dtype).

    Raises:
        SliceInitError (and subclasses) with the model unmodified.
    """

    err = targets = weights = None
    try:  # distributed: a refusal on one rank is agreed by all before the first collective it would skip
        slice_config = slice_config_for(lora_config, slice_config)
        if gradient_cache is not None and distributed.active():
            raise SliceInitError(
                "gradient_cache is for single-process runs; collect (or load) the gradients in one process"
            )
        if gradient_cache is not None and not slice_config.uses_gradients:
            raise SliceInitError(
                f"gradient_cache is given but method {slice_config.method!r} uses no gradients; drop gradient_cache"
            )
        refuse_sharded(model)
        targets = check_init_targets(model, lora_config, slice_config, strict_targets=strict_targets)
        weights = {n: weight_out_in(m).detach() for n, m in targets.items()}
        # before any batch runs: a NaN weight would otherwise surface as a NaN gradient of some other layer; and
        # before the collective check, where NaN ≠ NaN would read as "the ranks hold different weights"
        validate_finite_weights(weights)
    except Exception as e:
        if not distributed.active():
            raise
        err = e
    distributed.agree(err, "checking the model and the configs")
    distributed.same_signature(
        [(n, tuple(w.shape), str(w.dtype)) for n, w in weights.items()], "the target layers (name, shape, dtype)"
    )
    cfg = copy.deepcopy(lora_config)
    cfg.init_lora_weights = True
    cfg.lora_ga_config = None  # read by PEFT only with "lora_ga"; the adapter is already written
    r = cfg.r
    if not distributed.same_on_all_ranks(list(weights.values())):  # collective; same answer on every rank
        raise SliceInitError(
            "the ranks hold different weights for the target layers: every rank must start from "
            "the same W^(t-1) (load the same checkpoint, merge the same adapters) before the init"
        )

    g_cur = g_prev = None
    collected = InitReport(method=slice_config.method)  # holds the collection phases until the init's report
    kw = dict(offload=slice_config.offload_gradients, progress=progress, train_mode=slice_config.collect_train_mode)
    cached = None
    if slice_config.uses_gradients and gradient_cache is not None and os.path.exists(gradient_cache):
        with timed_phase(collected, "load_gradient_cache", next(iter(targets.values())).weight.device):
            cached = _load_cache(gradient_cache, targets, slice_config, replay, loss_fn)
    if cached is not None:
        g_cur, g_prev = cached
    elif slice_config.uses_gradients:
        data_kw = dict(data_collator=data_collator, batch_size=batch_size)
        replay_given, replay_kw, replay_steps = check_sources(slice_config, current, replay, loss_fn=loss_fn, **data_kw)
        device = next(iter(targets.values())).weight.device
        with timed_phase(collected, "collect_current", device):
            g_cur = collect_gradients(model, targets, current, slice_config.current_steps, loss_fn, **kw, **data_kw)
        if replay_given:
            with timed_phase(collected, "collect_replay", device):
                g_prev = collect_replay_gradients(
                    model, targets, replay, replay_steps, slice_config.replay_mode, loss_fn, **kw, **replay_kw
                )
        if gradient_cache is not None:  # before the init: the surgery overwrites g_cur in place
            fp = grad_cache.gradient_fingerprint(targets, slice_config, replay=g_prev is not None, loss_fn=loss_fn)
            grad_cache.save_gradient_cache(os.fspath(gradient_cache), fp, g_cur, g_prev)

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
        layer_parallel=distributed.active(),
    )
    del g_cur, g_prev
    res.report.phases = {**collected.phases, **res.report.phases}
    names = list(targets)
    distributed.make_identical_([res.A[n] for n in names] + [res.B[n] for n in names])

    # ---- everything is validated and computed: from here on the model is modified ----
    return install_init(
        model, cfg, targets, res, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
    )


def _load_cache(path, targets: dict, slice_config: SliceConfig, replay, loss_fn):
    """(G_cur, G_prev) from a gradient cache whose fingerprint matches; ``replay`` given (non-empty) says the replay
    gradient is wanted, so a cache without one (or with one the call does not ask for) is refused."""
    empty = isinstance(replay, (list, tuple)) and len(replay) == 0
    wants_replay = slice_config.uses_replay and replay is not None and not empty
    fp = grad_cache.gradient_fingerprint(targets, slice_config, replay=wants_replay, loss_fn=loss_fn)
    where = "cpu" if slice_config.offload_gradients else None
    devices = {n: where or m.weight.device for n, m in targets.items()}
    return grad_cache.load_gradient_cache(os.fspath(path), fp, devices)


def check_sources(slice_config: SliceConfig, current, replay, *, loss_fn=None, data_collator=None, batch_size=None):
    """Both batch sources validated before any forward pass (no batch is consumed; examples are collated once to
    check the collator); agreed across ranks. Returns (replay_given, replay keyword arguments, replay steps)."""
    err = None
    replay_kw = dict(
        batch_size=slice_config.retain_batch_size,
        last_task_only=slice_config.single_retain_task_mode,
        data_collator=data_collator,
        example_batch_size=batch_size,
    )
    needs_labels = loss_fn is None
    replay_steps = slice_config.effective_replay_steps
    replay_given = False
    try:
        if current is None:
            raise SliceInitError(f"method {slice_config.method!r} needs the current task's batches (current=...)")
        steps = slice_config.current_steps
        current, label = as_batches(
            current,
            "current-task batches",
            data_collator=data_collator,
            batch_size=batch_size,
            needs_labels=needs_labels,
            steps=steps,
        )
        BatchStream(current, steps, 1.0, label)
        replay_given = slice_config.uses_replay and replay is not None
        if replay_given:
            streams = replay_streams(
                replay, replay_steps, slice_config.replay_mode, **replay_kw, needs_labels=needs_labels
            )
            replay_given = bool(streams)
    except Exception as e:
        if not distributed.active():
            raise
        err = e
    distributed.agree(err, "checking the batches")
    # every rank must collect the same gradient sets, or the all-reduce of one would meet the other's
    distributed.same_signature(bool(replay_given), "whether replay batches were given")
    return replay_given, replay_kw, replay_steps


def refuse_sharded(model: nn.Module) -> None:
    """``get_slice_model`` wraps the model with PEFT after the init; on an FSDP2-sharded model the new LoRA
    parameters would sit outside FSDP (their gradients never reduced across ranks). Point to the sharded order."""
    from .shard_layout import is_dtensor

    zero3 = [n for n, p in model.named_parameters() if hasattr(p, "ds_id")]
    if zero3:
        # ZeRO-3 keeps an empty placeholder in p.data outside its gather contexts: the hooks would see no gradient.
        # DeepSpeed cannot be installed and run on the CPU machine the package is tested on, so no sharded-
        # accumulator path is offered for it (docs/distributed.md)
        raise SliceInitError(
            f"the model's parameters are DeepSpeed ZeRO-3 partitions (e.g. {zero3[0]!r} has ds_id): the SLICE init "
            f"does not run on them. Use FSDP2 instead (peft.get_peft_model, fully_shard, then "
            f"slice_kernels.init_sharded_; docs/distributed.md), or run get_slice_model on the model before "
            f"deepspeed.initialize / outside zero.Init and hand the PEFT model to DeepSpeed afterwards"
        )
    sharded = [n for n, p in model.named_parameters() if is_dtensor(p)]
    if sharded:
        raise SliceInitError(
            f"the model's parameters are FSDP2-sharded DTensors (e.g. {sharded[0]!r}); get_slice_model would add "
            f"LoRA parameters outside FSDP. Use the sharded order instead: peft.get_peft_model(model, lora_config), "
            f"then fully_shard the PEFT model, then slice_kernels.init_sharded_(peft_model, slice_config, current, "
            f"replay) (docs/distributed.md)"
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
                # kept on the layer so PS-LoRA sees the true update s·(B·A − B₀·A₀) with no hand extraction
                attach_init_offset(
                    layer,
                    adapter_name,
                    layer.lora_B[adapter_name].weight.data,
                    layer.lora_A[adapter_name].weight.data,
                    result.scaling,
                )
    if any(result.report.layers[n].get("offset", False) for n in targets):
        # every later save_pretrained (Trainer/TRL checkpoints too) records that the base was changed
        mark_changed_base(peft_model, adapter_name, result.report.method)
    peft_model.slice_init_report = result.report
    return peft_model


def _check_save_names(peft_model, initial_path: str, adapter_name: str) -> None:
    # PEFT saves a non-default adapter into a subfolder named after it, which the conversion (convert_adapter,
    # reading the folder's top) would not find
    if adapter_name not in peft_model.peft_config:
        raise SliceInitError(f"no adapter named {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}")
    if adapter_name != "default":
        raise SliceInitError(
            f"saving with conversion supports the adapter named 'default' (got {adapter_name!r}); "
            f"create the model with get_slice_model(..., adapter_name='default')"
        )


def save_initial_adapter(peft_model, path: str, adapter_name: str = "default") -> None:
    """Save the adapter as initialized (before training), for ``save_as_lora`` later. ``path``'s last
    component is used by PEFT as a temporary adapter name, so make it a plain word (e.g. ``.../slice_init``)."""
    _check_save_names(peft_model, path, adapter_name)
    cfg = peft_model.peft_config[adapter_name]
    if cfg.init_lora_weights is not True and parse_mark(cfg.init_lora_weights) is None:
        raise SliceInitError(
            f"adapter {adapter_name!r} has init_lora_weights={cfg.init_lora_weights!r}; the initial adapter must "
            f"be saved with True or slice-kernels' changed-base mark (get_slice_model sets them)"
        )
    # the saved config keeps the mark, so loading the initial adapter on the original model is refused too
    peft_model.save_pretrained(path, selected_adapters=[adapter_name])


def save_as_lora(peft_model, out_dir: str, initial_path: str, adapter_name: str = "default", **kwargs) -> None:
    """Save the trained adapter as a plain rank-2r LoRA that loads on the original, untouched base model (the
    tensors of PEFT's ``path_initial_model_for_weight_conversion``). ``initial_path`` is what
    ``save_initial_adapter`` wrote; it is checked against the fingerprint in the adapter's mark, and left as it
    is. The adapter is saved (``save_pretrained(**kwargs)``) to a temporary folder and converted from there by
    ``convert_adapter``, so both paths write the same files and make the same checks."""
    _check_save_names(peft_model, initial_path, adapter_name)
    if not kwargs.get("is_main_process", True):
        return  # as save_pretrained: only the main process writes (PEFT would leave the temporary folder empty)
    if not os.path.isdir(initial_path):
        raise SliceInitError(
            f"initial adapter {initial_path!r} not found; call save_initial_adapter(peft_model, "
            f"path) right after get_slice_model, before training"
        )
    check_out_dir(out_dir, (initial_path,))
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".trained-", dir=parent)
    try:
        peft_model.save_pretrained(tmp, selected_adapters=[adapter_name], **kwargs)
        convert_adapter(tmp, initial_path, out_dir)  # the 'default' adapter is saved at the folder's top
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
