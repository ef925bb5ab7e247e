"""aaq's attention function: q/k rotation then KV-cache quantization, registered explicitly."""

import torch

from tests.helpers import TOKENS, prepared_model


def test_generation_with_kv_cache_matches_full_forward():
    model, _ = prepared_model("w4a4kv4", r3=True)
    with torch.no_grad():
        generated = model.generate(TOKENS[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = model(generated).logits[0, 7:-1].argmax(-1)
    assert torch.equal(full, generated[0, 8:])


def test_the_query_key_rotation_runs_before_the_kv_quantizer():
    """R3 must rotate keys before they are quantized: that is what puts the KV cache in a rotated basis."""
    from torch import nn

    from aaq.models.attention import KV_QUANTIZER, QK_ROTATION, _attention, set_attention_hook

    calls = []

    class Recorder(nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    model, _ = prepared_model("fp")
    attention = model.model.layers[0].self_attn
    set_attention_hook(attention, QK_ROTATION, Recorder("rotate"))
    set_attention_hook(attention, KV_QUANTIZER, Recorder("quantize"))
    q = k = v = torch.randn(1, 2, 4, 16)
    _attention(attention, q, k, v, None, scaling=0.25, dropout=0.0)
    assert calls == ["rotate", "rotate", "quantize", "quantize"]


def test_attention_function_is_registered_only_when_a_model_asks_for_it():
    from transformers import AttentionInterface

    from aaq.models.attention import ATTENTION_IMPLEMENTATION, use_aaq_attention
    from tests.helpers import make_tiny_model

    model = make_tiny_model("llama")
    assert model.config._attn_implementation != ATTENTION_IMPLEMENTATION
    use_aaq_attention(model)
    assert model.config._attn_implementation == ATTENTION_IMPLEMENTATION
    assert ATTENTION_IMPLEMENTATION in AttentionInterface._global_mapping


def test_padding_is_masked_as_plain_transformers_masks_it():
    """Left-padded batches (generation, scoring) must not attend to the padding."""
    from tests.helpers import make_tiny_model

    ids = torch.randint(4, 120, (1, 10), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    model, _ = prepared_model("fp")
    with torch.no_grad():
        alone = model(ids).logits[0, -1]
        with_padding = model(padded, attention_mask=mask, position_ids=positions).logits[0, -1]
        plain = make_tiny_model("llama")(padded, attention_mask=mask, position_ids=positions).logits[0, -1]
    torch.testing.assert_close(with_padding, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_padding, plain, rtol=1e-5, atol=1e-5)
