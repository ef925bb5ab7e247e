"""Mistral: sliding-window attention changes only the mask, which no transform touches."""

from aaq.models.base import ModelAdapter


class MistralAdapter(ModelAdapter):
    """The shared layout, unchanged."""

    architectures = ("MistralForCausalLM",)
