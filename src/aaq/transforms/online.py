"""Online rotations: the transforms that run in the forward pass, installed from the plan.

R3 rotates queries and keys after RoPE (so the KV cache is quantized in a rotated basis; it cancels
in q.k), R4 the input of the MLP's down projection. Both are fixed Hadamards applied with the fast
Walsh-Hadamard transform; R4's inverse is fused into the weight it feeds (`aaq.transforms.rotation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from aaq.models.attention import QK_ROTATION, set_attention_hook
from aaq.models.plan import TransformPlan
from aaq.transforms.hadamard import fast_hadamard_transform


class OnlineHadamard(nn.Module):
    """x -> x H^T / sqrt(n) over the last dimension (the fast Walsh-Hadamard transform)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_hadamard_transform(x)


def _rotate_input(_module: nn.Module, args: tuple) -> tuple:
    return (fast_hadamard_transform(args[0]), *args[1:])


@dataclass
class OnlineRotations:
    """Online rotations installed on a model, and how to take them out."""

    handles: list[RemovableHandle] = field(default_factory=list)
    attentions: list[nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        """Take every rotation installed here out of the forward pass."""
        for handle in self.handles:
            handle.remove()
        for attention in self.attentions:
            set_attention_hook(attention, QK_ROTATION, None)
        self.handles, self.attentions = [], []


def install_online_rotations(model: PreTrainedModel, plan: TransformPlan, r3: bool, r4: bool) -> OnlineRotations:
    """Put R3 (queries and keys after RoPE) and/or R4 (input of each MLP down projection) into the forward pass."""
    installed = OnlineRotations()
    for layer in plan.layers:
        if r3:
            attention = model.get_submodule(layer.attention)
            set_attention_hook(attention, QK_ROTATION, OnlineHadamard())
            installed.attentions.append(attention)
        if r4:
            installed.handles.append(model.get_submodule(layer.mlp_hidden.reader).register_forward_pre_hook(_rotate_input))
    return installed
