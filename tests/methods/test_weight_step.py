"""The weight step after fused transforms: GPTQ by default, RTN on request, nothing at 16 bits."""

import pytest
import torch

from aaq.api import QuantizeConfig, quantize
from aaq.errors import AaqError
from aaq.methods import QuaRotConfig
from aaq.models.plan import TransformConfig
from tests.helpers import CALIBRATION, make_tiny_model, rtn_weight


def test_rtn_after_the_transforms_rounds_the_fused_weights():
    fused = make_tiny_model("llama")
    quantize(fused, QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w16a16"))
    rounded = make_tiny_model("llama")
    config = QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w4a16")
    quantize(rounded, config)
    spec = config.resolved_scheme().weights
    for name, linear in rounded.named_modules():
        if name.endswith("down_proj"):
            torch.testing.assert_close(linear.weight, rtn_weight(fused.get_submodule(name).weight, spec))


def test_gptq_and_rtn_weight_steps_give_different_weights():
    models = {}
    for quantizer in ("gptq", "rtn"):
        models[quantizer] = make_tiny_model("llama")
        method = QuaRotConfig(weight_quantizer=quantizer, transforms=TransformConfig(r1="hadamard", r2="hadamard"))
        quantize(models[quantizer], QuantizeConfig(method=method, bits="w4a16"), calibration=CALIBRATION)
    assert not torch.equal(models["gptq"].model.layers[0].mlp.up_proj.weight, models["rtn"].model.layers[0].mlp.up_proj.weight)


def test_unknown_weight_quantizer_is_a_clear_error():
    with pytest.raises(AaqError, match="unknown weight quantizer 'awq'"):
        QuaRotConfig(weight_quantizer="awq")
