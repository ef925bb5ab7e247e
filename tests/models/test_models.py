"""The adapter registry: supported architectures, one-line errors for the rest, registering a new family."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from aaq.errors import AaqError
from aaq.models import supported_architectures, transform_plan


def test_unknown_architecture_is_a_one_line_error():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(AaqError) as info:
        transform_plan(model)
    message = str(info.value)
    assert "GPT2LMHeadModel" in message and "LlamaForCausalLM" in message and "\n" not in message
    assert set(supported_architectures()) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def test_an_architecture_cannot_get_two_adapters():
    from aaq.models import ModelAdapter, register_adapter

    class Twice(ModelAdapter):
        architectures = ("LlamaForCausalLM",)

    with pytest.raises(ValueError, match="already have an adapter"):
        register_adapter(Twice)


