"""Integer codes of quantized weights: the source of truth of every quantized linear, packed two int4 per byte.

RTN and GPTQ produce `WeightCodes` (the codes, a scale per row and group, zero points for
asymmetric specs, and the group of each input column when GPTQ's act-order scattered them); the
model computes with `codes.dequantize()` in its own dtype, and run folders and exports store the
codes themselves, so a bfloat16 run exports the exact integers it was quantized to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aaq.errors import AaqError
from aaq.quant.quantizers import QuantSpec, dequantize_levels, weight_levels

# Per quantized linear `<name>`: `<name>.qweight` (uint8 codes, packed), `<name>.scale` (float32,
# per row and group), `<name>.zero` (uint8, asymmetric specs only), `<name>.g_idx` (int32, the group
# of each input column, only when GPTQ's act-order scattered the groups).
SUFFIXES = ("qweight", "scale", "zero", "g_idx")


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


def packed_bytes(out_features: int, in_features: int, spec: QuantSpec) -> int:
    """The bytes `WeightCodes` of an (out, in) weight with `spec` store: packed codes, float32 scales, zero points.

    Not counted: the group index of act-order GPTQ with dynamic groups (4 bytes per input column, 8 / out_features of the codes).
    """
    groups = 1 if spec.group_size is None else in_features // spec.group_size
    codes = out_features * -(-in_features // codes_per_byte(spec.bits))
    return codes + out_features * groups * (4 + (0 if spec.symmetric else 1))


@dataclass(frozen=True)
class WeightCodes:
    """A quantized weight (out, in): packed codes `q - qmin`, scale and zero point per row and group, column groups.

    `scale`: float32 (out, groups); `zero`: uint8 (out, groups) for asymmetric specs, else None;
    `g_idx`: int32 (in,) group of each input column when the groups are not contiguous (GPTQ act-order
    with dynamic groups), else None. The weight is `(q - zero[:, g]) * scale[:, g]`.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    spec: QuantSpec
    in_features: int

    @classmethod
    def from_levels(
        cls, levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, g_idx: torch.Tensor | None = None
    ) -> WeightCodes:
        """Codes of integer levels (out, in) in [qmin, qmax] with their scale and zero point (out, groups), on the CPU."""
        codes = (levels - spec.qmin).to(device="cpu", dtype=torch.uint8)
        return cls(
            qweight=pack_codes(codes, spec.bits),
            scale=scale.detach().to(device="cpu", dtype=torch.float32).contiguous(),
            zero=None if spec.symmetric else zero.to(device="cpu", dtype=torch.uint8).contiguous(),
            g_idx=None if g_idx is None else g_idx.to(device="cpu", dtype=torch.int32).contiguous(),
            spec=spec,
            in_features=levels.shape[1],
        )

    @property
    def contiguous_groups(self) -> bool:
        """Whether each group is a contiguous run of input columns (what plain grouped formats store)."""
        return self.g_idx is None

    def levels(self) -> torch.Tensor:
        """The integer levels q (out, in) as float32."""
        return unpack_codes(self.qweight, self.in_features, self.spec.bits).to(torch.float32) + self.spec.qmin

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """The weight these codes stand for, computed in float32 and returned in `dtype` on `device`."""
        zero = torch.zeros_like(self.scale) if self.zero is None else self.zero.to(torch.float32)
        if self.g_idx is None:
            weight = dequantize_levels(self.levels(), self.scale, zero, self.spec)
        else:
            index = self.g_idx.long()
            weight = (self.levels() - zero[:, index]) * self.scale[:, index]
        return weight.to(device=device, dtype=dtype)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The stored tensors of linear `name`."""
        out = {f"{name}.qweight": self.qweight, f"{name}.scale": self.scale}
        if self.zero is not None:
            out[f"{name}.zero"] = self.zero
        if self.g_idx is not None:
            out[f"{name}.g_idx"] = self.g_idx
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], name: str, shape: torch.Size, spec: QuantSpec) -> WeightCodes:
        """The codes of linear `name` (out, in) read from stored tensors, validated against `spec`."""
        out_features, in_features = shape
        qweight, scale, zero, g_idx = (tensors.get(f"{name}.{suffix}") for suffix in SUFFIXES)
        _check(qweight is not None and scale is not None, name, "packed weight or scale missing")
        _check(qweight.dtype == torch.uint8, name, f"packed weight is {qweight.dtype}, expected uint8")
        expected = (out_features, -(-in_features // codes_per_byte(spec.bits)))
        _check(tuple(qweight.shape) == expected, name, f"packed weight shape {tuple(qweight.shape)} is not {expected} for {spec.bits}-bit codes")
        groups = 1 if spec.group_size is None else in_features // spec.group_size
        _check(tuple(scale.shape) == (out_features, groups), name, f"scale shape {tuple(scale.shape)} is not {(out_features, groups)}")
        _check(bool(torch.isfinite(scale).all() and (scale > 0).all()), name, "scales must be finite and positive")
        _check((zero is None) == spec.symmetric, name, "zero points present iff the weights are asymmetric")
        top = 2**spec.bits - 1
        _check(int(unpack_codes(qweight, in_features, spec.bits).max()) <= top, name, f"codes exceed the {spec.bits}-bit range")
        if zero is not None:
            _check(zero.dtype == torch.uint8, name, f"zero points are {zero.dtype}, expected uint8")
            _check(tuple(zero.shape) == (out_features, groups) and int(zero.max()) <= top, name, "zero points have the wrong shape or range")
        if g_idx is not None:
            _check(tuple(g_idx.shape) == (in_features,) and int(g_idx.min()) >= 0 and int(g_idx.max()) < groups, name, "g_idx has the wrong shape or range")
        return cls(qweight, scale.to(torch.float32), zero, g_idx, spec, in_features)


def _check(condition: bool, name: str, problem: str) -> None:
    """Raise AaqError naming linear `name` and `problem` unless `condition` holds."""
    if not condition:
        raise AaqError(f"{name}: {problem}; the folder is corrupt or its config does not match it, write it again")


def rtn_codes(weight: torch.Tensor, spec: QuantSpec) -> WeightCodes:
    """Round-to-nearest codes of a weight matrix (out, in)."""
    levels, scale, zero = weight_levels(weight, spec)
    return WeightCodes.from_levels(levels, scale, zero, spec)
