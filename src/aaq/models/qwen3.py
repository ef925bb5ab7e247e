"""Qwen3: per-head RMSNorm on q and k before RoPE.

Those norms act on head_dim inside q/k, so they stay in full precision and unfused; R1 acts on the
q/k inputs and R3 after RoPE, neither of which crosses them.
"""

from aaq.models.base import ModelAdapter


class Qwen3Adapter(ModelAdapter):
    """The shared layout, unchanged."""

    architectures = ("Qwen3ForCausalLM",)
