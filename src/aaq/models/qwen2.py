"""Qwen2 and Qwen2.5: biases on q/k/v, which the transforms rotate and scale with the v weights."""

from aaq.models.base import ModelAdapter


class Qwen2Adapter(ModelAdapter):
    """The shared layout; the biases need nothing here, the transform math handles every bias."""

    architectures = ("Qwen2ForCausalLM",)
