"""What ``get_slice_model`` makes of PEFT's own init options in a ``LoraConfig`` (docs/peft_compat.md).

``init_lora_weights=True`` (PEFT's default) leaves the choice to ``SliceConfig``. ``"lora_ga"`` with a
``LoraGAConfig`` selects the PEFT preset ``SliceConfig(method="lora_ga_peft")`` with every field of the
sub-config mapped onto ``peft_direction``/``peft_scale``/``peft_stable_gamma``. Every other value names an init
that PEFT would run and ``get_slice_model`` would overwrite, so it is refused instead of being ignored.
"""

from __future__ import annotations

import dataclasses

from ..errors import SliceInitError
from .config import SliceConfig

# LoraGAConfig field -> SliceConfig field
LORA_GA_FIELDS = {"direction": "peft_direction", "scale": "peft_scale", "stable_gamma": "peft_stable_gamma"}


def _lora_ga_fields(lora_ga_config) -> dict:
    if lora_ga_config is None:
        raise SliceInitError(
            "LoraConfig(init_lora_weights='lora_ga') needs lora_ga_config=LoraGAConfig(...) (PEFT refuses it "
            "too); pass LoraGAConfig() for PEFT's defaults"
        )
    if isinstance(lora_ga_config, dict):  # a config loaded from JSON keeps its sub-config as a dict
        values = dict(lora_ga_config)
    elif dataclasses.is_dataclass(lora_ga_config):
        values = dataclasses.asdict(lora_ga_config)
    else:
        raise SliceInitError(f"LoraConfig.lora_ga_config must be a peft LoraGAConfig, got {type(lora_ga_config)}")
    unknown = sorted(set(values) - set(LORA_GA_FIELDS))
    if unknown:
        # a newer PEFT with an option this package does not reproduce: refuse rather than drop it
        raise SliceInitError(
            f"LoraGAConfig field(s) {unknown} have no equivalent in slice_kernels (known: {sorted(LORA_GA_FIELDS)}); "
            f"leave them at their defaults or use PEFT's own preprocess_loraga + get_peft_model"
        )
    return {LORA_GA_FIELDS[k]: v for k, v in values.items()}


def slice_config_for(lora_config, slice_config: SliceConfig | None) -> SliceConfig:
    """The ``SliceConfig`` that ``get_slice_model(model, lora_config, slice_config)`` runs, or a clear error.

    * ``init_lora_weights=True``: ``slice_config`` (default ``SliceConfig()``); a ``lora_ga_config`` given
      beside it is refused (PEFT reads it only with ``"lora_ga"``).
    * ``init_lora_weights="lora_ga"``: ``SliceConfig(method="lora_ga_peft", peft_*=<lora_ga_config>)``. An
      explicit ``slice_config`` is accepted only when it is that preset with the same ``peft_*`` values (so its
      other fields, e.g. ``current_steps`` or ``svd``, can be set); anything else is a conflict.
    * any other value: refused, naming it.
    """
    init = getattr(lora_config, "init_lora_weights", True)
    if init is True:
        if getattr(lora_config, "lora_ga_config", None) is not None:
            raise SliceInitError(
                "LoraConfig.lora_ga_config is set but init_lora_weights=True: PEFT reads lora_ga_config only with "
                "init_lora_weights='lora_ga'; set init_lora_weights='lora_ga' for PEFT's LoRA-GA preset or drop "
                "lora_ga_config"
            )
        return slice_config if slice_config is not None else SliceConfig()
    if init == "lora_ga":
        wanted = _lora_ga_fields(lora_config.lora_ga_config)
        if slice_config is None:
            return SliceConfig(method="lora_ga_peft", **wanted)
        if slice_config.method != "lora_ga_peft":
            raise SliceInitError(
                f"LoraConfig(init_lora_weights='lora_ga') asks for PEFT's LoRA-GA, but slice_config.method is "
                f"{slice_config.method!r}: pass slice_config=None (or SliceConfig(method='lora_ga_peft', ...)), or "
                f"leave init_lora_weights=True to run {slice_config.method!r}"
            )
        differ = {k: (getattr(slice_config, k), v) for k, v in wanted.items() if getattr(slice_config, k) != v}
        if differ:
            detail = ", ".join(f"{k}={a!r} but lora_ga_config gives {b!r}" for k, (a, b) in differ.items())
            raise SliceInitError(
                f"slice_config conflicts with LoraConfig.lora_ga_config: {detail}. Set the option in one place: "
                f"slice_config=None, or the same value in both"
            )
        return slice_config
    if isinstance(init, str) and init.startswith("slice-kernels:"):
        raise SliceInitError(
            "LoraConfig.init_lora_weights holds slice-kernels' changed-base mark: this LoraConfig was read from a "
            "saved slice-kernels adapter. Build a fresh LoraConfig (init_lora_weights=True) for a new init"
        )
    hint = {
        False: "False is PEFT's random (non-identity) init for debugging",
        "gaussian": "'gaussian' is PEFT's Gaussian A with B = 0, i.e. ordinary LoRA",
    }.get(init, f"{init!r} is another data- or weight-driven init of PEFT")
    raise SliceInitError(
        f"LoraConfig.init_lora_weights={init!r} is not supported by get_slice_model, which writes the adapter "
        f"itself ({hint}; it would be overwritten). Leave init_lora_weights=True and choose the init with "
        f"SliceConfig(method=...) (method='lora' is PEFT's default LoRA init), use init_lora_weights='lora_ga' for "
        f"PEFT's LoRA-GA preset, or call peft.get_peft_model for {init!r}"
    )
