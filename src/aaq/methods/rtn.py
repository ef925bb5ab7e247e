"""Round-to-nearest: the baseline with no calibration data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from aaq.methods.registry import MethodContext, register_method
from aaq.methods.weight_only import WeightOnlyConfig, apply_weight_only
from aaq.models.plan import TransformPlan
from aaq.quant.packing import rtn_codes
from aaq.quant.quantizers import QuantSpec


@dataclass
class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest weights (with the per-row clip search of the weight spec)."""

    name: ClassVar[str] = "rtn"

    def quantize_weights(self, context: MethodContext) -> None:
        """Round every projection weight to nearest."""
        quantize_weights_rtn(context.model, context.plan, context.scheme.weights)


@torch.no_grad()
def quantize_weights_rtn(model: PreTrainedModel, plan: TransformPlan, spec: QuantSpec) -> None:
    """Round every projection weight of the plan to nearest (its codes and their dequantized value)."""
    for name in plan.linears:
        linear = model.get_submodule(name)
        linear.set_codes(rtn_codes(linear.weight.data, spec))


register_method(RTNConfig)(apply_weight_only)
