"""AAQ: OSTQuant's transforms calibrated with the alignment-preserving contrastive (APC) loss.

Wee et al. 2025, "Alignment-Aware Quantization for LLM Safety". The loss pulls the quantized model
towards the aligned model on its top-k tokens and pushes it away from the unaligned reference on
the tokens where the two disagree most (`aaq.calibration.losses.apc_loss`), so it needs the reference model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from aaq.calibration.loop import CalibrationSettings
from aaq.calibration.losses import LossConfig
from aaq.methods.ostquant import OSTQuantConfig, learn_transforms_and_quantize
from aaq.methods.registry import MethodContext, MethodResult, register_method


@dataclass
class AAQConfig(OSTQuantConfig):
    """OSTQuant's settings with the APC loss (lambda 0.1) as the default."""

    name: ClassVar[str] = "aaq"
    training: CalibrationSettings = field(default_factory=lambda: CalibrationSettings(loss=LossConfig(name="apc", lam=0.1)))


@register_method(AAQConfig)
def apply_aaq(context: MethodContext) -> MethodResult:
    """AAQ: cache aligned/reference targets, learn the transforms with the APC loss, quantize the weights."""
    return learn_transforms_and_quantize(context, context.method)
