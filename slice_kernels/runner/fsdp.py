"""The runner's ``--fsdp`` mode (under torchrun): each stage's adapter is initialized and trained on an
FSDP2-sharded copy of the model, and the trained stage is gathered back into the runner's plain model.

Per stage, on every rank:

1. a copy of W^(t-1) is wrapped by PEFT (its default init: B = 0) and sharded with ``fully_shard`` (every decoder
   layer, then the whole model), so the LoRA parameters are sharded with the base weights;
2. ``init_sharded_`` initializes the adapter on the shards (each rank accumulates its shard of every gradient,
   each layer's SVD runs on one rank, the offset is written into each rank's shard in place);
3. training: FSDP reduce-scatters the gradients (the runner's own all-reduce is off), AdamW steps on the shards;
4. the full state (base weights with the offset absorbed, trained LoRA factors) is gathered on every rank, loaded
   into a PEFT wrapper of the runner's plain W^(t-1) and merged: W^(t), unsharded, which rank 0 evaluates and
   checkpoints exactly as in data-parallel mode.

What this mode shards is the init and the training, the memory-heavy part of a stage. Between stages every rank
holds the plain merged model (W^(t), the base and the resume delta), so the runner under ``--fsdp`` runs models
that fit one device; the library calls (``init_sharded_`` in your own FSDP2 loop, docs/distributed.md) are what
trains models that do not. PS-LoRA's loss and GORP refuse sharded parameters, so only the init methods run here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# the methods whose stage is an init plus plain LoRA training: the ones this mode runs
FSDP_METHODS = ("lora", "lora_ga", "lora_ga_peft", "slice", "loram")
_LAYER_CLASSES = ("DecoderLayer", "Block")  # transformers' names of a model's repeated layers (Llama…, GPT2Block)


def check_fsdp(methods: list[str], world: int) -> None:
    """Refuse what ``--fsdp`` cannot run, before anything is loaded or written."""
    if world < 2:
        raise ValueError(
            "--fsdp shards the model over the processes of torchrun: launch with "
            "torchrun --nproc_per_node N -m slice_kernels run --fsdp ... (N ≥ 2)"
        )
    bad = [m for m in methods if m not in FSDP_METHODS]
    if bad:
        raise ValueError(
            f"--fsdp runs the init methods ({', '.join(FSDP_METHODS)}); {bad} cannot run on FSDP2-sharded "
            f"parameters (PS-LoRA's stability loss and GorpAdamW need full factors and gradients): run them "
            f"without --fsdp (data parallel)"
        )


def shard(peft_model: nn.Module) -> nn.Module:
    """``fully_shard`` every repeated layer, then the whole model (FSDP2's usual wrapping), in place. The layers
    are the classes transformers names in ``_no_split_modules`` (LlamaDecoderLayer, GPT2Block, GPTNeoXLayer, …),
    else those whose class name ends like a decoder layer's."""
    from torch.distributed.fsdp import fully_shard

    names = set()
    for m in peft_model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    match = (lambda m: type(m).__name__ in names) if names else (lambda m: type(m).__name__.endswith(_LAYER_CLASSES))
    layers = [m for m in peft_model.modules() if match(m)]
    for m in layers:
        fully_shard(m)
    fully_shard(peft_model)
    return peft_model


def _peft_wrap(model: nn.Module, lora_config, method: str) -> nn.Module:
    """PEFT's wrap with the adapter dtype the unsharded init gives ``method`` (the stage and its merge use it)."""
    from peft import get_peft_model

    from ..slice_init.peft import autocasts_adapter_dtype

    return get_peft_model(model, lora_config, autocast_adapter_dtype=autocasts_adapter_dtype(method))


def sharded_stage_model(model: nn.Module, lora_config, method: str) -> nn.Module:
    """A PEFT-wrapped, sharded copy of ``model`` (``model`` itself is left plain, for the merge)."""
    return shard(_peft_wrap(copy.deepcopy(model), lora_config, method))


def full_state(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the whole state dict of a sharded model as plain tensors, on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(peft_model, options=StateDictOptions(full_state_dict=True))
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in sd.items()}


def merge_into(model: nn.Module, lora_config, state: dict[str, torch.Tensor], method: str) -> nn.Module:
    """W^(t): ``model`` (W^(t-1), plain) wrapped by PEFT as the stage was, loaded with the gathered ``state`` and
    merged."""
    plain = _peft_wrap(model, lora_config, method)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"--fsdp: the gathered state does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return plain.merge_and_unload()


__all__ = ["FSDP_METHODS", "check_fsdp", "full_state", "merge_into", "shard", "sharded_stage_model"]
