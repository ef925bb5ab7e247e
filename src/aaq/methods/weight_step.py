"""The weight step shared by the transform methods: GPTQ (default) or RTN on the fused weights."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from aaq.errors import AaqError
from aaq.methods.gptq import GPTQConfig, quantize_weights_gptq
from aaq.methods.registry import MethodContext, Options, take_options
from aaq.methods.rtn import quantize_weights_rtn
from aaq.quant.quantizers import QuantScheme
from aaq.runtime.devices import StageMeter

WEIGHT_QUANTIZERS = ("gptq", "rtn")


@dataclass
class FusedWeightQuantization:
    """Mixin for method configs that quantize the weights after fusing their transforms."""

    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    weight_quantizer: Literal["gptq", "rtn"] = "gptq"

    def __post_init__(self) -> None:
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise AaqError(f"unknown weight quantizer {self.weight_quantizer!r}; use one of {', '.join(WEIGHT_QUANTIZERS)}")

    def weight_stages(self, scheme: QuantScheme) -> tuple[str, ...]:
        """The weight step's stage (`gptq` or `rtn`), when the weights are quantized."""
        return () if scheme.weights is None else (self.weight_quantizer,)

    def gptq_settings(self) -> GPTQConfig | None:
        """The GPTQ settings, when GPTQ quantizes the weights."""
        return self.gptq if self.weight_quantizer == "gptq" else None

    def with_gptq_settings(self, **changes: Any) -> FusedWeightQuantization:
        """This config with GPTQ settings changed."""
        return replace(self, gptq=replace(self.gptq, **changes))

    def work_folders(self) -> tuple[str, ...]:
        """GPTQ's finished layers (RTN keeps no progress)."""
        return self.gptq.work_folders() if self.weight_quantizer == "gptq" else ()

    def export_blocker(self, scheme: QuantScheme) -> AaqError | None:
        """GPTQ's reason, when GPTQ quantizes the weights."""
        return self.gptq.export_blocker(scheme) if self.weight_quantizer == "gptq" else None

    def apply_weight_options(self, options: Options) -> tuple[FusedWeightQuantization, Options]:
        """This config with the weight-step options (weight_quantizer and GPTQ's) applied, and the rest."""
        taken, rest = take_options(options, ("weight_quantizer",))
        gptq, rest = self.gptq.apply_options(rest)
        return replace(self, gptq=gptq, **taken), rest


def quantize_fused_weights(context: MethodContext, config: FusedWeightQuantization, meter: StageMeter) -> None:
    """Quantize every projection with the config's weight quantizer (no-op for 16-bit weights), measured as stage `gptq` or `rtn`."""
    if context.scheme.weights is None:
        return
    with meter.stage(config.weight_quantizer):
        if config.weight_quantizer == "gptq":
            quantize_weights_gptq(context, config.gptq)
        else:
            quantize_weights_rtn(context.model, context.plan, context.scheme.weights)
