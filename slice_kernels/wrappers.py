"""Refusing models already wrapped for data-parallel training (DDP, DataParallel, FSDP1, DeepSpeed).

``get_slice_model`` wraps the model with PEFT after the init. Given ``accelerator.prepare(model)``'s
DistributedDataParallel, that cannot work: the init's gradient collection runs backward passes in which only
the target weights need gradients and releases each ``.grad`` at once, so DDP's reducer waits for gradients
that never come ("Expected to have finished reduction in the prior iteration"), and even a collection on
``.module`` would leave a wrapper whose registered parameters and hooks know nothing of the LoRA parameters PEFT
adds afterwards, so they would never be all-reduced. The order that works is the init first, on the plain
model in every process (the gradients are averaged over the ranks by torch.distributed), then ``prepare``.
"""

from __future__ import annotations

from torch import nn

from .errors import SliceInitError


def _data_parallel_types() -> tuple[type, ...]:
    types: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:  # a torch build without distributed
        pass
    return tuple(types)


def data_parallel_wrapper(model: nn.Module) -> str | None:
    """The class name of a data-parallel wrapper in ``model`` (itself or any submodule, e.g. under torch.compile's
    OptimizedModule), or None. DeepSpeed is recognized by name so that it need not be installed."""
    types = _data_parallel_types()
    for m in model.modules():
        if isinstance(m, types) or type(m).__name__ == "DeepSpeedEngine":
            return type(m).__name__
    return None


def refuse_wrapped_model(model: nn.Module, caller: str = "get_slice_model") -> None:
    """Raise ``SliceInitError`` (nothing modified, no collective started, so every rank raises alike) when
    ``model`` is wrapped for data-parallel training."""
    wrapper = data_parallel_wrapper(model)
    if wrapper is not None:
        raise SliceInitError(
            f"{caller} got a model wrapped in {wrapper} (accelerator.prepare(model), DDP(model), ...): call "
            f"{caller} before accelerator.prepare(model). Run it on the plain model in every process (the init "
            f"averages the gradients over the ranks), then prepare the PEFT model it returns: "
            f"peft_model = get_slice_model(model, ...); peft_model, optimizer = accelerator.prepare(peft_model, "
            f"optimizer). A model prepared already: pass accelerator.unwrap_model(model) and prepare the result"
        )


__all__ = ["data_parallel_wrapper", "refuse_wrapped_model"]
