"""Layer-by-layer execution: the first layer's captured inputs pushed through every layer give the model's hidden states."""

import torch

from aaq.calibration.layerwise import capture_first_layer_inputs, run_layer
from aaq.models import transform_plan
from tests.helpers import make_tiny_model

TOKENS = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(0))


def test_layer_by_layer_reproduces_every_hidden_state_of_the_full_forward():
    model = make_tiny_model("qwen2")
    plan = transform_plan(model)
    with torch.no_grad():
        expected = model(TOKENS, output_hidden_states=True).hidden_states
    inputs = capture_first_layer_inputs(model, model.get_submodule(plan.layers[0].block), TOKENS, batch_size=2)
    assert [h.shape[0] for h in inputs.hidden] == [2, 1]
    torch.testing.assert_close(torch.cat(inputs.hidden), expected[0])
    for index, layer in enumerate(plan.layers[:-1], start=1):
        inputs = run_layer(model.get_submodule(layer.block), inputs)
        torch.testing.assert_close(torch.cat(inputs.hidden), expected[index], rtol=1e-5, atol=1e-6)


def test_capture_stops_at_the_first_layer():
    model = make_tiny_model("llama")
    plan = transform_plan(model)
    later = []
    model.get_submodule(plan.layers[1].block).register_forward_pre_hook(lambda *_: later.append(1))
    capture_first_layer_inputs(model, model.get_submodule(plan.layers[0].block), TOKENS, batch_size=3)
    assert later == []
