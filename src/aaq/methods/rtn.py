"""Round-to-nearest: the baseline with no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from aaq.fake_quant import install_quantizers
from aaq.methods.registry import MethodConfig, MethodContext, MethodResult, register_method
from aaq.plan import TransformPlan
from aaq.quantizers import QuantSpec, quantize_weight_rtn


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest weights (with the per-row clip search of the weight spec)."""

    name: ClassVar[str] = "rtn"


@torch.no_grad()
def quantize_weights_rtn(model: PreTrainedModel, plan: TransformPlan, spec: QuantSpec) -> None:
    """Replace every projection weight of the plan by its round-to-nearest fake-quantized copy."""
    for name in plan.linears:
        linear = model.get_submodule(name)
        linear.weight.data = quantize_weight_rtn(linear.weight.data, spec)


@register_method(RTNConfig)
def apply_rtn(context: MethodContext) -> MethodResult:
    """Fake-quantize activations/KV as the scheme says and round the weights to nearest."""
    install_quantizers(context.model, context.plan, context.scheme)
    if context.scheme.weights is not None:
        quantize_weights_rtn(context.model, context.plan, context.scheme.weights)
    return MethodResult()
