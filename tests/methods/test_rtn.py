"""Round-to-nearest: every projection of the plan on its grid, nothing else touched."""

import torch

from aaq.api import QuantizeConfig, quantize
from aaq.methods import RTNConfig
from aaq.models import transform_plan
from aaq.quant.fake_quant import QuantLinear
from tests.helpers import make_tiny_model


def test_rtn_puts_every_projection_on_its_grid_and_leaves_embeddings_and_norms():
    model = make_tiny_model("qwen3", tie=False)
    plan = transform_plan(model)
    untouched = {name: t.clone() for name, t in model.state_dict().items() if "norm" in name or name.startswith(("model.embed", "lm_head"))}
    config = QuantizeConfig(method=RTNConfig(), bits="w4a8")
    result = quantize(model, config)
    spec = config.resolved_scheme().weights
    for name in plan.linears:
        linear = model.get_submodule(name)
        assert isinstance(linear, QuantLinear) and linear.input_quantizer.spec.bits == 8
        assert linear.codes.spec == spec and torch.equal(linear.codes.dequantize(), linear.weight.detach())
    for name, tensor in untouched.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert result.transforms.tensors() == {} and not result.transforms.config.online
