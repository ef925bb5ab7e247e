"""The adapter of the Llama-style pre-norm decoder layout that every supported family shares.

An adapter names a family's modules by the role they play and turns them into the model's
`TransformPlan`; rotation, calibration, quantization and export code read only the plan. A family
whose modules are named differently overrides the names below.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from aaq.models.plan import ChannelPair, Geometry, HeadPair, LayerPlan, NormReaders, TransformPlan


class ModelAdapter:
    """The module names of one family: model-level paths, and paths inside one decoder layer."""

    architectures: ClassVar[tuple[str, ...]] = ()
    embeddings: ClassVar[str] = "model.embed_tokens"
    decoder_layers: ClassVar[str] = "model.layers"
    final_norm: ClassVar[str] = "model.norm"
    lm_head: ClassVar[str] = "lm_head"
    attention: ClassVar[str] = "self_attn"
    attention_norm: ClassVar[str] = "input_layernorm"
    q_proj: ClassVar[str] = "self_attn.q_proj"
    k_proj: ClassVar[str] = "self_attn.k_proj"
    v_proj: ClassVar[str] = "self_attn.v_proj"
    o_proj: ClassVar[str] = "self_attn.o_proj"
    mlp_norm: ClassVar[str] = "post_attention_layernorm"
    gate_proj: ClassVar[str] = "mlp.gate_proj"
    up_proj: ClassVar[str] = "mlp.up_proj"
    down_proj: ClassVar[str] = "mlp.down_proj"

    @classmethod
    def geometry(cls, config: PretrainedConfig) -> Geometry:
        """Attention and MLP shapes read from the model config."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return Geometry(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
        )

    @classmethod
    def layer_plan(cls, block: str) -> LayerPlan:
        """Where the transforms act in the decoder layer at path `block`."""

        def name(relative: str) -> str:
            return f"{block}.{relative}"

        return LayerPlan(
            block=block,
            attention=name(cls.attention),
            attention_input=NormReaders(name(cls.attention_norm), (name(cls.q_proj), name(cls.k_proj), name(cls.v_proj))),
            values=HeadPair(writer=name(cls.v_proj), reader=name(cls.o_proj)),
            mlp_input=NormReaders(name(cls.mlp_norm), (name(cls.gate_proj), name(cls.up_proj))),
            mlp_hidden=ChannelPair(writer=name(cls.up_proj), reader=name(cls.down_proj)),
            residual_writers=(name(cls.o_proj), name(cls.down_proj)),
        )

    @classmethod
    def plan(cls, model: PreTrainedModel) -> TransformPlan:
        """The transform plan of `model`."""
        layers = model.get_submodule(cls.decoder_layers)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"{cls.__name__}.decoder_layers must name a ModuleList, got {type(layers).__name__}")
        return TransformPlan(
            geometry=cls.geometry(model.config),
            embeddings=cls.embeddings,
            output=NormReaders(cls.final_norm, (cls.lm_head,)),
            layers=tuple(cls.layer_plan(f"{cls.decoder_layers}.{index}") for index in range(len(layers))),
        )
