"""Architecture adapters: the only place that knows model families and their module names.

`transform_plan(model)` is what the rest of aaq asks for. A new family is one adapter file (a
`ModelAdapter` subclass naming its architectures and any module names that differ) plus
`register_adapter`.
"""

from transformers import PreTrainedModel

from aaq.errors import AaqError
from aaq.models.base import ModelAdapter
from aaq.models.llama import LlamaAdapter
from aaq.models.mistral import MistralAdapter
from aaq.models.plan import TransformPlan
from aaq.models.qwen2 import Qwen2Adapter
from aaq.models.qwen3 import Qwen3Adapter

_ADAPTERS: list[type[ModelAdapter]] = [LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter]


def register_adapter(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Make aaq accept the architectures of `adapter` (usable as a class decorator)."""
    taken = set(supported_architectures()) & set(adapter.architectures)
    if taken:
        raise ValueError(f"architectures {sorted(taken)} already have an adapter")
    _ADAPTERS.append(adapter)
    return adapter


def supported_architectures() -> list[str]:
    """transformers class names that aaq can quantize."""
    return [arch for adapter in _ADAPTERS for arch in adapter.architectures]


def adapter_for(model: PreTrainedModel) -> type[ModelAdapter]:
    """The adapter of `model`'s architecture; AaqError for anything unsupported."""
    name = type(model).__name__
    for adapter in _ADAPTERS:
        if name in adapter.architectures:
            return adapter
    raise AaqError(
        f"unsupported architecture {name}; aaq supports {', '.join(supported_architectures())} "
        "(load the model as one of these causal-LM classes, or register an adapter for it)"
    )


def transform_plan(model: PreTrainedModel) -> TransformPlan:
    """Where every transform acts in `model` (see `aaq.models.plan`)."""
    return adapter_for(model).plan(model)


__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "supported_architectures", "transform_plan"]
