"""Online rotations: installed from the plan, they keep the function, and come out again."""

import pytest
import torch

from aaq.models.plan import TransformConfig
from tests.helpers import TOKENS, prepared_model


def test_qk_hadamard_alone_keeps_logits():
    model, reference = prepared_model("fp", r3=True)
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, reference, atol=1e-5)


def test_r4_rotates_the_mlp_readers_input_and_comes_out_again():
    from aaq.models import transform_plan
    from aaq.transforms.hadamard import fast_hadamard_transform
    from aaq.transforms.online import install_online_rotations

    model, _ = prepared_model("fp")
    plan = transform_plan(model)
    reader = model.get_submodule(plan.layers[1].mlp_hidden.reader)
    seen = []
    reader.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    x = torch.randn(3, reader.in_features)
    online = install_online_rotations(model, plan, TransformConfig(), "final")
    reader(x)
    assert torch.allclose(seen[-1], fast_hadamard_transform(x))
    assert all(model.get_submodule(layer.attention).qk_rotation is not None for layer in plan.layers)
    online.remove()
    reader(x)
    assert torch.equal(seen[-1], x)
    assert all(model.get_submodule(layer.attention).qk_rotation is None for layer in plan.layers)


def test_r4_without_its_fused_inverse_changes_the_function():
    """Guards the equivalence tests: the online R4 alone (no inverse in the weights) must be visible."""
    from aaq.models import transform_plan
    from aaq.transforms.online import install_online_rotations

    model, reference = prepared_model("fp")
    install_online_rotations(model, transform_plan(model), TransformConfig(r3=False), "final")
    with torch.no_grad():
        assert not torch.allclose(model(TOKENS).logits, reference, atol=1e-3)


@pytest.mark.parametrize(("phase", "r4_online"), [("calibration", False), ("final", True), ("reload", True)])
def test_each_phase_installs_what_it_needs_and_reinstalling_r3_replaces_it(phase, r4_online):
    """While transforms learn they apply R4 themselves; afterwards R4 runs online. R3 is never applied twice."""
    from aaq.models import transform_plan
    from aaq.transforms.hadamard import fast_hadamard_transform
    from aaq.transforms.online import install_online_rotations

    model, _ = prepared_model("fp")
    plan = transform_plan(model)
    reader = model.get_submodule(plan.layers[0].mlp_hidden.reader)
    seen = []
    reader.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    x = torch.randn(2, reader.in_features)
    install_online_rotations(model, plan, TransformConfig(), "calibration")
    first = model.get_submodule(plan.layers[0].attention).qk_rotation
    install_online_rotations(model, plan, TransformConfig(), phase)
    reader(x)
    assert torch.allclose(seen[-1], fast_hadamard_transform(x) if r4_online else x)
    assert model.get_submodule(plan.layers[0].attention).qk_rotation is not first  # replaced, not stacked
