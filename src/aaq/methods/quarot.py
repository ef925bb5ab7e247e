"""QuaRot: fused norms, Hadamard rotations R1..R4, then GPTQ (or RTN) weights.

Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs". Rotations spread
outlier channels over all channels, which is what makes 4-bit activations usable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from aaq.methods.registry import MethodConfig, MethodContext, MethodResult, Options, register_method, take_options
from aaq.methods.weight_step import FusedWeightQuantization, quantize_fused_weights
from aaq.models.plan import TRANSFORM_SWITCHES, TransformConfig
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.runtime.devices import StageMeter
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import check_fixed, rotate_model

# Every transform switch but the smoothing scales, which only learned methods have.
ROTATION_OPTIONS = tuple(name for name in TRANSFORM_SWITCHES if name != "smoothing")


@dataclass
class QuaRotConfig(FusedWeightQuantization, MethodConfig):
    """The fixed transforms (no smoothing) plus the weight quantizer run after them."""

    name: ClassVar[str] = "quarot"
    transforms: TransformConfig = field(default_factory=TransformConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fixed(self.transforms)

    def needs_calibration(self) -> bool:
        """GPTQ needs calibration inputs; RTN does not."""
        return self.weight_quantizer == "gptq"

    def stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """The fusion of the rotations, then the weight step."""
        return ("fusion", *self.weight_stages(scheme))

    def apply_options(self, options: Options) -> tuple[QuaRotConfig, Options]:
        """This config with the rotation and weight-step options applied (it has no smoothing to switch)."""
        taken, rest = take_options(options, ROTATION_OPTIONS)
        config, rest = self.apply_weight_options(rest)
        return replace(config, transforms=replace(self.transforms, **taken)), rest


@register_method(QuaRotConfig)
def apply_quarot(context: MethodContext) -> MethodResult:
    """Rotate, install the fake quantizers and the online rotations, then quantize the weights."""
    config: QuaRotConfig = context.method
    meter = StageMeter(context.placement.compute_device)
    with meter.stage("fusion"):
        transforms = rotate_model(context.model, context.plan, config.transforms, context.seed, context.placement.fusion_target)
    install_quantizers(context.model, context.plan, context.scheme)
    install_online_rotations(context.model, context.plan, config.transforms, "final")
    quantize_fused_weights(context, config, meter)
    return MethodResult(transforms=transforms, stages=meter.records)
