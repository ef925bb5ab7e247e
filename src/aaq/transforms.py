"""Learnable equivalence transforms (OSTQuant's Y = (W T)(T^-1 X)) applied to the weights on the fly.

After `rotation.fuse_norms`, every transformed weight is a function of its frozen original and a few
learnable parameters, installed with `torch.nn.utils.parametrize` so that the forward pass (and the
weight fake quantization that follows) always sees the current transform:

- R1 (d x d, orthogonal, Stiefel): residual stream; readers W -> W R1, writers W -> R1^T W.
- R2 (head_dim x head_dim per layer, orthogonal): value heads W_v,h -> R2^T W_v,h, o_proj column
  blocks W_o,h -> W_o,h R2.
- Smoothing scales s > 0 (stored as log s, so they stay positive), inverse on the other side:
  norm -> q/k/v and norm -> gate/up (norm weight 1/s, readers W diag(s)); v -> o (v rows / s, o columns
  * s repeated over each KV group's query heads); up -> down (up rows / s, down columns * s, then the
  fused inverse H^T of the fixed online R4 Hadamard).

Embedding and lm_head are rotated through their activations (E R1 on the looked-up rows, R1^T on the
lm_head input) instead of their weights: the weight form costs vocab x d^2 per step, the activation
form tokens x d^2, with the same result. With quantization off, the transformed model computes the
original function for any parameter values (the equivalence invariant). `fuse_learned_transforms`
writes the transforms into the weights in float64 and removes every hook and parametrization.

R1/R2 start as random Hadamards (QuaRot's transforms), the scales at 1.

Two ways to put the transforms into the forward pass, with the same function whenever the weights
are not quantized:

- weight form (`install_transforms`): every weight is recomputed from its original each step and
  fake-quantized; needed when the calibration trains against quantized weights (RTN follows).
- activation form (`install_activation_transforms`): the weights stay as they are and each
  activation quantizer sees its input in the transformed basis, x -> T^-1 quant(T x). This is what
  calibration uses when GPTQ quantizes the fused weights afterwards (as SpinQuant does): a step
  then costs tokens x d^2 instead of weights x d, the frozen linears save nothing for the backward,
  and inputs shared by q/k/v and by gate/up are quantized once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import geoopt
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from aaq.fake_quant import OnlineTransforms, QuantLinear, prepare_model
from aaq.hadamard import fast_hadamard_transform, random_hadamard
from aaq.models import DecoderLayerParts, ModelAdapter
from aaq.quantizers import QuantScheme, QuantSpec, fake_quantize_for_training
from aaq.rotation import FusedTransforms, RotationConfig, fuse_norms, rotate_embedding, rotate_reader

SCALE_KINDS = ("attn", "mlp", "vo", "down")


@dataclass(frozen=True)
class TransformConfig:
    """Which learnable transforms exist: R1 and R2 always; smoothing scales optionally; online R3/R4 (fixed)."""

    smoothing: bool = True
    r3: bool = True
    r4: bool = True

    @property
    def online(self) -> OnlineTransforms:
        """The fixed online Hadamards of this configuration."""
        return OnlineTransforms(qk_hadamard=self.r3, down_proj_hadamard=self.r4)


@dataclass(frozen=True)
class TransformValues:
    """The current transforms of one layer in a working dtype (scales already exponentiated; None = off)."""

    r1: Tensor
    r2: Tensor
    attn: Tensor | None
    mlp: Tensor | None
    vo: Tensor | None
    down: Tensor | None


class LearnableTransforms(nn.Module):
    """The learnable parameters: R1, per-layer R2 (Stiefel manifold parameters) and per-layer log-scales.

    `seed` draws the random Hadamard signs of the initial R1 and R2.
    """

    def __init__(self, adapter: ModelAdapter, config: TransformConfig, seed: int) -> None:
        super().__init__()
        geo = adapter.geometry
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.seed = seed
        self.kv_groups = geo.kv_groups
        self.head_dim = geo.head_dim
        self.r1 = _stiefel(random_hadamard(geo.hidden_size, generator))
        self.r2 = nn.ParameterList([_stiefel(random_hadamard(geo.head_dim, generator)) for _ in range(geo.num_layers)])
        sizes = {"attn": geo.hidden_size, "mlp": geo.hidden_size, "vo": geo.num_kv_heads * geo.head_dim, "down": geo.intermediate_size}
        self.log_scales = nn.ModuleDict(
            {
                kind: nn.ParameterList([nn.Parameter(torch.zeros(size)) for _ in range(geo.num_layers)])
                for kind, size in sizes.items()
                if config.smoothing
            }
        )

    def rotation_parameters(self) -> list[nn.Parameter]:
        """R1 and every R2 (optimised on the Stiefel manifold)."""
        return [self.r1, *self.r2]

    def scale_parameters(self) -> list[nn.Parameter]:
        """Every log-scale vector (optimised with ordinary SGD/Adam)."""
        return [p for kind in self.log_scales.values() for p in kind]

    def values(self, layer: int, dtype: torch.dtype) -> TransformValues:
        """Layer `layer`'s transforms in `dtype`."""

        def scale(kind: str) -> Tensor | None:
            return self.log_scales[kind][layer].to(dtype).exp() if kind in self.log_scales else None

        return TransformValues(
            r1=_plain(self.r1).to(dtype), r2=_plain(self.r2[layer]).to(dtype), **{kind: scale(kind) for kind in SCALE_KINDS}
        )

    def scales(self) -> dict[str, Tensor]:
        """Positive scales by `<kind>.<layer>` name (float32, detached), for the run folder."""
        return {f"{kind}.{i}": p.detach().exp().contiguous() for kind, params in self.log_scales.items() for i, p in enumerate(params)}


def _stiefel(init: Tensor) -> geoopt.ManifoldParameter:
    """A float32 orthogonal parameter on the (canonical, Cayley-retraction) Stiefel manifold."""
    return geoopt.ManifoldParameter(init.to(torch.float32), manifold=geoopt.Stiefel())


def _plain(p: Tensor) -> Tensor:
    """A manifold parameter as a plain tensor (same storage, same autograd graph), so results are plain tensors."""
    return p.as_subclass(torch.Tensor)


def _times(w: Tensor, s: Tensor | None) -> Tensor:
    """`w` with its columns (last axis) multiplied by `s` (unchanged when `s` is None)."""
    return w if s is None else w * s


def _divide(w: Tensor, s: Tensor | None) -> Tensor:
    """`w` with its first axis divided by `s` (unchanged when `s` is None)."""
    if s is None:
        return w
    return w / (s if w.dim() == 1 else s.unsqueeze(-1))


def _heads_rotated(w: Tensor, r2: Tensor, head_dim: int) -> Tensor:
    """Rows of a value projection rotated per head: W_h -> R2^T W_h (bias b_h -> b_h R2)."""
    blocks = w.unflatten(0, (-1, head_dim))
    rotated = blocks @ r2 if w.dim() == 1 else torch.einsum("dj,hdi->hji", r2, blocks)
    return rotated.flatten(0, 1)


def _query_head_scales(vo: Tensor | None, groups: int, head_dim: int) -> Tensor | None:
    """v -> o scales repeated over the query heads that read each KV head (GQA)."""
    return None if vo is None else vo.unflatten(0, (-1, head_dim)).repeat_interleave(groups, dim=0).flatten()


Transform = Callable[[Tensor, TransformValues], Tensor]


def _layer_transforms(parts: DecoderLayerParts, t: LearnableTransforms) -> dict[tuple[nn.Module, str], Transform]:
    """Every (module, tensor name) of a decoder layer with the function giving its transformed value."""
    hd, groups, r4 = t.head_dim, t.kv_groups, t.config.r4
    # Scales are folded into the small rotation factors (W (R1 diag(s)) rather than (W R1) diag(s)):
    # the backward then needs only the resident original W, not a saved weight-sized product.

    def reader(s_kind: str) -> Transform:
        return lambda w, v: w @ _times(v.r1, getattr(v, s_kind))

    def writer_bias(b: Tensor, v: TransformValues) -> Tensor:
        return b @ v.r1

    def v_weight(w: Tensor, v: TransformValues) -> Tensor:
        return _divide(_heads_rotated(w @ _times(v.r1, v.attn), v.r2, hd), v.vo)

    def v_bias(b: Tensor, v: TransformValues) -> Tensor:
        return _divide(_heads_rotated(b, v.r2, hd), v.vo)

    def o_weight(w: Tensor, v: TransformValues) -> Tensor:
        heads = w.shape[1] // hd
        scales = _query_head_scales(v.vo, groups, hd)
        # Per head, not one block-diagonal matmul: heads x fewer multiply-adds for the same product.
        per_head = v.r2.expand(heads, hd, hd) if scales is None else v.r2 * scales.view(heads, 1, hd)
        return v.r1.T @ torch.einsum("ohi,hij->ohj", w.unflatten(1, (heads, hd)), per_head).flatten(1)

    def up_weight(w: Tensor, v: TransformValues) -> Tensor:
        return _divide(w @ _times(v.r1, v.mlp), v.down)

    def up_bias(b: Tensor, v: TransformValues) -> Tensor:
        return _divide(b, v.down)

    def down_weight(w: Tensor, v: TransformValues) -> Tensor:
        scaled = _times(w, v.down)
        # The online R4 feeds x H^T to down_proj, so its weight carries the inverse: (W diag(s)) H^T.
        return v.r1.T @ (fast_hadamard_transform(scaled) if r4 else scaled)

    def norm(s_kind: str) -> Transform:
        return lambda w, v: w if getattr(v, s_kind) is None else w / getattr(v, s_kind)

    out: dict[tuple[nn.Module, str], Transform] = {
        (parts.input_norm, "weight"): norm("attn"),
        (parts.post_attention_norm, "weight"): norm("mlp"),
        (parts.q_proj, "weight"): reader("attn"),
        (parts.k_proj, "weight"): reader("attn"),
        (parts.v_proj, "weight"): v_weight,
        (parts.o_proj, "weight"): o_weight,
        (parts.gate_proj, "weight"): reader("mlp"),
        (parts.up_proj, "weight"): up_weight,
        (parts.down_proj, "weight"): down_weight,
    }
    for module, bias_fn in ((parts.v_proj, v_bias), (parts.up_proj, up_bias), (parts.o_proj, writer_bias), (parts.down_proj, writer_bias)):
        if module.bias is not None:
            out[(module, "bias")] = bias_fn
    return out


class _Transformed(nn.Module):
    """Parametrization computing a transformed (and, for projection weights, fake-quantized) tensor."""

    def __init__(self, transforms: LearnableTransforms, layer: int, fn: Transform, spec: QuantSpec | None) -> None:
        super().__init__()
        # Not a submodule: the shared transforms must not be registered (and saved) once per weight.
        object.__setattr__(self, "_transforms", transforms)
        self.layer = layer
        self.fn = fn
        self.spec = spec

    def transformed(self, original: Tensor) -> Tensor:
        """The transformed tensor, computed in `original`'s dtype."""
        return self.fn(original, self._transforms.values(self.layer, original.dtype))

    def forward(self, original: Tensor) -> Tensor:
        value = self.transformed(original)
        return value if self.spec is None else fake_quantize_for_training(value, self.spec)


@dataclass
class InstalledTransforms:
    """Learnable transforms installed on a model: the parameters and how to take them out again."""

    transforms: LearnableTransforms
    adapter: ModelAdapter
    hooks: list[torch.utils.hooks.RemovableHandle]
    trainable: dict[str, bool]
    undo: list[Callable[[], None]]


def _freeze(adapter: ModelAdapter) -> dict[str, bool]:
    """Freeze every model parameter (only the transforms learn); returns the flags to restore."""
    trainable = {name: p.requires_grad for name, p in adapter.model.named_parameters()}
    adapter.model.requires_grad_(False)
    return trainable


def _training_weight_spec(spec: QuantSpec | None) -> QuantSpec | None:
    """The weight spec used during calibration: the fixed clip ratio, no per-step clip search."""
    return None if spec is None else replace(spec, clip_search=False)


def install_transforms(
    adapter: ModelAdapter, transforms: LearnableTransforms, weight_spec: QuantSpec | None
) -> InstalledTransforms:
    """Put `transforms` into the weights of a norm-fused model (weight form); projection weights are fake-quantized with `weight_spec`.

    Every model parameter is frozen (until `fuse_learned_transforms` restores its flag): only the
    transform parameters receive gradients.
    """
    trainable = _freeze(adapter)
    spec = _training_weight_spec(weight_spec)
    parametrized: list[tuple[nn.Module, str]] = []
    for layer, parts in enumerate(adapter.layers()):
        projections = set(parts.named_linears().values())
        for (module, name), fn in _layer_transforms(parts, transforms).items():
            quantize = spec if module in projections and name == "weight" else None
            parametrize.register_parametrization(module, name, _Transformed(transforms, layer, fn, quantize))
            parametrized.append((module, name))

    def rotate_output(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        return output @ _plain(transforms.r1).to(output.dtype)

    def unrotate_input(_module: nn.Module, args: tuple) -> tuple:
        return (args[0] @ _plain(transforms.r1).to(args[0].dtype).T, *args[1:])

    def restore_originals() -> None:
        for module, name in parametrized:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)

    hooks = [
        adapter.embeddings.register_forward_hook(rotate_output),
        adapter.lm_head.register_forward_pre_hook(unrotate_input),
    ]
    return InstalledTransforms(transforms=transforms, adapter=adapter, hooks=hooks, trainable=trainable, undo=[restore_originals])


def _per_head(x: Tensor, matrices: Tensor) -> Tensor:
    """Each head_dim block of `x`'s last axis times its own matrix (heads, head_dim, head_dim)."""
    return torch.einsum("...hi,hij->...hj", x.unflatten(-1, matrices.shape[:2]), matrices).flatten(-2)


def _inverse(s: Tensor | None) -> Tensor | None:
    """1 / s (None stays None)."""
    return None if s is None else 1.0 / s


def _activation_hooks(
    parts: DecoderLayerParts, layer: int, t: LearnableTransforms, spec: QuantSpec | None
) -> list[torch.utils.hooks.RemovableHandle]:
    """The hooks of one decoder layer that quantize each activation in the transformed basis, T^-1 quant(T x).

    Each T is the activation side of the weight form's transform: so with unquantized weights the
    layer computes what the weight form computes, and the fused weights are the same.
    """
    hd, groups, r4 = t.head_dim, t.kv_groups, t.config.r4

    def quantize(x: Tensor) -> Tensor:
        return x if spec is None else fake_quantize_for_training(x, spec)

    def stream_reader(kind: str) -> Callable:
        # x -> quant(x R1 diag(1/s)) diag(s) R1^T; the scales ride on the small matrices, not on the tokens.
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            v = t.values(layer, out.dtype)
            s = getattr(v, kind)
            return quantize(out @ _times(v.r1, _inverse(s))) @ _times(v.r1, s).T

        return hook

    def value_writer(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        # v -> v R2 diag(1/s) per KV head: the KV cache quantizes values in this basis, and attention
        # carries it to the o_proj input.
        v = t.values(layer, out.dtype)
        heads = out.shape[-1] // hd
        scales = None if v.vo is None else v.vo.view(heads, 1, hd)
        return _per_head(out, v.r2.expand(heads, hd, hd) if scales is None else v.r2 / scales)

    def output_reader(_module: nn.Module, args: tuple) -> tuple:
        v = t.values(layer, args[0].dtype)
        heads = args[0].shape[-1] // hd
        scales = _query_head_scales(v.vo, groups, hd)
        back = v.r2.T.expand(heads, hd, hd) if scales is None else scales.view(heads, hd, 1) * v.r2.T
        return (_per_head(quantize(args[0]), back), *args[1:])

    def down_reader(_module: nn.Module, args: tuple) -> tuple:
        s = t.values(layer, args[0].dtype).down
        x = _times(args[0], _inverse(s))
        if r4:
            x = fast_hadamard_transform(quantize(fast_hadamard_transform(x)), inverse=True)
        else:
            x = quantize(x)
        return (_times(x, s), *args[1:])

    return [
        parts.input_norm.register_forward_hook(stream_reader("attn")),
        parts.post_attention_norm.register_forward_hook(stream_reader("mlp")),
        parts.v_proj.register_forward_hook(value_writer),
        parts.o_proj.register_forward_pre_hook(output_reader),
        parts.down_proj.register_forward_pre_hook(down_reader),
    ]


def _bypass_input_transforms(adapter: ModelAdapter) -> Callable[[], None]:
    """Turn off every projection's own input Hadamard and quantizer; returns the function that turns them back on."""
    saved = [
        (linear, linear.input_quantizer, linear.hadamard_input)
        for parts in adapter.layers()
        for linear in parts.named_linears().values()
        if isinstance(linear, QuantLinear)
    ]
    for linear, _, _ in saved:
        linear.input_quantizer, linear.hadamard_input = None, False

    def restore() -> None:
        for linear, quantizer, hadamard in saved:
            linear.input_quantizer, linear.hadamard_input = quantizer, hadamard

    return restore


def install_activation_transforms(
    adapter: ModelAdapter, transforms: LearnableTransforms, activation_spec: QuantSpec | None
) -> InstalledTransforms:
    """Put `transforms` around the activation quantizers of a prepared, norm-fused model (activation form).

    The weights are not touched and not quantized; each projection input is quantized once, with
    `activation_spec`, in its transformed basis. The KV cache quantizer of the prepared model stays.
    Every model parameter is frozen until `fuse_learned_transforms`.
    """
    trainable = _freeze(adapter)
    hooks = [hook for layer, parts in enumerate(adapter.layers()) for hook in _activation_hooks(parts, layer, transforms, activation_spec)]
    restore = _bypass_input_transforms(adapter)
    return InstalledTransforms(transforms=transforms, adapter=adapter, hooks=hooks, trainable=trainable, undo=[restore])


def attach_learnable_transforms(
    adapter: ModelAdapter, scheme: QuantScheme, config: TransformConfig, seed: int, weights_in_loop: bool = True
) -> InstalledTransforms:
    """Fuse norms, install the fake quantizers and online Hadamards, and put fresh learnable transforms in place.

    R1/R2 start as random Hadamards drawn from `seed`, scales at 1; the model then computes its
    original function whenever quantization is off. `weights_in_loop`: fake-quantize the transformed
    weights every step (weight form); otherwise the weights stay unquantized during calibration
    (activation form).
    """
    fuse_norms(adapter)
    prepare_model(adapter.model, adapter, scheme, config.online)
    transforms = LearnableTransforms(adapter, config, seed)
    if weights_in_loop:
        return install_transforms(adapter, transforms, scheme.weights)
    return install_activation_transforms(adapter, transforms, scheme.activations)


@dataclass
class LearnedTransforms:
    """What calibration learned, for the run folder: fused rotations and smoothing scales."""

    fused: FusedTransforms
    scales: dict[str, Tensor]


def remove_learnable_transforms(installed: InstalledTransforms) -> None:
    """Take the transforms out of the forward pass without fusing them: hooks, parametrizations, bypassed quantizers, frozen flags."""
    for hook in installed.hooks:
        hook.remove()
    for undo in installed.undo:
        undo()
    installed.hooks, installed.undo = [], []
    for name, param in installed.adapter.model.named_parameters():
        param.requires_grad_(installed.trainable.get(name, param.requires_grad))


@torch.no_grad()
def fuse_learned_transforms(installed: InstalledTransforms) -> LearnedTransforms:
    """Write the current transforms into the weights (float64 math, unquantized) and remove every hook and parametrization."""
    adapter, transforms = installed.adapter, installed.transforms
    remove_learnable_transforms(installed)
    for layer, parts in enumerate(adapter.layers()):
        values = transforms.values(layer, torch.float64)
        for (module, name), fn in _layer_transforms(parts, transforms).items():
            original = getattr(module, name)
            original.data = fn(original.detach().to(torch.float64), values).to(original.dtype)
    r1 = transforms.r1.detach().to(torch.float64)
    rotate_embedding(adapter.embeddings, r1)
    rotate_reader(adapter.lm_head, r1)
    # The config records the initialisation; the fused matrices are the learned ones.
    config = RotationConfig(r3=transforms.config.r3, r4=transforms.config.r4)
    fused = FusedTransforms(r1=r1, r2=[r.detach().to(torch.float64) for r in transforms.r2], config=config)
    return LearnedTransforms(fused=fused, scales=transforms.scales())


def orthogonality_error(rotation: Tensor) -> float:
    """||R^T R - I||_F in float64."""
    r = rotation.detach().to(torch.float64)
    return float((r.T @ r - torch.eye(r.shape[1], dtype=torch.float64)).norm())
