"""The math of the equivalence transforms on weights, and fusing them into a model.

With the row-vector convention of `nn.Linear` (y = x W^T + b), rotating the residual stream by an
orthogonal R1 (x' = x R1) is undone by W' = W R1 on every linear that reads the stream and by
W' = R1^T W, b' = b R1 on every linear (and the embedding, E' = E R1) that writes it. R2 does the
same per attention head between the head pair's writer and reader; a smoothing scale s divides the
source's output channels (a norm gain or a writer's rows) and multiplies the readers' input columns;
the online R4 feeds x H^T to the MLP's down projection, whose weight carries the inverse (W H^T).

Each linear gets the transform of its input side (the role it reads in: stream reader, head reader,
channel reader) composed with that of its output side (stream writer, head writer, channel writer),
as the plan says. One set of functions serves three callers: QuaRot's fixed rotations and the
learned transforms are fused with them in float64 (`fuse_transforms`), and the learnable weight form
(`aaq.transforms.learnable`) runs them every step with autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from aaq.errors import AaqError
from aaq.models.plan import Geometry, LayerPlan, RotationKind, TransformConfig, TransformPlan
from aaq.transforms.hadamard import fast_hadamard_transform, hadamard_matrix, random_hadamard, random_orthogonal


@dataclass(frozen=True)
class TransformValues:
    """One decoder layer's transforms as tensors of one dtype; None where a transform is absent.

    `attn`, `mlp`, `vo`, `down`: the positive smoothing scales of the layer's four pairs. `r4`:
    whether the online Hadamard feeds the MLP's down projection.
    """

    r1: Tensor | None
    r2: Tensor | None
    attn: Tensor | None = None
    mlp: Tensor | None = None
    vo: Tensor | None = None
    down: Tensor | None = None
    r4: bool = False


Transform = Callable[[Tensor, TransformValues], Tensor]


def scale_columns(w: Tensor, s: Tensor | None) -> Tensor:
    """`w` with its columns (last axis) multiplied by `s` (unchanged when `s` is None)."""
    return w if s is None else w * s


def _divide(w: Tensor, s: Tensor | None) -> Tensor:
    """`w` with its first axis divided by `s` (unchanged when `s` is None)."""
    if s is None:
        return w
    return w / (s if w.dim() == 1 else s.unsqueeze(-1))


def _heads_rotated(w: Tensor, r2: Tensor | None, head_dim: int) -> Tensor:
    """Rows of a head writer rotated per head: W_h -> R2^T W_h (a bias b_h -> b_h R2)."""
    if r2 is None:
        return w
    blocks = w.unflatten(0, (-1, head_dim))
    rotated = blocks @ r2 if w.dim() == 1 else torch.einsum("dj,hdi->hji", r2, blocks)
    return rotated.flatten(0, 1)


def query_head_scales(vo: Tensor | None, groups: int, head_dim: int) -> Tensor | None:
    """v -> o scales (one block per KV head) repeated over the query heads that read each KV head (GQA)."""
    return None if vo is None else vo.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0).flatten()


def stream_reader(kind: str) -> Transform:
    """Input side of a linear reading the residual stream behind a norm: W -> W R1 diag(s_kind)."""

    def transform(w: Tensor, v: TransformValues) -> Tensor:
        s = getattr(v, kind)
        # The scale rides on the small rotation (W (R1 diag(s)), not (W R1) diag(s)): the backward
        # of the weight form then needs only the resident original W, not a saved weight-sized product.
        return scale_columns(w, s) if v.r1 is None else w @ scale_columns(v.r1, s)

    return transform


def head_reader(geometry: Geometry) -> Transform:
    """Input side of the head pair's reader: each query head's column block W_h -> W_h diag(s_h) R2."""
    hd, groups = geometry.head_dim, geometry.kv_groups

    def transform(w: Tensor, v: TransformValues) -> Tensor:
        scales = query_head_scales(v.vo, groups, hd)
        if v.r2 is None:
            return scale_columns(w, scales)
        heads = w.shape[1] // hd
        # Per head, not one block-diagonal matmul: heads x fewer multiply-adds for the same product.
        per_head = v.r2.expand(heads, hd, hd) if scales is None else v.r2 * scales.view(heads, 1, hd)
        return torch.einsum("ohi,hij->ohj", w.unflatten(1, (heads, hd)), per_head).flatten(1)

    return transform


def channel_reader(w: Tensor, v: TransformValues) -> Tensor:
    """Input side of the channel pair's reader: W -> W diag(s) H^T when the online R4 feeds it x H^T."""
    scaled = scale_columns(w, v.down)
    return fast_hadamard_transform(scaled) if v.r4 else scaled


def stream_writer(w: Tensor, v: TransformValues) -> Tensor:
    """Output side of a linear writing the residual stream: W -> R1^T W (a bias b -> b R1)."""
    if v.r1 is None:
        return w
    return w @ v.r1 if w.dim() == 1 else v.r1.T @ w


def head_writer(geometry: Geometry) -> Transform:
    """Output side of the head pair's writer: each KV head's rows R2^T W_h, divided by the v -> o scales."""
    return lambda w, v: _divide(_heads_rotated(w, v.r2, geometry.head_dim), v.vo)


def channel_writer(w: Tensor, v: TransformValues) -> Tensor:
    """Output side of the channel pair's writer: rows (and bias) divided by the up -> down scales."""
    return _divide(w, v.down)


def smoothing_source(kind: str) -> Transform:
    """A norm gain divided by the smoothing scale of its readers."""
    return lambda w, v: _divide(w, getattr(v, kind))


def _composed(inner: Transform | None, outer: Transform | None) -> Transform:
    if inner is None:
        return outer
    if outer is None:
        return inner
    return lambda w, v: outer(inner(w, v), v)


def tensor_transforms(model: PreTrainedModel, layer: LayerPlan, geometry: Geometry, smoothing: bool) -> dict[tuple[nn.Module, str], Transform]:
    """Every (module, tensor name) of a decoder layer that the transforms change, with the function giving its new value.

    A linear's weight gets its input side composed with its output side; a bias only its output
    side; a norm gain its smoothing scale (when `smoothing`).
    """
    inputs: dict[str, Transform] = {name: stream_reader("attn") for name in layer.attention_input.readers}
    inputs |= {name: stream_reader("mlp") for name in layer.mlp_input.readers}
    inputs |= {layer.values.reader: head_reader(geometry), layer.mlp_hidden.reader: channel_reader}
    outputs: dict[str, Transform] = dict.fromkeys(layer.residual_writers, stream_writer)
    outputs |= {layer.values.writer: head_writer(geometry), layer.mlp_hidden.writer: channel_writer}
    out: dict[tuple[nn.Module, str], Transform] = {}
    for name in layer.linears:
        linear = model.get_submodule(name)
        weight = _composed(inputs.get(name), outputs.get(name))
        if weight is not None:
            out[(linear, "weight")] = weight
        if linear.bias is not None and name in outputs:
            out[(linear, "bias")] = outputs[name]
    if smoothing:
        for kind, group in (("attn", layer.attention_input), ("mlp", layer.mlp_input)):
            out[(model.get_submodule(group.norm), "weight")] = smoothing_source(kind)
    return out


def _set(tensor: Tensor, value: Tensor) -> None:
    tensor.data = value.to(dtype=tensor.dtype, device=tensor.device)


def fuse_norm_into_linears(norm: nn.Module, linears: Sequence[nn.Linear]) -> None:
    """Fold the RMSNorm scale g into the following linears (W -> W diag(g)) and set g to 1.

    An RMSNorm without its scale commutes with any orthogonal rotation of its input, which is what
    lets R1 pass through it.
    """
    gain = norm.weight.detach().to(torch.float64)
    for linear in linears:
        _set(linear.weight, linear.weight.detach().to(torch.float64) * gain.to(linear.weight.device))
    _set(norm.weight, torch.ones_like(gain))


def ties_embeddings(model: PreTrainedModel, plan: TransformPlan) -> bool:
    """True when the lm_head shares its weight tensor with the embeddings."""
    return model.get_submodule(plan.lm_head).weight is model.get_submodule(plan.embeddings).weight


def untie_embeddings(model: PreTrainedModel, plan: TransformPlan) -> None:
    """Give the lm_head its own copy of the embedding weight.

    Norm fusion and R1 change the embedding (E -> E R1) and the lm_head (W -> W diag(g) R1)
    differently, so a shared tensor would be wrong after either.
    """
    if ties_embeddings(model, plan):
        lm_head = model.get_submodule(plan.lm_head)
        lm_head.weight = nn.Parameter(lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: PreTrainedModel, plan: TransformPlan) -> None:
    """Fold every norm gain into the linears that read it (lm_head included)."""
    untie_embeddings(model, plan)
    for group in plan.norm_groups:
        fuse_norm_into_linears(model.get_submodule(group.norm), [model.get_submodule(name) for name in group.readers])


@torch.no_grad()
def fuse_transforms(
    model: PreTrainedModel, plan: TransformPlan, values: Sequence[TransformValues], smoothing: bool, device: torch.device | None = None
) -> None:
    """Write each layer's transforms (`values`, one per layer, sharing R1) into the weights, in float64.

    Norms must be fused first. The embeddings and the lm_head take R1 on their rows and columns.
    Each tensor is computed on `device` (default: where it lives) and written back in its own
    dtype and device.
    """
    for layer, layer_values in zip(plan.layers, values, strict=True):
        on_device: dict[torch.device, TransformValues] = {}
        for (module, name), transform in tensor_transforms(model, layer, plan.geometry, smoothing).items():
            tensor = getattr(module, name)
            where = device or tensor.device
            if where not in on_device:
                on_device[where] = _float64(layer_values, where)
            _set(tensor, transform(tensor.detach().to(where, torch.float64), on_device[where]))
    r1 = values[0].r1
    if r1 is not None:
        for name in (plan.embeddings, plan.lm_head):
            # Both multiply rows of (vocab, hidden) by R1: the embedding writes x R1, the lm_head reads it.
            weight = model.get_submodule(name).weight
            where = device or weight.device
            _set(weight, weight.detach().to(where, torch.float64) @ r1.to(where, torch.float64))


def _float64(values: TransformValues, device: torch.device) -> TransformValues:
    def cast(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().to(device, torch.float64)

    return TransformValues(
        r1=cast(values.r1), r2=cast(values.r2), attn=cast(values.attn), mlp=cast(values.mlp),
        vo=cast(values.vo), down=cast(values.down), r4=values.r4,
    )  # fmt: skip


def normalized_hadamard(n: int) -> Tensor:
    """H_n / sqrt(n): the orthogonal matrix `fast_hadamard_transform` applies (x -> x H^T)."""
    return hadamard_matrix(n) / math.sqrt(n)


def rotate_reader(linear: nn.Linear, rotation: Tensor) -> None:
    """W -> W Q for a linear that reads its input rotated by Q (float64, on the weight's device)."""
    _set(linear.weight, linear.weight.detach().to(torch.float64) @ rotation.to(linear.weight.device, torch.float64))


def make_rotation(kind: RotationKind, n: int, generator: torch.Generator) -> Tensor | None:
    """An n x n orthogonal float64 matrix of the requested kind, or None for `none`."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return normalized_hadamard(n)
    if kind == "random_hadamard":
        return random_hadamard(n, generator)
    return random_orthogonal(n, generator)


@dataclass
class AppliedTransforms:
    """The transforms a method put into a model: which ones (`config`), and the fused rotations and scales.

    `r1`, `r2` (one per layer): float64 orthogonal matrices; `scales`: positive smoothing scales
    by `<kind>.<layer>`. Online R3/R4 have no parameters; `config` says whether they run.
    """

    config: TransformConfig
    r1: Tensor | None = None
    r2: list[Tensor] | None = None
    scales: dict[str, Tensor] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> tensor mapping for safetensors (on the CPU)."""
        out = {} if self.r1 is None else {"r1": self.r1}
        out |= {f"r2.{i}": r for i, r in enumerate(self.r2 or [])}
        out |= {f"scales.{name}": s for name, s in self.scales.items()}
        return {name: tensor.detach().cpu().contiguous() for name, tensor in out.items()}


def check_fixed(config: TransformConfig) -> None:
    """AaqError unless `config` describes fixed transforms only (no learned smoothing)."""
    if config.smoothing:
        raise AaqError("smoothing scales are learned, fixed transforms have none; use method ostquant or aaq")


@torch.no_grad()
def rotate_model(
    model: PreTrainedModel, plan: TransformPlan, config: TransformConfig, seed: int = 0, device: torch.device | None = None
) -> AppliedTransforms:
    """Fuse norms and QuaRot's fixed R1, R2 and the inverse of R4 into the weights; `seed` draws the random signs.

    The model computes its original function again once the online R3/R4 of `config` are installed
    (`aaq.transforms.online`). `device`: where the float64 fusion runs (default: where each weight lives).
    """
    check_fixed(config)
    generator = torch.Generator().manual_seed(seed)
    geometry = plan.geometry
    fuse_norms(model, plan)
    r1 = make_rotation(config.r1, geometry.hidden_size, generator)
    r2 = None if config.r2 == "none" else [make_rotation(config.r2, geometry.head_dim, generator) for _ in plan.layers]
    layers = range(len(plan.layers))
    # One rotation at a time, rounded to the weight dtype in between, so the fused weights (and every
    # QuaRot figure measured so far) stay bit-identical to earlier aaq. One float64 pass for all three
    # is slightly more accurate, but its ulp-sized differences are amplified by GPTQ's rounding
    # decisions (smollm2-135m W4A4KV4 PPL 27.44 -> 27.30).
    passes = [
        [TransformValues(r1=r1, r2=None) for _ in layers] if r1 is not None else None,
        [TransformValues(r1=None, r2=r) for r in r2] if r2 is not None else None,
        [TransformValues(r1=None, r2=None, r4=True) for _ in layers] if config.r4 else None,
    ]
    for values in passes:
        if values is not None:
            fuse_transforms(model, plan, values, smoothing=False, device=device)
    return AppliedTransforms(config=config, r1=r1, r2=r2)
