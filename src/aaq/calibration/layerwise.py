"""Run a model one decoder layer at a time over cached inputs.

Layer-wise algorithms (GPTQ) need each layer's inputs as produced by the already-quantized layers
before it. Capturing the first layer's inputs once and pushing them through one layer at a time
costs one model forward in total, instead of one partial forward per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from aaq.runtime.devices import model_device


@dataclass
class LayerInputs:
    """Hidden states entering a layer, one tensor per batch, with the keyword arguments of each call."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def to(self, device: torch.device) -> LayerInputs:
        """These inputs (and every tensor among the keyword arguments) on `device`."""
        return LayerInputs(hidden=[h.to(device) for h in self.hidden], kwargs=[_moved(k, device) for k in self.kwargs])


def _moved(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (through tuples, lists and dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


class _StopForward(Exception):
    """Raised by the capture hook: nothing after the first layer needs to run."""


@torch.no_grad()
def capture_first_layer_inputs(model: PreTrainedModel, first_layer: nn.Module, tokens: torch.Tensor, batch_size: int) -> LayerInputs:
    """Inputs (hidden states and kwargs such as RoPE embeddings and masks) of the first decoder layer, `first_layer`."""
    captured = LayerInputs(hidden=[], kwargs=[])

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, tokens.shape[0], batch_size):
            with contextlib.suppress(_StopForward):
                model(input_ids=tokens[start : start + batch_size].to(model_device(model)), use_cache=False)
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: LayerInputs) -> LayerInputs:
    """Outputs of `layer` on every cached batch, ready to feed the next layer."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return LayerInputs(hidden=outputs, kwargs=inputs.kwargs)
