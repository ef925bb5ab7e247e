"""Round-to-nearest: the baseline with no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from aaq.methods.registry import MethodConfig, MethodContext, MethodResult, register_method
from aaq.models.plan import TransformPlan
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.packing import rtn_codes
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runtime.devices import StageMeter


@dataclass
class RTNConfig(MethodConfig):
    """Round-to-nearest weights (with the per-row clip search of the weight spec)."""

    name: ClassVar[str] = "rtn"

    def stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """Rounding, when the weights are quantized."""
        return () if scheme.weights is None else ("rtn",)


@torch.no_grad()
def quantize_weights_rtn(model: PreTrainedModel, plan: TransformPlan, spec: QuantSpec) -> None:
    """Round every projection weight of the plan to nearest (its codes and their dequantized value)."""
    for name in plan.linears:
        linear = model.get_submodule(name)
        linear.set_codes(rtn_codes(linear.weight.data, spec))


@register_method(RTNConfig)
def apply_rtn(context: MethodContext) -> MethodResult:
    """Fake-quantize activations/KV as the scheme says and round the weights to nearest."""
    install_quantizers(context.model, context.plan, context.scheme)
    meter = StageMeter(context.placement.compute_device)
    if context.scheme.weights is not None:
        with meter.stage("rtn"):
            quantize_weights_rtn(context.model, context.plan, context.scheme.weights)
    return MethodResult(stages=meter.records)
