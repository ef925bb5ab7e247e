"""The shared Llama layout adapter: every name in the plan resolves to a module of its role."""

import pytest

from aaq.models import transform_plan


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_every_name_in_the_plan_is_a_module_of_its_role(family):
    from torch import nn

    from tests.helpers import make_tiny_model

    model = make_tiny_model(family)
    plan = transform_plan(model)
    geometry = plan.geometry
    assert len(plan.layers) == geometry.num_layers == 2 and geometry.kv_groups == 3
    assert isinstance(model.get_submodule(plan.embeddings), nn.Embedding) and isinstance(model.get_submodule(plan.lm_head), nn.Linear)
    for layer in plan.layers:
        linears = {name: model.get_submodule(name) for name in layer.linears}
        assert len(linears) == 7 and all(isinstance(m, nn.Linear) for m in linears.values())
        assert linears[layer.values.writer].out_features == geometry.num_kv_heads * geometry.head_dim
        assert linears[layer.values.reader].in_features == geometry.num_heads * geometry.head_dim
        assert linears[layer.mlp_hidden.reader].in_features == geometry.intermediate_size
        assert set(layer.residual_writers) == {layer.values.reader, layer.mlp_hidden.reader}
        for group in layer.stream_inputs:
            assert model.get_submodule(group.norm).weight.shape == (geometry.hidden_size,)
