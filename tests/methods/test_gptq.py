"""Tests of the GPTQ weight solver (aaq.methods.gptq)."""

from __future__ import annotations

import pytest
import torch

from aaq.api import QuantizeConfig, quantize
from aaq.errors import AaqError
from aaq.methods import QuaRotConfig, RTNConfig
from aaq.methods.gptq import GPTQConfig, HessianAccumulator, gptq_quantize
from aaq.quant.quantizers import QuantSpec, weight_quant_params
from tests.helpers import CALIBRATION, make_tiny_model, quantized_logit_error, rtn_weight

OUT, IN, N = 64, 128, 512


def _correlated_inputs(seed: int = 0) -> torch.Tensor:
    """Calibration inputs whose Hessian is far from diagonal (independent features mixed by a random matrix)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, IN, generator=gen)
    mixing = torch.randn(IN, IN, generator=gen) / IN**0.5 + torch.eye(IN)
    return z @ mixing


def _layer(seed: int = 1) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    acc.add(x)
    return acc.hessian


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return ((x @ w.T - x @ wq.T) ** 2).sum().item()


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(group_size: int | None, act_order: bool) -> None:
    x, w = _correlated_inputs(), _layer()
    spec = QuantSpec(bits=4, symmetric=True, group_size=group_size)
    gptq = gptq_quantize(w, _hessian(x), spec, GPTQConfig(act_order=act_order)).weight
    rtn = rtn_weight(w, spec)
    assert gptq.shape == w.shape and gptq.dtype == w.dtype
    assert _output_error(x, w, gptq) <= 0.7 * _output_error(x, w, rtn)


@pytest.mark.parametrize(
    "spec, config",
    [
        (QuantSpec(bits=4, symmetric=True), GPTQConfig()),
        (QuantSpec(bits=4, symmetric=True, clip_search=True), GPTQConfig()),
        (QuantSpec(bits=4, symmetric=False, group_size=32), GPTQConfig()),
        (QuantSpec(bits=3, symmetric=True, group_size=16, clip_search=True), GPTQConfig(block_size=40)),
        (QuantSpec(bits=4, symmetric=False, group_size=32), GPTQConfig(static_groups=True)),
    ],
)
def test_every_value_on_the_quantization_grid(spec: QuantSpec, config: GPTQConfig) -> None:
    w = _layer()
    result = gptq_quantize(w, _hessian(_correlated_inputs()), spec, config)
    levels = result.codes.levels()
    assert torch.equal(result.codes.dequantize(), result.weight)
    assert levels.min() >= spec.qmin and levels.max() <= spec.qmax
    if spec.group_size is None or config.static_groups:
        # Scales fixed up front are exactly those of the original weight.
        scale, zero = weight_quant_params(w, spec)
        assert torch.equal(result.codes.scale, scale.squeeze(-1)) and result.codes.contiguous_groups
        if not spec.symmetric:
            assert torch.equal(result.codes.zero.float(), zero.squeeze(-1))


def test_dynamic_groups_with_act_order_are_contiguous_in_processing_order() -> None:
    x, w = _correlated_inputs(), _layer()
    h = _hessian(x)
    spec = QuantSpec(bits=4, symmetric=True, group_size=32)
    result = gptq_quantize(w, h, spec, GPTQConfig(act_order=True))
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    assert torch.equal(result.codes.g_idx[perm].long(), torch.arange(IN) // 32)


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_identity_hessian_reduces_to_rtn(group_size: int | None, symmetric: bool) -> None:
    w = _layer()
    spec = QuantSpec(bits=4, symmetric=symmetric, group_size=group_size)
    gptq = gptq_quantize(w, torch.eye(IN), spec, GPTQConfig(act_order=True)).weight
    assert torch.equal(gptq, rtn_weight(w, spec))


def test_dead_input_columns_become_zero() -> None:
    x = _correlated_inputs()
    dead = torch.tensor([3, 50, 127])
    x[:, dead] = 0.0
    for spec in (QuantSpec(bits=4, symmetric=False), QuantSpec(bits=4, symmetric=True, group_size=32)):
        wq = gptq_quantize(_layer(), _hessian(x), spec, GPTQConfig()).weight
        assert torch.all(wq[:, dead] == 0)
        assert torch.count_nonzero(wq) > 0.8 * OUT * (IN - len(dead))


def test_accumulator_over_batches_equals_hessian_of_concatenation() -> None:
    x = _correlated_inputs()
    first, second = x[:200].reshape(4, 50, IN), x[200:]
    acc = HessianAccumulator(IN)
    acc.add(first)
    acc.add(second)
    expected = 2.0 / N * (x.double().T @ x.double())
    assert acc.n_samples == N
    assert acc.hessian.dtype == torch.float64
    assert torch.allclose(acc.hessian, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_indefinite_hessian_raises_with_fix() -> None:
    h = torch.eye(IN)
    h[0, 0] = -1e6
    with pytest.raises(AaqError, match="more tokens or raise GPTQConfig.damp"):
        gptq_quantize(_layer(), h, QuantSpec(bits=4, symmetric=True), GPTQConfig())


def test_bad_inputs_raise() -> None:
    with pytest.raises(AaqError):
        GPTQConfig(damp=0.0)
    with pytest.raises(AaqError):
        GPTQConfig(block_size=0)
    with pytest.raises(AaqError):
        gptq_quantize(_layer(), torch.eye(IN + 1), QuantSpec(bits=4, symmetric=True), GPTQConfig())
    with pytest.raises(AaqError):
        _ = HessianAccumulator(IN).hessian


@pytest.mark.parametrize("group_size, block_size", [(None, 1), (None, 40), (32, 40), (32, 64)])
def test_result_does_not_depend_on_block_size(group_size: int | None, block_size: int) -> None:
    # With groups, a block size that is not a multiple of the group size is realigned to whole groups.
    h, w = _hessian(_correlated_inputs()), _layer()
    spec = QuantSpec(bits=4, symmetric=True, group_size=group_size)
    x = _correlated_inputs()
    reference = gptq_quantize(w, h, spec, GPTQConfig(block_size=IN)).weight
    blocked = gptq_quantize(w, h, spec, GPTQConfig(block_size=block_size)).weight
    # Exact in exact arithmetic; in float32 a value on a rounding tie may flip one level, and the
    # error feedback then moves a few later entries of that row. Such flips stay rare and harmless.
    assert ((blocked - reference).abs() > 1e-4).float().mean() < 0.002
    assert _output_error(x, w, blocked) == pytest.approx(_output_error(x, w, reference), rel=0.01)


def test_gptq_model_is_closer_to_fp_than_rtn():
    assert quantized_logit_error(GPTQConfig(), "w4a16") < 0.9 * quantized_logit_error(RTNConfig(), "w4a16")


def _interrupt_gptq_at_call(monkeypatch, call: int) -> None:
    """Make the GPTQ solver raise KeyboardInterrupt on its `call`-th use, as a killed run would."""
    import aaq.methods.gptq as gptq_module

    real_solver, calls = gptq_module.gptq_quantize, []

    def failing_solver(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real_solver(*args, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", failing_solver)


def test_interrupted_gptq_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from aaq.methods.gptq import PROGRESS_DIR

    config = QuantizeConfig(method=QuaRotConfig(), bits="w4a4kv4")
    uninterrupted = make_tiny_model("llama")
    quantize(uninterrupted, config, calibration=CALIBRATION)

    with monkeypatch.context() as patch:
        _interrupt_gptq_at_call(patch, 8)  # first projection of the second layer
        with pytest.raises(KeyboardInterrupt):
            quantize(make_tiny_model("llama"), config, calibration=CALIBRATION, run_dir=tmp_path)
    assert (tmp_path / PROGRESS_DIR / "layer_0000.safetensors").is_file()

    resumed = make_tiny_model("llama")
    quantize(resumed, config, calibration=CALIBRATION, run_dir=tmp_path, resume=True)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not (tmp_path / PROGRESS_DIR).exists()


def test_gptq_progress_of_another_config_is_refused(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        _interrupt_gptq_at_call(patch, 8)
        with pytest.raises(KeyboardInterrupt):
            quantize(make_tiny_model("llama"), QuantizeConfig(method=GPTQConfig(), bits="w4a16"), calibration=CALIBRATION, run_dir=tmp_path)
    other = QuantizeConfig(method=GPTQConfig(damp=0.1), bits="w4a16")
    with pytest.raises(AaqError, match="another configuration"):
        quantize(make_tiny_model("llama"), other, calibration=CALIBRATION, run_dir=tmp_path, resume=True)
