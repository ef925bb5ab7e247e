"""int4 codes: recovered bit-exactly from a run's weights, packed two per byte, validated when unpacked."""

import pytest
import torch

from aaq.errors import AaqError
from aaq.methods.gptq import GPTQConfig
from aaq.packing import pack_codes, pack_state, recover_codes, unpack_codes, unpack_state
from aaq.quantizers import QuantSpec, quantize_weight_rtn


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
def test_recovered_codes_reproduce_rtn_weights_bit_exactly(spec):
    weight = quantize_weight_rtn(torch.randn(24, 48, generator=torch.Generator().manual_seed(2)), spec)
    codes = recover_codes(weight, spec)
    assert int(codes.codes.max()) <= 2**spec.bits - 1
    assert torch.equal(codes.dequantize(), weight)
    if spec.half_range_scale:
        assert int(codes.codes.min()) == 0  # code 0 is level qmin = -8


@pytest.mark.parametrize("static_groups", [True, False])
def test_gptq_group_codes_are_recovered_unless_act_order_scatters_the_groups(static_groups):
    from aaq.methods.gptq import gptq_quantize

    generator = torch.Generator().manual_seed(0)
    weight, inputs = torch.randn(16, 64, generator=generator), torch.randn(256, 64, generator=generator) * torch.linspace(0.1, 3, 64)
    spec = QuantSpec(bits=4, symmetric=True, group_size=16)
    quantized = gptq_quantize(weight, 2 * inputs.T.double() @ inputs.double() / 256, spec, GPTQConfig(static_groups=static_groups))
    if static_groups:
        assert torch.equal(recover_codes(quantized, spec).dequantize(), quantized)
    else:
        with pytest.raises(AaqError, match="static_groups"):
            recover_codes(quantized, spec)


def test_weights_off_the_grid_are_refused():
    with pytest.raises(AaqError, match="not on a 4-bit grid"):
        recover_codes(torch.randn(4, 32), QuantSpec(bits=4, symmetric=True))


def test_packed_tensors_of_the_wrong_dtype_are_a_clear_error():
    spec = QuantSpec(bits=4, symmetric=False)
    weight = quantize_weight_rtn(torch.randn(4, 6, generator=torch.Generator().manual_seed(5)), spec)
    tensors = pack_state({"lin.weight": weight}, ["lin"], spec)
    assert torch.equal(unpack_state(tensors, {"lin": weight.shape}, spec)["lin.weight"], weight)
    tensors["lin.zero"] = tensors["lin.zero"].to(torch.int8) - 16  # negative zero points would pass a max() check
    with pytest.raises(AaqError, match="lin: zero points are torch.int8, expected uint8.*re-run `aaq export`"):
        unpack_state(tensors, {"lin": weight.shape}, spec)
