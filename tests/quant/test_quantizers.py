"""Quantizer error bounds, grids, STE gradients and the bit-string parser."""

import dataclasses

import pytest
import torch

from aaq.errors import AaqError
from aaq.quant.quantizers import ActivationQuantizer, QuantScheme, QuantSpec, fake_quantize, fake_quantize_for_training, quant_params, round_ste
from tests.helpers import rtn_weight


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 16])
def test_rtn_error_is_at_most_half_a_step(symmetric, bits, group_size):
    spec = QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    x = torch.randn(5, 7, 64, dtype=torch.float64)
    grouped = x.unflatten(-1, (-1, group_size)) if group_size else x.unsqueeze(-2)
    scale, _ = quant_params(grouped, spec)
    error = (fake_quantize(x, spec) - x).abs().unflatten(-1, grouped.shape[-2:])
    assert (error <= scale / 2 + 1e-12).all()


def test_values_lie_on_the_grid():
    spec = QuantSpec(bits=4, symmetric=False)
    x = torch.randn(3, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scale, zero = quant_params(x.unsqueeze(-2), spec)
    levels = fake_quantize(x, spec).unsqueeze(-2) / scale + zero
    assert torch.allclose(levels, levels.round(), atol=1e-9)
    # Recomputing a level as value / scale + zero leaves float noise (e.g. -9e-16 for level 0): compare integer levels.
    assert levels.round().min() >= 0 and levels.round().max() <= 15
    assert len(torch.unique(levels[0].round())) <= 16


def test_symmetric_range_is_signed():
    spec = QuantSpec(bits=4, symmetric=True)
    assert (spec.qmin, spec.qmax) == (-8, 7)
    assert (QuantSpec(bits=4, symmetric=False).qmin, QuantSpec(bits=4, symmetric=False).qmax) == (0, 15)


def test_zero_rows_and_exact_zeros_survive():
    spec = QuantSpec(bits=4, symmetric=False)
    x = torch.zeros(2, 8)
    assert torch.equal(fake_quantize(x, spec), x)
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert fake_quantize(y, spec)[0, 0] == 0


def test_clip_search_reduces_weight_error():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[:, 0] *= 20  # one outlier column makes the full range wasteful
    plain = rtn_weight(weight, QuantSpec(bits=4, symmetric=True))
    searched = rtn_weight(weight, QuantSpec(bits=4, symmetric=True, clip_search=True))
    assert (searched - weight).pow(2).sum() < 0.9 * (plain - weight).pow(2).sum()


def test_straight_through_gradient():
    x = torch.linspace(-2, 2, 11, requires_grad=True)
    round_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(11))

    x = torch.randn(4, 16, requires_grad=True)
    ActivationQuantizer(QuantSpec(bits=4, symmetric=False))(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "text,w,a,kv",
    [("w4a4kv4", 4, 4, 4), ("W4A8KV8", 4, 8, 8), ("w4a16", 4, None, None), ("w8a8", 8, 8, None), ("w4a4kv16", 4, 4, None)],
)
def test_bit_strings(text, w, a, kv):
    scheme = QuantScheme.from_string(text)
    bits = lambda spec: None if spec is None else spec.bits  # noqa: E731
    assert (bits(scheme.weights), bits(scheme.activations), bits(scheme.kv_cache)) == (w, a, kv)
    assert scheme.weights.symmetric and scheme.weights.clip_search
    assert scheme.activations is None or not scheme.activations.symmetric


@pytest.mark.parametrize("text", ["w4", "int4", "w4a4kv", "w7a4", "w4a4kv1", ""])
def test_bad_bit_strings_are_one_line_errors(text):
    with pytest.raises(AaqError) as info:
        QuantScheme.from_string(text)
    assert "\n" not in str(info.value) and "w4a4kv4" in str(info.value)


def test_scheme_round_trips_through_dict():
    scheme = dataclasses.replace(QuantScheme.from_string("w4a4kv4"), weights=QuantSpec(bits=4, symmetric=True, group_size=128))
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme


def test_group_size_must_divide():
    with pytest.raises(AaqError, match="not divisible"):
        fake_quantize(torch.randn(2, 10), QuantSpec(bits=4, symmetric=True, group_size=4))


def test_low_memory_quantizer_has_the_same_values_and_gradients():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weights = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    for spec in (QuantSpec(bits=4, symmetric=False, clip_ratio=0.7), QuantSpec(bits=4, symmetric=True, group_size=8)):
        out = fake_quantize_for_training(x, spec)
        assert torch.equal(out, fake_quantize(x, spec))
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        (expected,) = torch.autograd.grad((fake_quantize(x, spec) * weights).sum(), x)
        assert torch.allclose(grad, expected)
        assert not torch.allclose(grad, weights)  # the scale path contributes: not a plain identity STE


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, symmetric=True),
        QuantSpec(bits=4, symmetric=True, group_size=8, clip_ratio=0.8),
        QuantSpec(bits=4, symmetric=False),
        QuantSpec(bits=3, symmetric=False, group_size=4, clip_ratio=0.7),
        QuantSpec(bits=8, symmetric=False),
    ],
)
def test_training_quantizer_gradient_equals_autograd_through_the_quantizer(spec):
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x[0] = 0.0  # constant-zero row: scale 1, no scale path
    x[1, :4] = x[1].abs().max()  # tied maxima share the scale gradient
    x[2] = -x[2].abs()  # all-negative row: max clamped at 0
    x[3] = x[3].clamp(max=0.0)  # row maximum exactly 0
    grad = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    out = fake_quantize_for_training(leaf, spec)
    assert torch.equal(out, fake_quantize(x, spec))
    (closed_form,) = torch.autograd.grad(out, leaf, grad)
    (expected,) = torch.autograd.grad(fake_quantize(leaf, spec), leaf, grad)
    assert torch.allclose(closed_form, expected, rtol=1e-12, atol=1e-12)
