"""Fake quantization (quantize then dequantize) with straight-through gradients.

A tensor is quantized along its last dimension, either as whole rows or in groups of `group_size`
consecutive values. The same primitives serve weights (rows = output channels), activations
(rows = tokens) and the KV cache (rows = one head of one token), so every granularity the
deployment formats use is a setting of `QuantSpec`, not a separate code path.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from aaq.errors import AaqError
from aaq.typed import dataclass_from_dict

FULL_PRECISION_BITS = 16
_SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class QuantSpec:
    """How one kind of tensor is quantized.

    `group_size=None` quantizes each whole row of the last dimension with one scale: per output
    channel for weights, per token for activations, per head for the KV cache (whose rows are
    head_dim long). `clip_ratio` shrinks the range before rounding; `clip_search` (weights only)
    instead searches the ratio per row that minimises the rounding error. `half_range_scale`
    (symmetric only) sets the scale to amax / ((qmax - qmin) / 2), the compressed-tensors/vLLM
    convention, instead of amax / qmax; exports simulate deployment kernels with it.
    """

    bits: int
    symmetric: bool
    group_size: int | None = None
    clip_ratio: float = 1.0
    clip_search: bool = False
    half_range_scale: bool = False

    def __post_init__(self) -> None:
        if self.bits not in _SUPPORTED_BITS:
            raise AaqError(f"unsupported bit width {self.bits}; use one of {_SUPPORTED_BITS} (16 means no quantization)")
        if self.group_size is not None and self.group_size <= 0:
            raise AaqError(f"group_size must be positive or None (whole row), got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise AaqError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.half_range_scale and not self.symmetric:
            raise AaqError("half_range_scale applies to symmetric quantization only; drop it or set symmetric=True")

    @property
    def qmin(self) -> int:
        """Smallest integer level."""
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest integer level."""
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1


def _weight_default(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=True, clip_search=True)


def _activation_default(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=False)


def _kv_default(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=False)


@dataclass(frozen=True)
class SchemeOptions:
    """Changes to the specs a bit string implies; None keeps the default.

    weight_group_size / act_group_size: quantize in groups of this many inputs; symmetric_acts:
    symmetric activations; a_clip / kv_clip: clip ratios of activations and KV cache.
    """

    weight_group_size: int | None = None
    act_group_size: int | None = None
    symmetric_acts: bool | None = None
    a_clip: float | None = None
    kv_clip: float | None = None

    def given(self) -> dict[str, int | float | bool]:
        """The options that were set, by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


# Which spec (by QuantScheme field) each option changes, and the QuantSpec field it sets.
_SCHEME_OPTIONS = {
    "weights": {"weight_group_size": "group_size"},
    "activations": {"act_group_size": "group_size", "symmetric_acts": "symmetric", "a_clip": "clip_ratio"},
    "kv_cache": {"kv_clip": "clip_ratio"},
}
_FULL_PRECISION = {"weights": "16-bit weights", "activations": "16-bit activations", "kv_cache": "a 16-bit KV cache"}

_BITS_PATTERN = re.compile(r"^w(\d+)a(\d+)(?:kv(\d+))?$")


@dataclass(frozen=True)
class QuantScheme:
    """Which tensors are quantized and how; `None` keeps that tensor in full precision.

    Embeddings, lm_head and norms are never quantized.
    """

    weights: QuantSpec | None = None
    activations: QuantSpec | None = None
    kv_cache: QuantSpec | None = None
    name: str = field(default="fp", compare=False)

    @classmethod
    def from_string(cls, bits: str) -> QuantScheme:
        """Parse `w4a4kv4`, `w4a8kv8`, `w4a16`, `w8a8`, `fp` ... into the default specs.

        Defaults follow the design: weights symmetric per output channel with a searched clip
        ratio; activations asymmetric per token; KV cache asymmetric per head. A missing `kv`
        part keeps the cache in full precision.
        """
        text = bits.strip().lower()
        if text in ("fp", "fp16", "fp32", "w16a16", "w16a16kv16"):
            return cls(name="fp")
        match = _BITS_PATTERN.match(text)
        if match is None:
            raise AaqError(
                f"bad bit string {bits!r}; write w<bits>a<bits>[kv<bits>] such as w4a4kv4, w4a8kv8, w4a16 or w8a8 (16 = not quantized)"
            )
        w_bits, a_bits, kv_bits = (int(g) if g else FULL_PRECISION_BITS for g in match.groups())
        for label, value in (("weight", w_bits), ("activation", a_bits), ("kv", kv_bits)):
            if value != FULL_PRECISION_BITS and value not in _SUPPORTED_BITS:
                raise AaqError(
                    f"bad bit string {bits!r}: {label} bits {value} unsupported; use one of {_SUPPORTED_BITS} or 16, e.g. w4a4kv4"
                )
        return cls(
            weights=None if w_bits == FULL_PRECISION_BITS else _weight_default(w_bits),
            activations=None if a_bits == FULL_PRECISION_BITS else _activation_default(a_bits),
            kv_cache=None if kv_bits == FULL_PRECISION_BITS else _kv_default(kv_bits),
            name=text,
        )

    def with_options(self, options: SchemeOptions) -> QuantScheme:
        """A copy with `options` applied; AaqError naming an option for a tensor this scheme keeps in full precision."""
        given = options.given()
        changes: dict[str, QuantSpec] = {}
        for tensor, fields in _SCHEME_OPTIONS.items():
            wanted = {fields[name]: value for name, value in given.items() if name in fields}
            spec = getattr(self, tensor)
            if spec is None and wanted:
                setting = next(name for name in given if name in fields)
                raise AaqError(f"{{setting}} has no effect with {_FULL_PRECISION[tensor]}; drop it or quantize that tensor", setting=setting)
            if wanted:
                changes[tensor] = replace(spec, **wanted)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-serialisable form; `from_dict` inverts it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QuantScheme:
        """Inverse of `to_dict`."""
        if not isinstance(data, dict):
            raise AaqError(f"scheme must be a mapping with weights, activations and kv_cache, got {data!r}; correct it in the recipe")
        specs = {k: (dataclass_from_dict(QuantSpec, data[k], f"scheme.{k}") if data.get(k) else None) for k in ("weights", "activations", "kv_cache")}
        return cls(**specs, name=data.get("name", "custom"))


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def _grouped(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """View the last dimension as (n_groups, group_size) so statistics are taken per group."""
    if group_size is None:
        return x.unsqueeze(-2)
    if x.shape[-1] % group_size:
        raise AaqError(f"last dimension {x.shape[-1]} is not divisible by group_size {group_size}; pick a divisor")
    return x.unflatten(-1, (x.shape[-1] // group_size, group_size))


def quant_params(x: torch.Tensor, spec: QuantSpec, clip_ratio: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row (or group) of `x` already grouped as (..., groups, size).

    Ranges always include 0 so that exact zeros (padding, pruned weights) stay exact.
    """
    if spec.symmetric:
        # amax / qmax keeps the largest weights exact. amax / 7.5 (compressed-tensors' convention)
        # reaches one more level but clips every row's largest value: measured on smollm2-135m,
        # RTN W4A16 perplexity 40.1 -> 44.4 (8 x 512 held-out tokens).
        amax = x.abs().amax(dim=-1, keepdim=True) * clip_ratio
        scale = amax / ((spec.qmax - spec.qmin) / 2 if spec.half_range_scale else spec.qmax)
        zero = torch.zeros_like(scale)
    else:
        xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_ratio
        xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_ratio
        scale = (xmax - xmin) / spec.qmax
        zero = torch.round(-xmin / scale.clamp(min=torch.finfo(x.dtype).tiny))
    # A constant-zero row has scale 0; any positive scale reproduces it exactly.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def fake_quantize_grouped(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize an already grouped tensor with given parameters (STE gradient)."""
    q = torch.clamp(round_ste(x / scale) + zero, spec.qmin, spec.qmax)
    return (q - zero) * scale


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize `x` along its last dimension with dynamic per-row/group ranges."""
    grouped = _grouped(x, spec.group_size)
    scale, zero = quant_params(grouped, spec, spec.clip_ratio)
    return fake_quantize_grouped(grouped, scale, zero, spec).flatten(-2)


def search_clip_ratio(
    grouped: torch.Tensor, spec: QuantSpec, grid: int = 20, min_ratio: float = 0.5, norm: float = 2.4
) -> torch.Tensor:
    """Per-row clip ratio minimising the L^norm rounding error (the p = 2.4 search of GPTQ/QuaRot)."""
    best_err = torch.full((*grouped.shape[:-1], 1), float("inf"), dtype=grouped.dtype, device=grouped.device)
    best_ratio = torch.ones_like(best_err)
    with torch.no_grad():
        for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
            scale, zero = quant_params(grouped, spec, ratio)
            err = (fake_quantize_grouped(grouped, scale, zero, spec) - grouped).abs().pow(norm).sum(-1, keepdim=True)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def weight_quant_params(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight (out, in) per output channel or group, shape (out, groups, 1)."""
    grouped = _grouped(weight, spec.group_size)
    ratio = search_clip_ratio(grouped, spec) if spec.clip_search else spec.clip_ratio
    return quant_params(grouped, spec, ratio)


def weight_levels(weight: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest integer levels of a weight (out, in) in [qmin, qmax], and its scale and zero point (out, groups).

    Computed in float32 at least, whatever the weight's dtype.
    """
    work = weight.to(torch.promote_types(weight.dtype, torch.float32))
    grouped = _grouped(work, spec.group_size)
    scale, zero = weight_quant_params(work, spec)
    levels = torch.clamp(torch.round(grouped / scale) + zero, spec.qmin, spec.qmax)
    return levels.flatten(-2), scale.squeeze(-1), zero.squeeze(-1)


def dequantize_levels(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The weight (out, in) that integer levels stand for, with a scale and zero point per row/group (out, groups)."""
    grouped = _grouped(levels, spec.group_size)
    return ((grouped - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).flatten(-2)


# Bits of the per-entry code the training quantizer saves for its backward: the entry was clamped,
# it is a row's maximum (the scale depends on it), or a row's minimum (asymmetric only).
_CLAMPED, _MAXIMUM, _MINIMUM = 4, 2, 1


def _extremes(rows: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which entries each row's scale is computed from, and d(scale)/d(entry) for a max and a min entry, as autograd sees them.

    Returns (code bits `_MAXIMUM`/`_MINIMUM` per entry, slope per row for maxima, slope per row for
    minima). The scale is linear in the clipped range, so its derivative is scale / range, shared
    evenly among tied extremes; rows whose range is 0 got scale 1, which does not depend on the row.
    """
    scale = scale.reshape(-1, 1)
    if spec.symmetric:
        magnitude = rows.abs()
        amax = magnitude.amax(-1, keepdim=True)
        hits = magnitude == amax
        slope = torch.where(amax > 0, scale / amax, 0.0) / hits.sum(-1, keepdim=True)
        # d|x|/dx is the sign: a positive extreme moves the scale up, a negative one down.
        code = (hits & (rows >= 0)).to(torch.int8) * _MAXIMUM + (hits & (rows < 0)).to(torch.int8) * _MINIMUM
        return code, slope, -slope
    xmax, xmin = rows.amax(-1, keepdim=True), rows.amin(-1, keepdim=True)
    span = xmax.clamp(min=0) - xmin.clamp(max=0)
    slope = torch.where(span > 0, scale / span, 0.0)
    at_max, at_min = rows == xmax, rows == xmin
    # The range is [min(xmin, 0), max(xmax, 0)]: an extreme on the wrong side of 0 does not move it.
    max_slope = slope * (xmax >= 0) / at_max.sum(-1, keepdim=True)
    min_slope = -slope * (xmin <= 0) / at_min.sum(-1, keepdim=True)
    return at_max.to(torch.int8) * _MAXIMUM + at_min.to(torch.int8) * _MINIMUM, max_slope, min_slope


class _ClosedFormFakeQuantize(torch.autograd.Function):
    """`fake_quantize` with its autograd gradient (STE, zero where clamped, scale path) in closed form.

    Autograd through the quantizer keeps about ten input-sized temporaries per call and replays
    some thirty elementwise passes in the backward; this forward saves one input-sized float tensor
    (each entry's d(out)/d(scale)), one int8 code per entry (clamped, row maximum, row minimum) and
    two slopes per row, and the backward is one reduction and a few elementwise passes. Nothing here
    reads a tensor's value on the host: a GPU never waits for it.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        grouped = _grouped(x, spec.group_size)
        scale, zero = quant_params(grouped, spec, spec.clip_ratio)
        u = grouped / scale
        level = torch.round(u)
        # d(out)/d(scale) of out = (clamp(round(u) + zero) - zero) * scale, u = x / scale: round(u) - u inside
        # the range (the STE passes x's own gradient), the clamped level - zero outside it (x's is 0).
        level.add_(zero)
        clamped = (level < spec.qmin).logical_or_(level > spec.qmax)
        d_scale = torch.where(clamped, level.clamp(spec.qmin, spec.qmax) - zero, level - zero - u)
        out = level.clamp_(spec.qmin, spec.qmax).sub_(zero).mul_(scale)
        rows = grouped.reshape(-1, grouped.shape[-1])
        code, max_slope, min_slope = _extremes(rows, scale, spec)
        code.add_(clamped.reshape(code.shape).to(torch.int8) * _CLAMPED)
        ctx.spec = spec
        ctx.save_for_backward(d_scale, code, max_slope, min_slope)
        return out.flatten(-2)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        d_scale, code, max_slope, min_slope = ctx.saved_tensors
        grouped_grad = _grouped(grad, ctx.spec.group_size)
        grad_scale = torch.linalg.vecdot(d_scale, grouped_grad).reshape(-1, 1)
        flat = grouped_grad.reshape(code.shape)
        out = torch.where((code & _CLAMPED) > 0, 0.0, flat)
        out = out + grad_scale * (max_slope * ((code & _MAXIMUM) > 0) + min_slope * ((code & _MINIMUM) > 0))
        return out.reshape(grouped_grad.shape).flatten(-2), None


def fake_quantize_for_training(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """`fake_quantize` with the same value and gradient, storing only `x` for the backward."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ClosedFormFakeQuantize.apply(x, spec)
    return fake_quantize(x, spec)


class ActivationQuantizer(nn.Module):
    """Dynamic fake quantization of the last dimension (per token, or per head for the KV cache).

    16-bit inputs are quantized in float32: scales and levels computed in bfloat16 would misplace
    values on the grid (8 mantissa bits), which no deployment kernel does.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        return fake_quantize_for_training(x.to(work), self.spec).to(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return f"bits={s.bits}, symmetric={s.symmetric}, group_size={s.group_size}, clip_ratio={s.clip_ratio}"
