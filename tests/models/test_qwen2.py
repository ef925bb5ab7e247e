"""The Qwen2 adapter: q/k/v carry biases; R2 and the v -> o scales must transform the v bias with its weight."""

import torch

from aaq.models import adapter_for, transform_plan
from aaq.models.qwen2 import Qwen2Adapter
from aaq.quant.quantizers import QuantScheme
from tests.helpers import calibration_setup, logits_of, make_tiny_model


def test_learned_transforms_move_the_value_bias_and_keep_the_function():
    model = make_tiny_model("qwen2")
    assert adapter_for(model) is Qwen2Adapter
    layer = transform_plan(model).layers[0]
    v_bias = model.get_submodule(layer.values.writer).bias.detach().clone()
    q_bias = model.get_submodule(layer.attention_input.readers[0]).bias.detach().clone()
    reference = logits_of(model)
    setup = calibration_setup(model, QuantScheme.from_string("fp"))
    with torch.no_grad():
        setup.transforms.log_scales["vo"][0].normal_(0, 0.3)
    setup.fuse()
    assert not torch.allclose(model.get_submodule(layer.values.writer).bias, v_bias)
    assert torch.equal(model.get_submodule(layer.attention_input.readers[0]).bias, q_bias)  # R1 acts on inputs only
    assert ((logits_of(model) - reference).norm() / reference.norm()) < 1e-4
