"""The settings a user may change on top of any method's config (a recipe's or the defaults).

A front end fills `MethodOptions` from its own inputs (the CLI from its flags) and calls
`MethodConfig.with_options`; each method config applies the options it understands and refuses the
others, naming them, so a setting is never silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MethodOptions:
    """Method settings to change; None keeps the config's value.

    transforms: fields of `aaq.models.plan.TransformConfig` to change (r1, r2, r3, r4, smoothing), by name.
    weight_quantizer, damp, act_order, static_groups, onload_layers: the weight step (`GPTQConfig`). steps,
    batch_size, loss, lam, cache, weights_in_loop, activation_checkpointing, teacher_batch, micro_batch,
    sequential_teachers, optimizer, rotation_lr, scale_lr, heldout_windows, heldout_every, restore_best,
    heldout_patience: the calibration of learned transforms
    (`CalibrationSettings`); loss, lam, top_k (the pull's k), push_tokens, push_k: its loss (`LossConfig`).
    """

    transforms: Mapping[str, Any] = field(default_factory=dict)
    weight_quantizer: str | None = None
    damp: float | None = None
    act_order: bool | None = None
    static_groups: bool | None = None
    onload_layers: bool | None = None
    steps: int | None = None
    batch_size: int | None = None
    loss: str | None = None
    lam: float | None = None
    cache: bool | None = None
    weights_in_loop: bool | None = None
    activation_checkpointing: bool | None = None
    teacher_batch: int | None = None
    micro_batch: int | None = None
    sequential_teachers: bool | None = None
    optimizer: str | None = None
    rotation_lr: float | None = None
    scale_lr: float | None = None
    heldout_windows: int | None = None
    heldout_every: int | None = None
    restore_best: bool | None = None
    heldout_patience: int | None = None
    top_k: int | None = None
    push_tokens: str | None = None
    push_k: int | None = None

    def given(self) -> dict[str, Any]:
        """The options that were set, by name (a transform switch by its own name)."""
        options = {name: value for name, value in asdict(self).items() if name != "transforms" and value is not None}
        return {**{name: value for name, value in self.transforms.items() if value is not None}, **options}
