"""The attention function aaq registers with transformers, where q, k and v are seen after RoPE.

transformers calls attention through its `AttentionInterface`; aaq's function wraps the SDPA one
and applies, on each attention module that has them, the online query/key rotation (R3, set by
`aaq.transforms.online`) and then the KV-cache quantizer (set by `aaq.quant.fake_quant`). No modeling code is
forked. The cache stores keys and values as computed; both operations act on one (token, head)
row at a time when the values are read, which equals applying them on write.
"""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_IMPLEMENTATION = "aaq_sdpa"
QK_ROTATION = "qk_rotation"
KV_QUANTIZER = "kv_quantizer"


def _attention(module: nn.Module, query, key, value, *args, **kwargs):
    rotation = getattr(module, QK_ROTATION, None)
    if rotation is not None:
        query, key = rotation(query), rotation(key)
    quantizer = getattr(module, KV_QUANTIZER, None)
    if quantizer is not None:
        key, value = quantizer(key), quantizer(value)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def use_aaq_attention(model: PreTrainedModel) -> None:
    """Route `model`'s attention through aaq's function, registering it with transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, _attention)
    # Without a mask function of its own, transformers builds no mask for a custom attention name:
    # padding (left-padded generation batches) and sliding windows would be ignored.
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    model.set_attn_implementation(ATTENTION_IMPLEMENTATION)


def set_attention_hook(attention: nn.Module, slot: str, module: nn.Module | None) -> None:
    """Put `module` (or nothing) into one of the attention module's slots, `QK_ROTATION` or `KV_QUANTIZER`."""
    setattr(attention, slot, module)
