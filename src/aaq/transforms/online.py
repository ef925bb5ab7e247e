"""Online rotations: the transforms that run in the forward pass, installed from the plan and the transform switches.

R3 rotates queries and keys after RoPE (so the KV cache is quantized in a rotated basis; it cancels
in q.k), R4 the input of the MLP's down projection. Both are fixed Hadamards applied with the fast
Walsh-Hadamard transform; R4's inverse is fused into the weight it feeds (`aaq.transforms.rotation`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from aaq.models.attention import QK_ROTATION, set_attention_hook
from aaq.models.plan import TransformConfig, TransformPlan
from aaq.transforms.hadamard import fast_hadamard_transform

# When the rotations are installed: while learnable transforms are calibrated, once the transforms are
# fused into the weights, or when a saved run is rebuilt.
OnlinePhase = Literal["calibration", "final", "reload"]
ONLINE_PHASES: tuple[str, ...] = ("calibration", "final", "reload")


class OnlineHadamard(nn.Module):
    """x -> x H^T / sqrt(n) over the last dimension (the fast Walsh-Hadamard transform)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_hadamard_transform(x)


def rotate_input(_module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: the module's first input, R4-rotated."""
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


def install_online_rotations(model: PreTrainedModel, plan: TransformPlan, config: TransformConfig, phase: OnlinePhase) -> OnlineRotations:
    """Put the online rotations `config` switches on into the forward pass, as `phase` needs them.

    `calibration`: R3 alone; learnable transforms apply R4 themselves while they learn (the weight form
    before its rebuilt down projection, the activation form around the quantizer). `final` (the transforms
    fused) and `reload`: R3 and R4. R3 is set on the attention by name, so `final` after `calibration`
    replaces it rather than rotating twice.
    """
    if phase not in ONLINE_PHASES:
        raise ValueError(f"unknown online-rotation phase {phase!r}; one of {ONLINE_PHASES}")
    installed = OnlineRotations()
    for layer in plan.layers:
        if config.r3:
            attention = model.get_submodule(layer.attention)
            set_attention_hook(attention, QK_ROTATION, OnlineHadamard())
            installed.attentions.append(attention)
        if config.r4 and phase != "calibration":
            installed.handles.append(model.get_submodule(layer.mlp_hidden.reader).register_forward_pre_hook(rotate_input))
    return installed
