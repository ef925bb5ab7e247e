"""The `aaq` method: the reference is needed, checked, and freed before calibration."""

import copy
import gc
import weakref

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
