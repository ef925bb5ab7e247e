"""The `aaq` method: the reference is needed, checked, and freed before calibration."""

import copy
import gc
import weakref

import pytest
import torch

import aaq.methods.ostquant as ostquant_module
from aaq.api import QuantizeConfig, quantize
from aaq.calibration.loop import CalibrationSettings
from aaq.calibration.losses import LossConfig
from aaq.methods import AAQConfig
from tests.helpers import TOKENS, logits_of, make_tiny_model


def test_aaq_frees_the_reference_before_the_first_step(monkeypatch):
    model = make_tiny_model("llama")
    refs = []

    def make_reference():
        reference = copy.deepcopy(model)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
        refs.append(weakref.ref(reference))
        return reference

    real_calibrate = ostquant_module.calibrate

    def checking_calibrate(*args, **kwargs):
        gc.collect()
        assert refs[0]() is None, "the reference model is still alive during calibration"
        return real_calibrate(*args, **kwargs)

    monkeypatch.setattr(ostquant_module, "calibrate", checking_calibrate)
    settings = CalibrationSettings(steps=2, batch_size=2, loss=LossConfig(name="apc", k=16))
    result = quantize(model, QuantizeConfig(method=AAQConfig(training=settings)), calibration=TOKENS, reference=make_reference())
    assert torch.isfinite(logits_of(result.model)).all()


def _aaq_run(tmp_path, name: str, **training) -> tuple[dict[str, bytes], dict[str, torch.Tensor], list]:
    """An AAQ run on a tiny Llama (reference given as a loader): its teacher cache files, its transforms and its loss history."""
    from tests.helpers import perturbed_reference, snapshot

    model = make_tiny_model("llama")
    reference = perturbed_reference(model)
    settings = CalibrationSettings(steps=3, batch_size=4, loss=LossConfig(name="apc", k=16), checkpoint_every=1, **training)
    result = quantize(model, QuantizeConfig(method=AAQConfig(training=settings, weight_quantizer="rtn")), calibration=TOKENS.repeat(4, 1),
                      reference=lambda: reference, run_dir=tmp_path / name)  # fmt: skip
    return snapshot(tmp_path / name / "teacher_cache"), result.transforms.tensors(), result.metrics


def test_sequential_teachers_and_micro_batches_reach_the_same_result(tmp_path):
    """The aligned model's targets from its stored hidden states (the reference then runs alone) give the same cache, bit for bit;
    micro-batches of one sequence give the same steps (float rounding aside)."""
    cache, transforms, metrics = _aaq_run(tmp_path, "together", teacher_batch=2)
    sequential = _aaq_run(tmp_path, "sequential", teacher_batch=2, sequential_teachers=True)
    assert sequential[0] == cache and len(cache) > 0
    assert all(torch.equal(value, sequential[1][name]) for name, value in transforms.items())
    micro = _aaq_run(tmp_path, "micro", teacher_batch=2, micro_batch=1)
    assert micro[2]["loss_last"] == pytest.approx(metrics["loss_last"], rel=1e-5)
    for name, value in transforms.items():
        assert torch.allclose(micro[1][name], value, rtol=1e-4, atol=1e-6), name
