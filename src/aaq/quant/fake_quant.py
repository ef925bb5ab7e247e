"""Fake quantization of the forward pass: the inputs of every projection and the KV cache.

`install_quantizers` swaps every projection the plan lists for a `QuantLinear` (an `nn.Linear`
subclass, so the state dict keeps transformers' names) that fake-quantizes its input per token, and
gives every attention module a KV-cache quantizer. Weights are the methods' job (RTN, GPTQ write
them on their grid); online rotations are the transforms' (`aaq.transforms.online`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from aaq.errors import AaqError
from aaq.models.attention import KV_QUANTIZER, set_attention_hook, use_aaq_attention
from aaq.models.plan import TransformPlan
from aaq.quant.packing import WeightCodes
from aaq.quant.quantizers import ActivationQuantizer, QuantScheme, QuantSpec


class QuantLinear(nn.Linear):
    """A linear layer whose input is fake-quantized (per token or group) when it has an input quantizer.

    Once its weight is quantized, `codes` holds the integer codes (on the CPU) and the weight is
    their dequantized value in the model's dtype: the codes, not the weight, are what is saved.
    """

    def __init__(self, linear: nn.Linear, input_quantizer: ActivationQuantizer | None) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = input_quantizer
        self.codes: WeightCodes | None = None

    def set_codes(self, codes: WeightCodes) -> None:
        """Quantize the weight to `codes`: it becomes their dequantized value, in its dtype and on its device."""
        self.codes = codes
        self.weight.data = codes.dequantize(self.weight.dtype, self.weight.device)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the weight sees it."""
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantized_input(x), self.weight, self.bias)


def quantizer_for(spec: QuantSpec | None) -> ActivationQuantizer | None:
    """A dynamic fake quantizer for `spec`, or None when the tensor stays in full precision."""
    return None if spec is None else ActivationQuantizer(spec)


def install_quantizers(model: PreTrainedModel, plan: TransformPlan, scheme: QuantScheme) -> None:
    """Fake-quantize every projection's input and the KV cache as `scheme` says, in place."""
    if isinstance(model.get_submodule(plan.linears[0]), QuantLinear):
        raise AaqError("this model is already quantized; quantize a freshly loaded full-precision model instead")
    for name in plan.linears:
        model.set_submodule(name, QuantLinear(model.get_submodule(name), quantizer_for(scheme.activations)))
    for layer in plan.layers:
        set_attention_hook(model.get_submodule(layer.attention), KV_QUANTIZER, quantizer_for(scheme.kv_cache))
    use_aaq_attention(model)


def quantized_linears(model: PreTrainedModel) -> dict[str, torch.Size]:
    """Qualified names and weight shapes (out, in) of the quantized projections of a model."""
    return {name: module.weight.shape for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def release_weights(model: nn.Module) -> None:
    """Free the memory of every weight of `model`: parameters and buffers move to the meta device, quantized linears drop their integer codes.

    The model cannot compute afterwards; for a model whose work is done while something else needs its memory.
    """
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.codes = None
    model.to("meta")
