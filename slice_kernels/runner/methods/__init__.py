"""The runner's methods: the interface and registry (``base``) and the built-in methods, registered on import:
``lora``, ``lora_ga``, ``slice``, ``loram`` (``init_methods``), ``ps_lora``, ``slice+ps`` (``ps_lora``) and
``gorp`` (``gorp``)."""

from . import gorp, init_methods, ps_lora  # noqa: F401  (importing registers the built-in methods)
from .base import (
    RUNNER_SET_FIELDS,
    LoraSettings,
    Method,
    Option,
    StageContext,
    available,
    check_method_options,
    declared_options,
    get,
    number,
    one_of,
    positive_int,
    register,
)
from .init_methods import InitMethod

__all__ = [
    "Method",
    "Option",
    "StageContext",
    "LoraSettings",
    "InitMethod",
    "register",
    "get",
    "available",
    "declared_options",
    "check_method_options",
    "RUNNER_SET_FIELDS",
    "number",
    "positive_int",
    "one_of",
]
