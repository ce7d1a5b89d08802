"""Saving and loading the weights GORP trains full-rank beside a PEFT adapter.

A PEFT checkpoint (``save_pretrained``, and so every transformers Trainer checkpoint of a PEFT model) holds
the adapter only. The weights GORP trains full-rank (``gate_proj`` in the reference's recipe) are base-model
weights: without this module they are lost at every save, a resumed run starts them from the pre-trained
values and diverges, and an exported adapter misses half of what was trained.

What is saved: every trainable parameter of the model that the PEFT adapter state dict does not hold (by
storage, so whatever PEFT saves — LoRA factors, ``modules_to_save`` copies, trainable tokens — stays PEFT's),
under its base-model name: PEFT's ``base_model.model.`` prefix, DDP's ``module.`` and LoRA's ``.base_layer``
removed, so the names are the keys of the untouched base model's ``state_dict``. One safetensors file,
``gorp_full_rank.safetensors``, beside the adapter.

Loading checks every name, shape and dtype before it copies anything: a file for another model is refused
with the model untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import InvalidArgumentError, NotFoundError
from ..modules import PEFT_PREFIX, canonical_name

FULL_RANK_FILE = "gorp_full_rank.safetensors"
_FORMAT = "slice_kernels.gorp_full_rank/1"


class GorpCheckpointError(InvalidArgumentError):
    """A full-rank weights file does not fit the model it is loaded into (names, shapes, dtypes), or is missing."""


def base_name(name: str) -> str:
    """The base-model name of a parameter of a (PEFT, DDP-wrapped) model."""
    name = canonical_name(name)
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel / accelerate hold the user's model as .module; the weights are the same tensors
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def full_rank_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{base-model name: parameter} of the trainable weights a PEFT checkpoint does not hold.

    With ``build_gorp_optimizer`` these are the unfrozen full-rank weights (and any other base parameter the
    user unfroze). ``model`` must be a ``PeftModel`` (possibly wrapped by DDP/accelerate): a plain model's
    checkpoint already holds every weight.
    """
    model = _unwrap(model)
    if not _is_peft(model):
        raise GorpCheckpointError(
            f"full-rank weights are saved beside a PEFT adapter, but the model is a {type(model).__name__}, not a "
            f"peft.PeftModel: its own save_pretrained / Trainer checkpoint already holds every weight"
        )
    from peft.utils import get_peft_model_state_dict

    in_adapter = set()
    for adapter in model.peft_config:
        for t in get_peft_model_state_dict(model, adapter_name=adapter).values():
            in_adapter.add(t.data_ptr())
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.data_ptr() not in in_adapter:
            out[base_name(name)] = p
    return out


def _file(path: str) -> str:
    return os.path.join(path, FULL_RANK_FILE) if os.path.isdir(path) or not path.endswith(".safetensors") else path


def save_full_rank_weights(model: nn.Module, path: str, *, step: int | None = None) -> str:
    """Write the full-rank-trained weights of ``model`` (see ``full_rank_parameters``) to ``path`` (a directory,
    which gets ``gorp_full_rank.safetensors``, or a ``.safetensors`` file). ``step`` is recorded so a resume can
    check it read the checkpoint of the step it resumes. Returns the file written."""
    from safetensors.torch import save_file

    params = full_rank_parameters(model)
    if not params:
        raise GorpCheckpointError(
            "the model has no trainable weight outside its PEFT adapter, so there are no full-rank weights to save; "
            "build the GORP optimizer (build_gorp_optimizer unfreezes the full-rank weights) before saving"
        )
    file = _file(path)
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in params.items()}
    meta = {"format": "pt", "slice_kernels": _FORMAT}
    if step is not None:
        meta["global_step"] = str(int(step))
    tmp = file + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, file)  # a crash mid-write leaves the previous file, never a truncated one
    return file


def read_full_rank_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by ``save_full_rank_weights``."""
    from safetensors import safe_open

    file = _file(path)
    if not os.path.isfile(file):
        raise GorpCheckpointError(
            f"no GORP full-rank weights at {file!r}; they are written by save_full_rank_weights / "
            f"GorpCheckpointCallback (Trainer checkpoints of a run without the callback do not have them)"
        )
    with safe_open(file, framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("slice_kernels") != _FORMAT:
            raise GorpCheckpointError(f"{file!r} is not a GORP full-rank weights file (metadata {json.dumps(meta)})")
        return {k: f.get_tensor(k) for k in f.keys()}, meta


def _plan(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool, file: str):
    """Match every tensor of the file to a parameter of ``model``, checking names, shapes and dtypes."""
    if strict:
        targets = full_rank_parameters(model)
        missing = sorted(set(targets) - set(tensors))
        unexpected = sorted(set(tensors) - set(targets))
        if missing or unexpected:
            raise GorpCheckpointError(
                f"{file!r} does not hold this model's full-rank weights: missing {missing[:5]}"
                f"{' …' if len(missing) > 5 else ''}, not trainable full-rank here {unexpected[:5]}"
                f"{' …' if len(unexpected) > 5 else ''}. Nothing was loaded: build the model and the GORP optimizer "
                f"(same full_rank patterns) as for the run that wrote it"
            )
    else:
        targets = {base_name(n): p for n, p in _unwrap(model).named_parameters()}
        unknown = sorted(set(tensors) - set(targets))
        if unknown:
            raise GorpCheckpointError(
                f"{file!r} has weights {unknown[:5]}{' …' if len(unknown) > 5 else ''} that {type(model).__name__} "
                f"does not have. Nothing was loaded: load it into the base model it was trained from"
            )
    plan = []
    for name, t in tensors.items():
        p = targets[name]
        if tuple(p.shape) != tuple(t.shape) or p.dtype != t.dtype:
            raise GorpCheckpointError(
                f"{file!r}: {name} is {tuple(t.shape)} {t.dtype} in the file but {tuple(p.shape)} {p.dtype} in the "
                f"model. Nothing was loaded: load the model with the same sizes and dtype as the run that wrote it "
                f"(e.g. torch_dtype=torch.{str(t.dtype).split('.')[-1]})"
            )
        plan.append((p, t))
    return plan


def _apply(plan) -> None:
    with torch.no_grad():
        for p, t in plan:
            p.copy_(t)


def load_full_rank_weights(model: nn.Module, path: str, *, strict: bool = True) -> dict[str, str]:
    """Copy the weights of a ``save_full_rank_weights`` file into ``model``; returns the file's metadata.

    ``strict`` (default, for resuming): the file must hold exactly the model's full-rank weights
    (``full_rank_parameters``), e.g. a model rebuilt with the same adapter and GORP optimizer. ``strict=False``:
    every weight of the file must be a parameter of ``model`` (any model: a plain base model, a PEFT model).
    Names, shapes and dtypes are all checked before anything is copied."""
    tensors, meta = read_full_rank_weights(path)
    _apply(_plan(model, tensors, strict, _file(path)))
    return meta


def save_gorp_adapter(peft_model, out_dir: str, **save_kwargs) -> None:
    """Export a GORP-trained PEFT model: the adapter (``save_pretrained(out_dir, **save_kwargs)``) and, beside it,
    the full-rank weights. Load it with ``load_gorp_adapter(base_model, out_dir)``. An adapter initialized by
    SLICE (which changed the base weights of its targets) is exported for the untouched base in two calls:
    ``slice_kernels.save_as_lora(peft_model, out_dir, initial_folder)`` (which checks the initial adapter against
    the init's mark), then ``save_full_rank_weights(peft_model, out_dir)``."""
    if "path_initial_model_for_weight_conversion" in save_kwargs:
        # PEFT's own conversion neither checks the initial adapter nor keeps its mark (it rewrites its config)
        raise GorpCheckpointError(
            "save_gorp_adapter: for an adapter whose init changed the base weights, call "
            "slice_kernels.save_as_lora(model, out_dir, initial_folder) and then "
            "slice_kernels.gorp.persist.save_full_rank_weights(model, out_dir) instead of passing "
            "path_initial_model_for_weight_conversion"
        )
    if not full_rank_parameters(peft_model):  # checked before anything is written
        raise GorpCheckpointError(
            "the model has no full-rank weights to export (nothing trainable outside the adapter)"
        )
    model = _unwrap(peft_model)
    model.save_pretrained(out_dir, **save_kwargs)
    save_full_rank_weights(model, out_dir)


def load_gorp_adapter(base_model: nn.Module, path: str, *, adapter_name: str = "default", **from_pretrained_kwargs):
    """The exported model back: ``base_model`` (the untouched base of the run) with the full-rank weights of
    ``path`` copied in and the adapter of ``path`` loaded (``PeftModel.from_pretrained``). The file is checked
    against ``base_model`` before anything is modified. Returns the ``PeftModel``."""
    from peft import PeftModel

    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise NotFoundError(f"no PEFT adapter at {path!r} (adapter_config.json missing); export with save_gorp_adapter")
    tensors, _ = read_full_rank_weights(path)
    plan = _plan(base_model, tensors, False, _file(path))
    peft_model = PeftModel.from_pretrained(base_model, path, adapter_name=adapter_name, **from_pretrained_kwargs)
    _apply(plan)  # the planned tensors are the base's own parameters, which PEFT's wrapping keeps
    return peft_model


__all__ = [
    "FULL_RANK_FILE",
    "GorpCheckpointError",
    "base_name",
    "full_rank_parameters",
    "save_full_rank_weights",
    "read_full_rank_weights",
    "load_full_rank_weights",
    "save_gorp_adapter",
    "load_gorp_adapter",
]
