"""The fake-quantized forward: which tensors are quantized, through the attention hook point for the KV cache."""

import pytest
import torch

from aaq.errors import AaqError
from aaq.models import transform_plan
from aaq.models.attention import ATTENTION_IMPLEMENTATION
from aaq.quant.fake_quant import QuantLinear, install_quantizers
from aaq.quant.quantizers import QuantScheme
from tests.helpers import TOKENS, prepared_model


def test_every_projection_is_wrapped_and_names_are_kept():
    model, _ = prepared_model("w4a4kv4")
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 2 * 7
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert not isinstance(model.lm_head, QuantLinear)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION


def test_full_precision_scheme_changes_nothing():
    model, reference = prepared_model("fp")
    with torch.no_grad():
        assert torch.allclose(model(TOKENS).logits, reference, atol=1e-5)


def test_kv_quantization_is_active_through_the_attention_function():
    model, reference = prepared_model("w16a16kv4")
    with torch.no_grad():
        out = model(TOKENS).logits
    assert not torch.allclose(out, reference, atol=1e-3)


def test_activation_quantization_is_bounded_noise():
    model, reference = prepared_model("w16a8")
    with torch.no_grad():
        out = model(TOKENS).logits
    error = ((out - reference).norm() / reference.norm()).item()
    assert 0 < error < 0.05








def test_quantizing_twice_is_refused():
    model, _ = prepared_model("w4a4kv4")
    with pytest.raises(AaqError, match="already quantized"):
        install_quantizers(model, transform_plan(model), QuantScheme.from_string("w4a4kv4"))
