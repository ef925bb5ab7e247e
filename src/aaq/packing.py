"""Integer codes of quantized weights, packing them two int4 values per byte, and the packed state.

A run folder stores each quantized weight already on its grid, `w = (q - z) * s` in float32, but
not `q`, `s` or `z`. `recover_codes` finds a scale per row (or group) that reproduces every stored
value bit for bit and returns the codes; nothing is rounded that was not already on the grid, so a
weight that is not on a grid of its spec is an error, never a silent approximation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aaq.errors import AaqError
from aaq.quantizers import QuantSpec, _grouped

PACKED_FORMAT = "aaq-packed"
PACKED_WEIGHTS = "aaq_packed.safetensors"
# Per quantized linear `<name>`: `<name>.qweight` (uint8 codes, packed), `<name>.scale` (float32,
# one per row/group), `<name>.zero` (uint8, asymmetric specs only); every other tensor as is.
_SUFFIXES = ("qweight", "scale", "zero")

# Candidate scales are amax / k and their neighbours up to this many float32 ulps: amax itself is
# the rounded product k * s, so amax / k can miss the true s by an ulp or so.
_ULP_STEPS = 3


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight (out, in) as unsigned codes, a scale per row/group and, if asymmetric, a zero point.

    `codes` hold `q - spec.qmin` in [0, 2^bits - 1] (uint8, one per entry); the weight is
    `(codes + qmin - zero) * scale` per group, with `zero` 0 for symmetric specs.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec

    def dequantize(self) -> torch.Tensor:
        """The float32 weight these codes stand for (bit-identical to the weight they came from)."""
        levels = _grouped(self.codes.to(torch.float32) + self.spec.qmin, self.spec.group_size)
        if self.zero is not None:
            levels = levels - self.zero.to(torch.float32).unsqueeze(-1)
        return (levels * self.scale.unsqueeze(-1)).flatten(-2)


def _neighbours(scale: torch.Tensor, steps: int) -> torch.Tensor:
    """`scale` moved `steps` float32 ulps up (steps > 0) or down."""
    direction = torch.full_like(scale, float("inf") if steps > 0 else 0.0)
    for _ in range(abs(steps)):
        scale = torch.nextafter(scale, direction)
    return scale


def _candidate_order(spec: QuantSpec) -> list[int]:
    """Integer magnitudes the largest entry of a group may have, most likely first."""
    largest = -spec.qmin if spec.symmetric else spec.qmax
    return list(range(largest, 0, -1))


def _fits_range(levels: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per group: do the integer levels q - z fit the spec's code range?"""
    if spec.symmetric:
        return (levels.amin(-1) >= spec.qmin) & (levels.amax(-1) <= spec.qmax)
    # Asymmetric ranges always contain 0 (quant_params), so q - z spans at most qmax levels around it.
    low = levels.amin(-1).clamp(max=0)
    return levels.amax(-1) - low <= spec.qmax


@torch.no_grad()
def recover_codes(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> WeightCodes:
    """The codes, scales and zero points that reproduce `weight` (out, in) exactly under `spec`.

    Raises AaqError naming `name` when some row or group is not on a `spec.bits`-bit grid.
    """
    grouped = _grouped(weight.detach().to(torch.float32), spec.group_size)
    amax = grouped.abs().amax(-1)
    scale = torch.ones_like(amax)
    levels = torch.zeros_like(grouped)
    solved = amax == 0
    for magnitude in _candidate_order(spec):
        for steps in (0, *[s for k in range(1, _ULP_STEPS + 1) for s in (k, -k)]):
            if bool(solved.all()):
                break
            candidate = _neighbours(amax / magnitude, steps)
            candidate = torch.where(candidate > 0, candidate, torch.ones_like(candidate))
            trial = torch.round(grouped / candidate.unsqueeze(-1))
            exact = (trial * candidate.unsqueeze(-1) == grouped).all(-1) & _fits_range(trial, spec)
            new = exact & ~solved
            scale = torch.where(new, candidate, scale)
            levels = torch.where(new.unsqueeze(-1), trial, levels)
            solved |= new
    if not bool(solved.all()):
        row = int(torch.nonzero(~solved)[0, 0])
        raise AaqError(
            f"{name} row {row} is not on a {spec.bits}-bit grid of its quantization spec; export needs the quantized "
            "weights of an `aaq quantize` run (GPTQ with act_order and groups needs static_groups), re-run quantize"
        )
    zero = None
    if not spec.symmetric:
        zero = (-levels.amin(-1)).clamp(min=0)
        levels = levels + zero.unsqueeze(-1)
        zero = zero.to(torch.uint8)
    codes = (levels.flatten(-2) - spec.qmin).to(torch.uint8)
    return WeightCodes(codes=codes, scale=scale, zero=zero, spec=spec)


def codes_per_byte(bits: int) -> int:
    """How many codes one byte holds: two for widths up to 4 bits, else one."""
    return 2 if bits <= 4 else 1


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (..., n) two per byte (even index in the low nibble) when `bits` <= 4.

    An odd last dimension is padded with one zero nibble.
    """
    if codes_per_byte(bits) == 1:
        return codes.to(torch.uint8).contiguous()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `n` uint8 codes along the last dimension."""
    if codes_per_byte(bits) == 1:
        return packed[..., :n]
    pairs = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return pairs[..., :n]


def pack_state(state: dict[str, torch.Tensor], linears: list[str], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """`state` with the weight of every linear in `linears` replaced by its packed codes, scales and zeros."""
    packed = {name: tensor for name, tensor in state.items() if name.removesuffix(".weight") not in linears}
    for name in linears:
        codes = recover_codes(state[f"{name}.weight"], spec, name)
        packed[f"{name}.qweight"] = pack_codes(codes.codes, spec.bits)
        packed[f"{name}.scale"] = codes.scale.contiguous()
        if codes.zero is not None:
            packed[f"{name}.zero"] = codes.zero.contiguous()
    return packed


def _check(condition: bool, name: str, problem: str) -> None:
    """Raise AaqError naming linear `name` and `problem` unless `condition` holds."""
    if not condition:
        raise AaqError(f"{name}: {problem}; the export is corrupt or its config does not match it, re-run `aaq export`")


def _unpack_linear(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size, spec: QuantSpec) -> torch.Tensor:
    """The float32 weight of linear `name` (out, in) from its packed tensors, validated against `spec`."""
    out_features, in_features = shape
    groups = 1 if spec.group_size is None else in_features // spec.group_size
    per_byte = codes_per_byte(spec.bits)
    qweight, scale, zero = (tensors.get(f"{name}.{suffix}") for suffix in _SUFFIXES)
    _check(qweight is not None and scale is not None, name, "packed weight or scale missing")
    _check(qweight.dtype == torch.uint8, name, f"packed weight is {qweight.dtype}, expected uint8")
    expected = (out_features, -(-in_features // per_byte))
    _check(tuple(qweight.shape) == expected, name, f"packed weight shape {tuple(qweight.shape)} is not {expected} for {spec.bits}-bit codes")
    _check(tuple(scale.shape) == (out_features, groups), name, f"scale shape {tuple(scale.shape)} is not {(out_features, groups)}")
    _check(bool(torch.isfinite(scale).all() and (scale > 0).all()), name, "scales must be finite and positive")
    _check((zero is None) == spec.symmetric, name, "zero points present iff the weights are asymmetric")
    codes = unpack_codes(qweight, in_features, spec.bits)
    top = 2**spec.bits - 1
    _check(int(codes.max()) <= top, name, f"codes exceed the {spec.bits}-bit range")
    if zero is not None:
        _check(zero.dtype == torch.uint8, name, f"zero points are {zero.dtype}, expected uint8")
        _check(tuple(zero.shape) == (out_features, groups) and int(zero.max()) <= top, name, "zero points have the wrong shape or range")
    return WeightCodes(codes=codes, scale=scale.to(torch.float32), zero=zero, spec=spec).dequantize()


def unpack_state(tensors: dict[str, torch.Tensor], linear_shapes: dict[str, torch.Size], spec: QuantSpec) -> dict[str, torch.Tensor]:
    """Inverse of `pack_state`: every packed linear (by name, with its (out, in) shape) back as a float32 weight."""
    packed = {f"{name}.{suffix}" for name in linear_shapes for suffix in _SUFFIXES}
    state = {name: tensor for name, tensor in tensors.items() if name not in packed}
    for name, shape in linear_shapes.items():
        state[f"{name}.weight"] = _unpack_linear(tensors, name, shape, spec)
    return state
