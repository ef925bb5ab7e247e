"""Online rotations: installed from the plan, they keep the function, and come out again."""

import torch

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
    online = install_online_rotations(model, plan, r3=True, r4=True)
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
    install_online_rotations(model, transform_plan(model), r3=False, r4=True)
    with torch.no_grad():
        assert not torch.allclose(model(TOKENS).logits, reference, atol=1e-3)
