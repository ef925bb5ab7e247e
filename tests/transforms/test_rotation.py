"""Rotations are exact: with quantization off the transformed model computes the original function."""

import pytest
import torch
from torch import nn

from aaq.models import transform_plan
from aaq.models.plan import Geometry, TransformConfig
from aaq.quant.fake_quant import install_quantizers
from aaq.quant.quantizers import QuantScheme
from aaq.transforms.hadamard import random_hadamard
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import (
    TransformValues,
    channel_reader,
    channel_writer,
    fuse_norm_into_linears,
    head_reader,
    head_writer,
    rotate_model,
    smoothing_source,
    stream_reader,
    stream_writer,
    ties_embeddings,
)
from tests.helpers import FAMILIES, make_tiny_model

TOKENS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _rotate_and_prepare(model, config: TransformConfig):
    plan = transform_plan(model)
    transforms = rotate_model(model, plan, config)
    install_quantizers(model, plan, QuantScheme.from_string("fp"))
    install_online_rotations(model, plan, config, "final")
    return transforms


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hidden_size,num_heads", [(96, 6), (64, 4)])
def test_fused_rotated_model_keeps_logits(family, hidden_size, num_heads):
    model = make_tiny_model(family, hidden_size=hidden_size, num_heads=num_heads)
    reference = _logits(model)
    transforms = _rotate_and_prepare(model, TransformConfig())
    assert transforms.r1 is not None and len(transforms.r2) == 2
    assert _relative_error(_logits(model), reference) < 1e-4


@pytest.mark.parametrize("r1", ["hadamard", "random", "none"])
def test_each_rotation_kind_keeps_logits(r1):
    model = make_tiny_model("qwen2")
    reference = _logits(model)
    _rotate_and_prepare(model, TransformConfig(r1=r1, r2="hadamard", r3=False, r4=True))
    assert _relative_error(_logits(model), reference) < 1e-4


def test_rotation_changes_the_weights_it_claims_to():
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _rotate_and_prepare(model, TransformConfig())
    after = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert not torch.allclose(before[name], after[name])
    assert torch.equal(after["model.layers.0.input_layernorm.weight"], torch.ones(96))


def test_tied_embeddings_are_untied_and_both_correct():
    model = make_tiny_model("llama", tie=True)
    plan = transform_plan(model)
    assert ties_embeddings(model, plan)
    reference = _logits(model)
    _rotate_and_prepare(model, TransformConfig())
    assert not ties_embeddings(model, plan)
    assert model.config.tie_word_embeddings is False
    assert _relative_error(_logits(model), reference) < 1e-4


def test_wrong_rotation_breaks_equivalence():
    """Guards the test itself: an inconsistent rotation must be detected."""
    model = make_tiny_model("llama")
    reference = _logits(model)
    plan = transform_plan(model)
    rotate_model(model, plan, TransformConfig(r3=False, r4=True))
    install_quantizers(model, plan, QuantScheme.from_string("fp"))
    assert _relative_error(_logits(model), reference) > 1e-2


def _linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(n_in, n_out, bias=bias).double()
    return linear


def _apply(linear: nn.Linear, weight_transform, values: TransformValues, bias_transform=None) -> None:
    """Replace a float64 linear's weight (and bias) by their transformed values."""
    with torch.no_grad():
        linear.weight.data = weight_transform(linear.weight, values)
        if bias_transform is not None:
            linear.bias.data = bias_transform(linear.bias, values)


def test_reader_writer_pair_is_identity_in_float64():
    torch.manual_seed(0)
    writer, reader = _linear(8, 12), _linear(12, 5)
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = reader(writer(x))
    q = random_hadamard(12, torch.Generator().manual_seed(0))
    values = TransformValues(r1=q, r2=None)
    _apply(writer, stream_writer, values, stream_writer)
    _apply(reader, stream_reader("attn"), values)
    assert torch.allclose(reader(writer(x)), expected, atol=1e-12)


def test_head_rotation_pair_is_identity_in_float64():
    torch.manual_seed(0)
    head_dim = 4
    geometry = Geometry(hidden_size=10, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=head_dim, intermediate_size=8, vocab_size=4)
    v_proj, o_proj = _linear(10, 2 * head_dim), _linear(2 * head_dim, 10)
    x = torch.randn(3, 10, dtype=torch.float64)
    expected = o_proj(v_proj(x))
    values = TransformValues(r1=None, r2=random_hadamard(head_dim, torch.Generator().manual_seed(0)))
    _apply(v_proj, head_writer(geometry), values, head_writer(geometry))
    _apply(o_proj, head_reader(geometry), values)
    heads = v_proj(x).unflatten(-1, (2, head_dim))
    assert torch.allclose(o_proj(heads.flatten(-2)), expected, atol=1e-12)


def test_smoothing_pairs_are_identity_in_float64():
    torch.manual_seed(0)
    norm = nn.RMSNorm(6).double()
    reader = _linear(6, 4)
    up, down = _linear(6, 8), _linear(8, 3)
    x = torch.randn(5, 6, dtype=torch.float64)
    expected_stream, expected_channels = reader(norm(x)), down(up(x))
    values = TransformValues(r1=None, r2=None, attn=torch.rand(6, dtype=torch.float64) + 0.5, down=torch.rand(8, dtype=torch.float64) + 0.5)
    with torch.no_grad():
        norm.weight.data = smoothing_source("attn")(norm.weight, values)
    _apply(reader, stream_reader("attn"), values)
    _apply(up, channel_writer, values, channel_writer)
    _apply(down, channel_reader, values)
    assert torch.allclose(reader(norm(x)), expected_stream, atol=1e-12)
    assert torch.allclose(down(up(x)), expected_channels, atol=1e-12)


def test_norm_fusion_moves_the_gain():
    torch.manual_seed(0)
    norm = nn.RMSNorm(6).double()
    nn.init.uniform_(norm.weight, 0.5, 2.0)
    linear = _linear(6, 3)
    x = torch.randn(4, 6, dtype=torch.float64)
    expected = linear(norm(x))
    fuse_norm_into_linears(norm, (linear,))
    assert torch.equal(norm.weight, torch.ones(6, dtype=torch.float64))
    assert torch.allclose(linear(norm(x)), expected, atol=1e-12)


def test_fused_online_hadamard_matches_fast_transform():
    from aaq.transforms.hadamard import fast_hadamard_transform

    torch.manual_seed(0)
    linear = _linear(24, 5)
    x = torch.randn(7, 24, dtype=torch.float64)
    expected = linear(x)
    _apply(linear, channel_reader, TransformValues(r1=None, r2=None, r4=True))
    assert torch.allclose(linear(fast_hadamard_transform(x)), expected, atol=1e-12)


def test_unknown_rotation_kind_is_a_clear_error():
    from aaq.errors import AaqError

    with pytest.raises(AaqError, match="unknown r1 rotation"):
        TransformConfig(r1="dct")
