"""Integer codes: what RTN and GPTQ produce, packed two int4 per byte, dequantized exactly, validated when read."""

import pytest
import torch

from aaq.errors import AaqError
from aaq.methods.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from aaq.quant.packing import WeightCodes, pack_codes, rtn_codes, unpack_codes
from aaq.quant.quantizers import QuantSpec
from tests.helpers import rtn_weight


@pytest.mark.parametrize("shape", [(3, 7), (5, 1), (2, 16)])
def test_pack_unpack_round_trips_all_sixteen_values(shape):
    codes = torch.arange(shape[0] * shape[1]).remainder(16).to(torch.uint8).reshape(shape)
    packed = pack_codes(codes, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], (shape[1] + 1) // 2)
    assert torch.equal(unpack_codes(packed, shape[1], 4), codes)
    assert set(unpack_codes(pack_codes(torch.arange(16, dtype=torch.uint8)[None], 4), 16, 4).flatten().tolist()) == set(range(16))


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=4, symmetric=True, clip_search=True),
        QuantSpec(bits=4, symmetric=True, group_size=8, clip_ratio=0.9),
        QuantSpec(bits=4, symmetric=True, group_size=8, half_range_scale=True),  # level -8 is reached
        QuantSpec(bits=4, symmetric=False, group_size=16),
        QuantSpec(bits=3, symmetric=False),
    ],
)
def test_rtn_codes_dequantize_to_the_rtn_weight_bit_exactly(spec):
    weight = torch.randn(24, 48, generator=torch.Generator().manual_seed(2))
    codes = rtn_codes(weight, spec)
    levels = codes.levels()
    assert levels.min() >= spec.qmin and levels.max() <= spec.qmax
    assert torch.equal(codes.dequantize(), rtn_weight(weight, spec))
    if spec.half_range_scale:
        assert int(levels.min()) == spec.qmin


def test_bfloat16_weights_get_float32_codes_whose_value_is_the_weight_in_bfloat16():
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    spec = QuantSpec(bits=4, symmetric=True)
    codes = rtn_codes(weight, spec)
    assert codes.scale.dtype == torch.float32
    assert torch.equal(codes.dequantize(torch.bfloat16), codes.dequantize().to(torch.bfloat16))
    assert torch.equal(rtn_codes(codes.dequantize(), spec).levels(), codes.levels())


@pytest.mark.parametrize(("static_groups", "scattered"), [(True, False), (False, True)])
def test_gptq_codes_are_exact_and_record_scattered_act_order_groups(static_groups, scattered):
    generator = torch.Generator().manual_seed(0)
    weight, inputs = torch.randn(16, 64, generator=generator), torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    spec = QuantSpec(bits=4, symmetric=False, group_size=16)
    config = GPTQConfig(static_groups=static_groups)
    result = gptq_quantize(weight, prepare_hessian(2 * inputs.T.double() @ inputs.double() / 256, config), spec, config)
    assert torch.equal(result.codes.dequantize(), result.weight)
    assert result.codes.contiguous_groups is not scattered
    if scattered:
        assert sorted(torch.bincount(result.codes.g_idx.long()).tolist()) == [16, 16, 16, 16]


def test_stored_codes_round_trip_and_bad_ones_are_clear_errors():
    spec = QuantSpec(bits=4, symmetric=False)
    codes = rtn_codes(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), spec)
    tensors = codes.tensors("lin")
    assert set(tensors) == {"lin.qweight", "lin.scale", "lin.zero"} and tensors["lin.qweight"].shape == (4, 3)
    assert torch.equal(WeightCodes.from_tensors(tensors, "lin", torch.Size((4, 6)), spec).dequantize(), codes.dequantize())
    tensors["lin.zero"] = tensors["lin.zero"].to(torch.int8) - 16  # negative zero points would pass a max() check
    with pytest.raises(AaqError, match="lin: zero points are torch.int8, expected uint8.*write it again"):
        WeightCodes.from_tensors(tensors, "lin", torch.Size((4, 6)), spec)
    with pytest.raises(AaqError, match="packed weight shape"):
        WeightCodes.from_tensors(codes.tensors("lin"), "lin", torch.Size((4, 8)), spec)
