"""Quantization methods, each a config class registered with the function that applies it."""

from aaq.methods import aaq, gptq, ostquant, quarot, rtn
from aaq.methods.aaq import AAQConfig
from aaq.methods.gptq import GPTQConfig
from aaq.methods.options import MethodOptions
from aaq.methods.ostquant import OSTQuantConfig
from aaq.methods.quarot import QuaRotConfig
from aaq.methods.registry import (
    MethodConfig,
    MethodContext,
    MethodResult,
    ReleasableModel,
    apply_method,
    method_config_class,
    method_config_from_dict,
    method_names,
    register_method,
)
from aaq.methods.rtn import RTNConfig

__all__ = [
    "AAQConfig",
    "GPTQConfig",
    "MethodConfig",
    "MethodContext",
    "MethodOptions",
    "MethodResult",
    "OSTQuantConfig",
    "QuaRotConfig",
    "RTNConfig",
    "ReleasableModel",
    "aaq",
    "apply_method",
    "gptq",
    "method_config_class",
    "method_config_from_dict",
    "method_names",
    "ostquant",
    "quarot",
    "register_method",
    "rtn",
]
