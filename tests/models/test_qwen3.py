"""The Qwen3 adapter: the per-head q/k norms before RoPE stay untouched by every transform."""

import torch

from aaq.models import adapter_for, transform_plan
from aaq.models.qwen3 import Qwen3Adapter
from aaq.quant.quantizers import QuantScheme
from tests.helpers import calibration_setup, logits_of, make_tiny_model


def test_qk_norms_are_left_alone_and_the_function_kept():
    model = make_tiny_model("qwen3")
    assert adapter_for(model) is Qwen3Adapter
    attention = model.get_submodule(transform_plan(model).layers[1].attention)
    norms = (attention.q_norm.weight.detach().clone(), attention.k_norm.weight.detach().clone())
    reference = logits_of(model)
    calibration_setup(model, QuantScheme.from_string("fp")).fuse()
    assert torch.equal(attention.q_norm.weight, norms[0]) and torch.equal(attention.k_norm.weight, norms[1])
    assert ((logits_of(model) - reference).norm() / reference.norm()) < 1e-4
