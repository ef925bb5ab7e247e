"""Learnable transforms keep the model's function at any parameter values, stay orthogonal, and fuse exactly."""

import geoopt
import pytest
import torch
from torch.nn.utils import parametrize

from aaq.models.plan import TransformConfig
from aaq.quant.quantizers import QuantScheme, fake_quantize
from aaq.transforms.learnable import relative_change
from tests.helpers import FAMILIES, calibration_setup, make_tiny_model, orthogonality_error

SMOOTHED = TransformConfig(smoothing=True)

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
FP = QuantScheme.from_string("fp")


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _optimised_state(family: str, config: TransformConfig, steps: int = 3) -> dict[str, torch.Tensor]:
    """Transform parameters after a few large Stiefel/SGD steps on a W4A4KV4 copy of the model.

    With quantization off the loss does not depend on the transforms at all (that is the invariant),
    so the parameters are optimised where they matter, with quantization on.
    """
    model = make_tiny_model(family)
    installed = calibration_setup(model, QuantScheme.from_string("w4a4kv4"), config)
    transforms = installed.transforms
    optimizers = [geoopt.optim.RiemannianSGD(transforms.rotation_parameters(), lr=0.5, momentum=0.9)]
    if transforms.scale_parameters():
        optimizers.append(torch.optim.SGD(transforms.scale_parameters(), lr=50.0, momentum=0.9))
    for _ in range(steps):
        loss = model(TOKENS).logits.pow(2).mean()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    return {k: v.detach().clone() for k, v in transforms.state_dict().items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_equivalent_at_init_after_steps_and_after_fuse(family):
    model = make_tiny_model(family)
    reference = _logits(model)
    installed = calibration_setup(model, FP, SMOOTHED)
    assert _relative_error(_logits(model), reference) < 1e-4
    transforms = installed.transforms
    r1_init = transforms.r1.detach().clone()
    optimised = _optimised_state(family, SMOOTHED)
    with torch.no_grad():
        transforms.load_state_dict(optimised)
    assert (transforms.r1.detach() - r1_init).norm() > 1e-3
    assert min(p.detach().abs().max().item() for p in transforms.scale_parameters()) > 1e-3
    assert _relative_error(_logits(model), reference) < 1e-4
    for rotation in transforms.rotation_parameters():
        assert orthogonality_error(rotation) < 1e-4
    learned = installed.fuse()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert _relative_error(_logits(model), reference) < 1e-4
    assert torch.allclose(learned.r1, transforms.r1.detach().double())
    assert len(learned.r2) == 2 and set(learned.scales) == {f"{k}.{i}" for k in ("attn", "mlp", "vo", "down") for i in (0, 1)}


def test_only_transform_parameters_get_gradients_and_all_of_them_do():
    model = make_tiny_model("qwen2")
    installed = calibration_setup(model, QuantScheme.from_string("w4a4kv4"), SMOOTHED)
    model(TOKENS).logits.square().mean().backward()
    transforms = installed.transforms
    for p in transforms.rotation_parameters() + transforms.scale_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_movement_is_zero_at_the_start_and_measures_each_parameter_from_its_snapshot():
    model = make_tiny_model("llama")
    transforms = calibration_setup(model, QuantScheme.from_string("w4a4kv4"), SMOOTHED).transforms
    start = transforms.snapshot()
    assert transforms.movement(start).to_dict() == {"r1": 0.0, "r2_mean": 0.0, "r2_max": 0.0, "scale_rms": 0.0}
    with torch.no_grad():
        transforms.r1.mul_(-1)  # every entry changes sign: ||R1 - R1_0|| = 2 ||R1_0||
        transforms.r2[1].copy_(torch.eye(transforms.r2[1].shape[0]))
        for p in transforms.scale_parameters():
            p.fill_(0.1)
    moved = transforms.movement(start)
    r2_last = relative_change(start["r2.1"], torch.eye(transforms.r2[1].shape[0]))
    assert moved.r1 == pytest.approx(2.0)
    assert moved.r2_max == pytest.approx(r2_last) and moved.r2_mean == pytest.approx(r2_last / len(transforms.r2))
    assert moved.scale_rms == pytest.approx(torch.tensor(0.1).exp().item() - 1)
    assert start["r1"].dtype == torch.float64 and not torch.equal(start["r1"], transforms.r1.detach().double())


def test_projection_weights_are_fake_quantized_in_training_but_fused_unquantized():
    model = make_tiny_model("llama")
    scheme = QuantScheme.from_string("w4a16")
    installed = calibration_setup(model, scheme, SMOOTHED)
    q_proj = model.model.layers[0].self_attn.q_proj
    plist = q_proj.parametrizations["weight"]
    unquantized = plist[0].transformed(plist.original)
    assert torch.allclose(q_proj.weight, fake_quantize(unquantized, scheme.weights))
    assert q_proj.weight.unique().numel() < unquantized.unique().numel()
    norm = model.model.layers[0].input_layernorm
    assert norm.parametrizations["weight"][0].spec is None
    installed.fuse()
    assert torch.allclose(q_proj.weight, unquantized.detach(), atol=1e-5)


def test_without_smoothing_there_are_no_scales_and_equivalence_holds():
    model = make_tiny_model("mistral")
    reference = _logits(model)
    config = TransformConfig(smoothing=False)
    installed = calibration_setup(model, FP, config)
    assert installed.transforms.scale_parameters() == []
    optimised = _optimised_state("mistral", config, steps=2)
    with torch.no_grad():
        installed.transforms.load_state_dict(optimised)
    installed.fuse()
    assert _relative_error(_logits(model), reference) < 1e-4


def test_inconsistent_transform_breaks_equivalence():
    """Guards the equivalence test: dropping the norm's inverse scale must change the logits."""
    model = make_tiny_model("llama")
    reference = _logits(model)
    installed = calibration_setup(model, FP, SMOOTHED)
    with torch.no_grad():
        installed.transforms.log_scales["attn"][0].fill_(0.5)
    parametrize.remove_parametrizations(model.model.layers[0].input_layernorm, "weight", leave_parametrized=False)
    assert _relative_error(_logits(model), reference) > 1e-2


def _transform_gradients(model, installed, tokens: torch.Tensor = TOKENS) -> list[torch.Tensor]:
    """Gradients of a loss for every transform parameter; rotations' as the optimiser sees them (Riemannian).

    The forms agree only on the manifold (one undoes R with R^T, the other relies on R R^T = I), so
    their Euclidean gradients of R differ while the tangent components must not.
    """
    loss = model(tokens).logits.square().mean()
    rotations, scales = installed.transforms.rotation_parameters(), installed.transforms.scale_parameters()
    grads = torch.autograd.grad(loss, rotations + scales)
    riemannian = [r.manifold.egrad2rgrad(r.detach(), g) for r, g in zip(rotations, grads[: len(rotations)], strict=True)]
    return riemannian + list(grads[len(rotations) :])


TOKEN_BATCHES = [TOKENS] + [torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(seed)) for seed in (2, 3)]


def _forms_agree(models: dict[bool, torch.nn.Module], installed: dict, tokens: torch.Tensor) -> bool:
    """Whether the activation form (False) and the weight form (True) give the same logits and Riemannian gradients on `tokens`."""
    with torch.no_grad():
        logits = {form: model(tokens).logits for form, model in models.items()}
    if _relative_error(logits[False], logits[True]) >= 1e-5:
        return False
    gradients = {form: _transform_gradients(models[form], installed[form], tokens) for form in models}
    return all(_relative_error(a, w) < 1e-3 for a, w in zip(gradients[False], gradients[True], strict=True))


@pytest.mark.parametrize(
    ("family", "config"),
    [(family, SMOOTHED) for family in FAMILIES] + [("mistral", TransformConfig(smoothing=False, r3=False, r4=False))],
)
def test_activation_form_computes_the_weight_form_in_value_gradient_and_fused_weights(family, config):
    """With unquantized weights the two forms are one function of the transforms.

    float64 keeps rounding flips away, except that RMSNorm computes in float32 (transformers casts),
    which bounds the agreement at ~1e-7 relative (~1e-4 for R1's gradient, a small difference of large
    terms once projected on the manifold); a wrong transform gives errors of order 1.
    """
    scheme = QuantScheme.from_string("w16a4kv4")
    optimised = {k: v.double() for k, v in _optimised_state(family, config).items()}
    models, installed = {}, {}
    for weights_in_loop in (True, False):
        model = make_tiny_model(family).double()
        installed[weights_in_loop] = calibration_setup(model, scheme, config, weights_in_loop=weights_in_loop)
        with torch.no_grad():
            installed[weights_in_loop].transforms.double().load_state_dict(optimised)
        models[weights_in_loop] = model
    assert not any(parametrize.is_parametrized(m) for m in models[False].modules())
    weight_form = _logits(models[True])
    assert _relative_error(weight_form, _logits(make_tiny_model(family).double())) > 1e-3
    # The forms order their float operations differently, so an activation lying within rounding of a
    # 4-bit rounding boundary can take the other code in one form (a 1e-3 effect in a model this small,
    # seen for one of these batches after a transformers update). A wrong transform disagrees on every batch.
    agreeing = [batch for batch in TOKEN_BATCHES if _forms_agree(models, installed, batch)]
    assert len(agreeing) >= len(TOKEN_BATCHES) - 1
    for weights_in_loop in (True, False):
        installed[weights_in_loop].fuse()
    fused = dict(models[False].state_dict().items())
    for name, value in models[True].state_dict().items():
        assert torch.allclose(fused[name], value, rtol=1e-12, atol=1e-12), name
    assert _relative_error(_logits(models[False]), weight_form) < 1e-5


def test_activation_form_with_quantization_off_keeps_the_original_logits():
    model = make_tiny_model("qwen2")
    reference = _logits(model)
    optimised = _optimised_state("qwen2", SMOOTHED)
    installed = calibration_setup(model, FP, SMOOTHED, weights_in_loop=False)
    with torch.no_grad():
        installed.transforms.load_state_dict(optimised)
    assert _relative_error(_logits(model), reference) < 1e-4


def _activation_form_gradients_and_saved_matrices(family: str) -> tuple[list[torch.Tensor], int]:
    """Float64 gradients of every transform parameter in the activation form (moved transforms, W4A4KV4), and how many
    (hidden x hidden) tensors other than parameters (R1, square weights) autograd saved for the backward."""
    optimised = {k: v.double() for k, v in _optimised_state(family, SMOOTHED).items()}
    model = make_tiny_model(family).double()
    installed = calibration_setup(model, QuantScheme.from_string("w4a4kv4"), SMOOTHED, weights_in_loop=False)
    transforms = installed.transforms.double()
    with torch.no_grad():
        transforms.load_state_dict(optimised)
    hidden = model.config.hidden_size
    parameters = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *transforms.parameters()]}
    matrices = []

    def pack(tensor):
        if tensor.shape[-2:] == (hidden, hidden) and tensor.untyped_storage().data_ptr() not in parameters:
            matrices.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(TOKENS).logits.square().mean()
    return list(torch.autograd.grad(loss, list(transforms.parameters()))), len(matrices)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_activation_form_rebuilds_its_matrices_in_the_backward_with_the_same_gradients(family, monkeypatch):
    """Autograd through the plain products keeps four hidden x hidden matrices per layer; the activation form keeps none, same gradients (float64).

    (Autograd keeps one fewer: the first product of layer 0 acts on the embeddings, which need no gradient.)
    """
    rebuilt, kept = _activation_form_gradients_and_saved_matrices(family)
    monkeypatch.setattr("aaq.transforms.learnable._product_with_rebuilt_matrix", lambda x, build, *parameters: x @ build(*parameters))
    plain, kept_by_autograd = _activation_form_gradients_and_saved_matrices(family)
    assert kept == 0 and kept_by_autograd == 4 * make_tiny_model(family).config.num_hidden_layers - 1
    assert all(g.abs().max() > 0 for g in plain)
    for a, b in zip(rebuilt, plain, strict=True):
        assert (a - b).abs().max() <= 1e-12 * b.abs().max()
