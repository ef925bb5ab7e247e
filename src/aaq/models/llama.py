"""Llama 2/3 and Llama-architecture models such as SmolLM2."""

from aaq.models.base import ModelAdapter


class LlamaAdapter(ModelAdapter):
    """The shared layout, unchanged."""

    architectures = ("LlamaForCausalLM",)
