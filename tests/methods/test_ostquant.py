"""The `ostquant` and `aaq` methods end to end on a tiny model, and their recipes."""

import copy
import json
from pathlib import Path

import pytest
import torch

import aaq.methods.ostquant as ostquant_module
from aaq.api import CalibrationConfig, QuantizeConfig, quantize
from aaq.calibration.loop import CalibrationSettings
from aaq.calibration.losses import LossConfig
from aaq.methods import AAQConfig, OSTQuantConfig
from aaq.quant.fake_quant import QuantLinear
from tests.helpers import make_tiny_model

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
TOKENS = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
TINY = CalibrationSettings(steps=2, batch_size=2, loss=LossConfig(name="kl_top", k=16), checkpoint_every=1)


def _config(method) -> QuantizeConfig:
    return QuantizeConfig(method=method, bits="w4a4kv4", calibration=CalibrationConfig(n_samples=4, seq_len=16, batch_size=2))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("weight_quantizer", ["gptq", "rtn"])
def test_ostquant_runs_and_writes_its_run_folder(tmp_path, weight_quantizer):
    model = make_tiny_model("qwen2")
    fp = _logits(model)
    config = _config(OSTQuantConfig(training=TINY, weight_quantizer=weight_quantizer))
    result = quantize(model, config, calibration=TOKENS, run_dir=tmp_path)
    quantized = _logits(model)
    assert torch.isfinite(quantized).all() and not torch.allclose(quantized, fp)
    assert result.transforms.config.r3 and result.transforms.config.r4
    assert result.transforms.r1.shape == (96, 96) and len(result.transforms.r2) == 2
    assert len(result.transforms.scales) == 4 * 2 and all((s > 0).all() for s in result.transforms.scales.values())
    assert json.loads((tmp_path / "calibration" / "checkpoint.json").read_text())["step"] == 2
    assert {"teachers_s", "calibration_s"} <= set(result.timings)
    moved = result.metrics["transform_movement"]
    assert result.metrics["calibration_steps"] == 2 and moved["r1"] > 0 and moved["r2_max"] >= moved["r2_mean"] > 0


def test_learned_transforms_with_fp_scheme_keep_the_function(tmp_path):
    model = make_tiny_model("qwen3")
    fp = _logits(model)
    config = QuantizeConfig(method=OSTQuantConfig(training=TINY), bits="fp")
    quantize(model, config, calibration=TOKENS)
    assert ((_logits(model) - fp).norm() / fp.norm()).item() < 1e-4








@pytest.mark.parametrize("weight_quantizer", ["gptq", "rtn"])
def test_a_failed_calibration_takes_the_transforms_out_again(monkeypatch, weight_quantizer):
    from torch.nn.utils import parametrize

    def diverge(*_args, **_kwargs):
        raise RuntimeError("diverged")

    monkeypatch.setattr(ostquant_module, "calibrate", diverge)
    model = make_tiny_model("llama")
    with pytest.raises(RuntimeError, match="diverged"):
        quantize(model, _config(OSTQuantConfig(training=TINY, weight_quantizer=weight_quantizer)), calibration=TOKENS)
    assert not any(parametrize.is_parametrized(m) or m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.input_quantizer is not None for m in linears)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("same_model", [True, False])
def test_aaq_logs_the_pair_on_the_calibration_windows_and_warns_when_the_push_sees_nothing(tmp_path, caplog, same_model):
    model = make_tiny_model("llama")
    reference = copy.deepcopy(model)
    if not same_model:
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.5 * torch.randn_like(p))
    settings = CalibrationSettings(steps=1, batch_size=2, loss=LossConfig(name="apc", k=16, push_tokens="reference"))
    with caplog.at_level("INFO", logger="aaq"):
        quantize(model, _config(AAQConfig(training=settings)), calibration=TOKENS, reference=reference, run_dir=tmp_path)
    meta = json.loads((tmp_path / "teacher_cache" / "meta.json").read_text())
    assert meta["push_tokens"] == "reference" and meta["pair_statistics"]["positions"] == TOKENS.numel()
    assert (meta["pair_statistics"]["kl"] == 0.0) == same_model
    assert "aligned vs reference on the calibration windows (64 tokens)" in caplog.text
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "nothing to see" in r.getMessage()]
    assert len(warned) == (1 if same_model else 0)
