"""Learnable equivalence transforms (OSTQuant's Y = (W T)(T^-1 X)): parameters, their two forms, fusion.

The parameters: R1 (d x d) and one R2 (head_dim x head_dim) per layer, orthogonal, on the Stiefel
manifold, starting from the rotations `TransformConfig.r1/r2` name (random Hadamards by default);
with smoothing, four positive scale vectors per layer (stored as log s, so they stay positive),
starting at 1. Where each acts is the model's `TransformPlan`; the math is `aaq.transforms.rotation`'s.

Two ways to put them into the forward pass of a norm-fused, quantizer-equipped model, with the same
function whenever the weights are not quantized:

- weight form (`install_weight_form`): every transformed weight is recomputed from its frozen
  original each step (`torch.nn.utils.parametrize`) and fake-quantized; needed when calibration
  trains against quantized weights (RTN follows). The embeddings and the lm_head are rotated through
  their activations instead (E R1 on the looked-up rows, R1^T on the lm_head input): vocab x d^2
  per step would dominate otherwise.
- activation form (`install_activation_form`): the weights stay as they are and each activation
  quantizer sees its input in the transformed basis, x -> T^-1 quant(T x). Calibration uses it when
  GPTQ quantizes the fused weights afterwards (as SpinQuant does): a step costs tokens x d^2 instead
  of weights x d, the frozen linears save nothing for the backward, and the inputs shared by q/k/v
  and by gate/up are quantized once.

With quantization off, either form computes the original function for any parameter values (the
equivalence invariant). `fuse_learned_transforms` writes the transforms into the weights in float64
and removes every hook and parametrization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial

import geoopt
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from aaq.errors import AaqError
from aaq.models.plan import SMOOTHING_KINDS, Geometry, LayerPlan, TransformConfig, TransformPlan
from aaq.quant.fake_quant import QuantLinear
from aaq.quant.quantizers import QuantSpec, fake_quantize_for_training
from aaq.runtime.devices import compute_dtype
from aaq.transforms.hadamard import fast_hadamard_transform
from aaq.transforms.online import rotate_input
from aaq.transforms.rotation import (
    AppliedTransforms,
    Transform,
    TransformValues,
    fuse_transforms,
    make_rotation,
    query_head_scales,
    scale_columns,
    tensor_transforms,
)


class LearnableTransforms(nn.Module):
    """The learnable parameters: R1, per-layer R2 (Stiefel manifold parameters) and per-layer log-scales.

    `seed` draws the random signs (or matrices) of the starting R1 and R2.
    """

    def __init__(self, geometry: Geometry, config: TransformConfig, seed: int) -> None:
        super().__init__()
        if "none" in (config.r1, config.r2):
            raise AaqError("R1 and R2 are learned, so they need a starting rotation (r1, r2): hadamard, random_hadamard or random")
        generator = torch.Generator().manual_seed(seed)
        self.config = config
        self.r1 = _stiefel(make_rotation(config.r1, geometry.hidden_size, generator))
        self.r2 = nn.ParameterList([_stiefel(make_rotation(config.r2, geometry.head_dim, generator)) for _ in range(geometry.num_layers)])
        widths = {
            "attn": geometry.hidden_size,
            "mlp": geometry.hidden_size,
            "vo": geometry.num_kv_heads * geometry.head_dim,
            "down": geometry.intermediate_size,
        }
        self.log_scales = nn.ModuleDict(
            {kind: nn.ParameterList([nn.Parameter(torch.zeros(widths[kind])) for _ in range(geometry.num_layers)]) for kind in SMOOTHING_KINDS}
            if config.smoothing
            else {}
        )

    def rotation_parameters(self) -> list[nn.Parameter]:
        """R1 and every R2 (optimised on the Stiefel manifold)."""
        return [self.r1, *self.r2]

    def scale_parameters(self) -> list[nn.Parameter]:
        """Every log-scale vector (optimised with ordinary SGD/Adam)."""
        return [p for kind in self.log_scales.values() for p in kind]

    def values(self, layer: int, dtype: torch.dtype) -> TransformValues:
        """Layer `layer`'s transforms in `dtype`."""
        scales = {kind: self.log_scales[kind][layer].to(dtype).exp() for kind in self.log_scales}
        return TransformValues(r1=_plain(self.r1).to(dtype), r2=_plain(self.r2[layer]).to(dtype), r4=self.config.r4, **scales)

    def scales(self) -> dict[str, Tensor]:
        """Positive scales by `<kind>.<layer>` name (detached), for the run folder."""
        return {f"{kind}.{i}": p.detach().exp().contiguous() for kind, params in self.log_scales.items() for i, p in enumerate(params)}

    def snapshot(self) -> dict[str, Tensor]:
        """A float64 copy of every parameter (by state-dict name), to measure `movement` from later."""
        return {name: value.detach().as_subclass(Tensor).to(torch.float64, copy=True) for name, value in self.state_dict().items()}

    def movement(self, start: dict[str, Tensor]) -> TransformMovement:
        """How far the parameters are now from `start` (a `snapshot`, typically taken before calibration)."""
        now = self.snapshot()
        r2 = [relative_change(start[f"r2.{i}"], now[f"r2.{i}"]) for i in range(len(self.r2))]
        log_scales = [now[name] for name in now if name.startswith("log_scales.")]
        return TransformMovement(
            r1=relative_change(start["r1"], now["r1"]),
            r2_mean=sum(r2) / len(r2) if r2 else 0.0,
            r2_max=max(r2, default=0.0),
            scale_rms=float(torch.cat(log_scales).square().mean().sqrt().expm1()) if log_scales else 0.0,
        )


def relative_change(start: Tensor, end: Tensor) -> float:
    """||end - start||_F / ||start||_F, in float64."""
    start, end = start.detach().to(torch.float64), end.detach().to(torch.float64)
    return float((end - start).norm() / start.norm())


@dataclass(frozen=True)
class TransformMovement:
    """How far calibration moved the learnable transforms from their start.

    `r1`: ||R1 - R1_0||_F / ||R1_0||_F (0: still the Hadamard start; for two random orthogonal
    matrices about sqrt(2)); `r2_mean`, `r2_max`: the same for the per-layer R2; `scale_rms`:
    exp(root mean square of log s) - 1 over every smoothing scale (0: all scales still 1; 0.01: a
    typical scale 1% away from 1).
    """

    r1: float
    r2_mean: float
    r2_max: float
    scale_rms: float

    def to_dict(self) -> dict[str, float]:
        """The figures by name, for run.json."""
        return asdict(self)


def _stiefel(init: Tensor) -> geoopt.ManifoldParameter:
    """A float32 orthogonal parameter on the (canonical, Cayley-retraction) Stiefel manifold."""
    return geoopt.ManifoldParameter(init.to(torch.float32), manifold=geoopt.Stiefel())


def _plain(p: Tensor) -> Tensor:
    """A manifold parameter as a plain tensor (same storage, same autograd graph), so results are plain tensors."""
    return p.as_subclass(torch.Tensor)


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
        """The transformed tensor in `original`'s dtype, computed in float32 at least."""
        work = compute_dtype(original.dtype)
        return self.fn(original.to(work), self._transforms.values(self.layer, work)).to(original.dtype)

    def forward(self, original: Tensor) -> Tensor:
        value = self.transformed(original)
        return value if self.spec is None else fake_quantize_for_training(value, self.spec)


@dataclass
class InstalledTransforms:
    """Learnable transforms installed on a model: the parameters and how to take them out again."""

    transforms: LearnableTransforms
    model: PreTrainedModel
    plan: TransformPlan
    hooks: list[RemovableHandle]
    trainable: dict[str, bool]
    undo: list[Callable[[], None]]


def _freeze(model: PreTrainedModel) -> dict[str, bool]:
    """Freeze every model parameter (only the transforms learn); returns the flags to restore."""
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    model.requires_grad_(False)
    return trainable


def install_weight_form(
    model: PreTrainedModel, plan: TransformPlan, transforms: LearnableTransforms, weight_spec: QuantSpec | None
) -> InstalledTransforms:
    """Put `transforms` into the weights of a norm-fused model (weight form); projection weights are fake-quantized with `weight_spec`.

    During calibration the weight spec uses its fixed clip ratio (no per-step clip search). Every
    model parameter is frozen (until the transforms are fused or removed): only the transform
    parameters receive gradients. With R4 on, the down projections' input is rotated here (`calibration` online rotations leave it out).
    """
    trainable = _freeze(model)
    spec = None if weight_spec is None else replace(weight_spec, clip_search=False)
    projections = {id(model.get_submodule(name)) for name in plan.linears}
    parametrized: list[tuple[nn.Module, str]] = []
    for index, layer in enumerate(plan.layers):
        for (module, name), fn in tensor_transforms(model, layer, plan.geometry, transforms.config.smoothing).items():
            quantize = spec if id(module) in projections and name == "weight" else None
            parametrize.register_parametrization(module, name, _Transformed(transforms, index, fn, quantize))
            parametrized.append((module, name))

    def rotate_output(_module: nn.Module, _args: tuple, output: Tensor) -> Tensor:
        work = compute_dtype(output.dtype)
        return (output.to(work) @ _plain(transforms.r1).to(work)).to(output.dtype)

    def unrotate_input(_module: nn.Module, args: tuple) -> tuple:
        work = compute_dtype(args[0].dtype)
        return ((args[0].to(work) @ _plain(transforms.r1).to(work).T).to(args[0].dtype), *args[1:])

    def restore_originals() -> None:
        for module, name in parametrized:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)

    hooks = [
        model.get_submodule(plan.embeddings).register_forward_hook(rotate_output),
        model.get_submodule(plan.lm_head).register_forward_pre_hook(unrotate_input),
    ]
    if transforms.config.r4:
        # The rebuilt down projections hold R4's inverse; their input is rotated until fusion hands R4 to the online rotations.
        hooks += [model.get_submodule(layer.mlp_hidden.reader).register_forward_pre_hook(rotate_input) for layer in plan.layers]
    return InstalledTransforms(transforms, model, plan, hooks, trainable, undo=[restore_originals])


def _per_head(x: Tensor, matrices: Tensor) -> Tensor:
    """Each head_dim block of `x`'s last axis times its own matrix (heads, head_dim, head_dim)."""
    return torch.einsum("...hi,hij->...hj", x.unflatten(-1, matrices.shape[:2]), matrices).flatten(-2)


def _working(x: Tensor, t: LearnableTransforms, layer: int) -> tuple[Tensor, TransformValues]:
    """An activation in the dtype the transform math runs in (float32 at least), with the layer's transforms in it."""
    work = compute_dtype(x.dtype)
    return x.to(work), t.values(layer, work)


def _inverse(s: Tensor | None) -> Tensor | None:
    """1 / s (None stays None)."""
    return None if s is None else 1.0 / s


def _stream_matrix(r1: Tensor, log_scales: Tensor | None = None, *, work: torch.dtype, inverse: bool) -> Tensor:
    """The residual-stream transform of the activation form in `work`: R1 diag(1/s) (`inverse`), else its inverse diag(s) R1^T."""
    s = None if log_scales is None else log_scales.to(work).exp()
    rotation = r1.to(work)
    return scale_columns(rotation, _inverse(s)) if inverse else scale_columns(rotation, s).T


class _ProductWithRebuiltMatrix(torch.autograd.Function):
    """`x @ build(*parameters)`, saving `x` and the parameters for the backward and building the matrix there again.

    Autograd would keep the built (d x d) matrix of every call until the backward: four float32 ones
    per decoder layer in the activation form (1 GiB for a 1B Llama, 8.6 GiB at 8B), where the
    parameters it is built from are shared and cost nothing.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, build: Callable[..., Tensor], *parameters: Tensor) -> Tensor:
        ctx.build = build
        ctx.save_for_backward(x, *parameters)
        return x @ build(*parameters)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *parameters = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(needed) for p, needed in zip(parameters, ctx.needs_input_grad[2:], strict=True)]
            matrix = ctx.build(*leaves)
        grad_x = grad @ matrix.detach().T if ctx.needs_input_grad[0] else None
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(matrix, wanted, x.flatten(0, -2).T @ grad.flatten(0, -2)) if wanted else ())
        return grad_x, None, *(next(found) if leaf.requires_grad else None for leaf in leaves)


def _product_with_rebuilt_matrix(x: Tensor, build: Callable[..., Tensor], *parameters: Tensor) -> Tensor:
    """`x @ build(*parameters)` whose backward builds the matrix again instead of keeping it (`_ProductWithRebuiltMatrix`)."""
    return _ProductWithRebuiltMatrix.apply(x, build, *parameters)


def _activation_hooks(
    model: PreTrainedModel, layer: LayerPlan, index: int, t: LearnableTransforms, geometry: Geometry, spec: QuantSpec | None
) -> list[RemovableHandle]:
    """The hooks of one decoder layer that quantize each activation in the transformed basis, T^-1 quant(T x).

    Each T is the activation side of the weight form's transform: so with unquantized weights the
    layer computes what the weight form computes, and the fused weights are the same.
    """
    hd, groups = geometry.head_dim, geometry.kv_groups

    def quantize(x: Tensor) -> Tensor:
        return x if spec is None else fake_quantize_for_training(x, spec)

    def stream_input(kind: str) -> Callable:
        # x -> quant(x R1 diag(1/s)) diag(s) R1^T; the scales ride on the small matrices, not on the tokens,
        # and the matrices are built again in the backward instead of being kept (two d x d per call).
        def hook(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
            work = compute_dtype(out.dtype)
            parameters = (_plain(t.r1), *([t.log_scales[kind][index]] if kind in t.log_scales else []))
            x = _product_with_rebuilt_matrix(out.to(work), partial(_stream_matrix, work=work, inverse=True), *parameters)
            return _product_with_rebuilt_matrix(quantize(x), partial(_stream_matrix, work=work, inverse=False), *parameters).to(out.dtype)

        return hook

    def head_writer_output(_module: nn.Module, _args: tuple, out: Tensor) -> Tensor:
        # v -> v R2 diag(1/s) per KV head: the KV cache quantizes values in this basis, and attention
        # carries it to the head reader's input.
        x, v = _working(out, t, index)
        heads = x.shape[-1] // hd
        scales = None if v.vo is None else v.vo.view(heads, 1, hd)
        return _per_head(x, v.r2.expand(heads, hd, hd) if scales is None else v.r2 / scales).to(out.dtype)

    def head_reader_input(_module: nn.Module, args: tuple) -> tuple:
        x, v = _working(args[0], t, index)
        heads = x.shape[-1] // hd
        scales = query_head_scales(v.vo, groups, hd)
        back = v.r2.T.expand(heads, hd, hd) if scales is None else scales.view(heads, hd, 1) * v.r2.T
        return (_per_head(quantize(x), back).to(args[0].dtype), *args[1:])

    def channel_reader_input(_module: nn.Module, args: tuple) -> tuple:
        x, v = _working(args[0], t, index)
        x = scale_columns(x, _inverse(v.down))
        x = fast_hadamard_transform(quantize(fast_hadamard_transform(x)), inverse=True) if v.r4 else quantize(x)
        return (scale_columns(x, v.down).to(args[0].dtype), *args[1:])

    def module(name: str) -> nn.Module:
        return model.get_submodule(name)

    return [
        module(layer.attention_input.norm).register_forward_hook(stream_input("attn")),
        module(layer.mlp_input.norm).register_forward_hook(stream_input("mlp")),
        module(layer.values.writer).register_forward_hook(head_writer_output),
        module(layer.values.reader).register_forward_pre_hook(head_reader_input),
        module(layer.mlp_hidden.reader).register_forward_pre_hook(channel_reader_input),
    ]


def _bypass_input_quantizers(model: PreTrainedModel, plan: TransformPlan) -> Callable[[], None]:
    """Turn off every projection's own input quantizer; returns the function that turns them back on."""
    linears = [model.get_submodule(name) for name in plan.linears]
    saved = [(linear, linear.input_quantizer) for linear in linears if isinstance(linear, QuantLinear)]
    for linear, _ in saved:
        linear.input_quantizer = None

    def restore() -> None:
        for linear, quantizer in saved:
            linear.input_quantizer = quantizer

    return restore


def install_activation_form(
    model: PreTrainedModel, plan: TransformPlan, transforms: LearnableTransforms, activation_spec: QuantSpec | None
) -> InstalledTransforms:
    """Put `transforms` around the activation quantizers of a norm-fused, quantizer-equipped model (activation form).

    The weights are not touched and not quantized; each projection input is quantized once, with
    `activation_spec`, in its transformed basis (the projections' own input quantizers step aside
    until the transforms are fused or removed). R4 is part of the down-projection hook (the online
    rotations of the `calibration` phase leave it out). Every model parameter is frozen until then.
    """
    trainable = _freeze(model)
    hooks = [
        hook
        for index, layer in enumerate(plan.layers)
        for hook in _activation_hooks(model, layer, index, transforms, plan.geometry, activation_spec)
    ]
    restore = _bypass_input_quantizers(model, plan)
    return InstalledTransforms(transforms, model, plan, hooks, trainable, undo=[restore])


def remove_learnable_transforms(installed: InstalledTransforms) -> None:
    """Take the transforms out of the forward pass without fusing them: hooks, parametrizations, bypassed quantizers, frozen flags."""
    for hook in installed.hooks:
        hook.remove()
    for undo in installed.undo:
        undo()
    installed.hooks, installed.undo = [], []
    for name, param in installed.model.named_parameters():
        param.requires_grad_(installed.trainable.get(name, param.requires_grad))


@torch.no_grad()
def fuse_learned_transforms(installed: InstalledTransforms, device: torch.device | None = None) -> AppliedTransforms:
    """Write the current transforms into the weights (float64 math on `device`, unquantized) and remove every hook and parametrization."""
    transforms, plan = installed.transforms, installed.plan
    remove_learnable_transforms(installed)
    values = [transforms.values(index, torch.float64) for index in range(len(plan.layers))]
    fuse_transforms(installed.model, plan, values, transforms.config.smoothing, device)
    return AppliedTransforms(
        config=transforms.config,
        r1=transforms.r1.detach().to(torch.float64),
        r2=[r.detach().to(torch.float64) for r in transforms.r2],
        scales=transforms.scales(),
    )
