"""Methods that quantize the weights alone, without transforms (RTN, GPTQ): one way to apply them all."""

from __future__ import annotations

from dataclasses import dataclass

from aaq.methods.registry import MethodConfig, MethodContext, MethodResult
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.runtime.devices import StageMeter


@dataclass
class WeightOnlyConfig(MethodConfig):
    """Base of the methods whose only step is the weight quantizer; a subclass implements `quantize_weights`."""

    def stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """The weight step, named after the method, when the weights are quantized."""
        return () if scheme.weights is None else (self.name,)

    def quantize_weights(self, context: MethodContext) -> None:
        """Quantize every projection weight of the plan (its codes and their dequantized value)."""
        raise NotImplementedError


def apply_weight_only(context: MethodContext) -> MethodResult:
    """Fake-quantize activations/KV as the scheme says and quantize the weights with the method's own step (no transforms)."""
    install_quantizers(context.model, context.plan, context.scheme)
    meter = StageMeter(context.placement.compute_device)
    if context.scheme.weights is not None:
        with meter.stage(context.method.name):
            context.method.quantize_weights(context)
    return MethodResult(stages=meter.records)
