"""Method options: each method config takes the options it has and names the ones it would ignore."""

import pytest

from aaq.errors import AaqError
from aaq.methods import AAQConfig, GPTQConfig, MethodOptions, OSTQuantConfig, QuaRotConfig, RTNConfig


def test_given_lists_only_set_options():
    assert MethodOptions(steps=3, transforms={"r3": False}).given() == {"r3": False, "steps": 3}


def test_quarot_takes_rotations_and_the_weight_step():
    config = QuaRotConfig().with_options(MethodOptions(transforms={"r1": "hadamard", "r4": False}, damp=0.05, act_order=False, weight_quantizer="rtn"))
    assert (config.transforms.r1, config.transforms.r4, config.weight_quantizer) == ("hadamard", False, "rtn")
    assert (config.gptq.damp, config.gptq.act_order) == (0.05, False)


def test_learned_methods_take_calibration_loss_and_transform_options():
    config = AAQConfig().with_options(MethodOptions(steps=5, loss="kl_top", lam=0.3, cache=False, transforms={"smoothing": False, "r2": "hadamard"}))
    assert (config.training.steps, config.training.loss.name, config.training.loss.lam, config.training.cache) == (5, "kl_top", 0.3, False)
    assert config.transforms.smoothing is False and config.transforms.r2 == "hadamard"
    assert isinstance(config, AAQConfig)


@pytest.mark.parametrize(
    ("config", "options", "setting"),
    [
        (RTNConfig(), MethodOptions(damp=0.1), "damp"),
        (GPTQConfig(), MethodOptions(transforms={"r4": False}), "r4"),
        (QuaRotConfig(), MethodOptions(steps=4), "steps"),
        (QuaRotConfig(), MethodOptions(transforms={"smoothing": False}), "smoothing"),
        (OSTQuantConfig(), MethodOptions(static_groups=True, loss="bogus"), "loss"),
    ],
)
def test_an_option_the_method_would_ignore_or_reject_is_named(config, options, setting):
    with pytest.raises(AaqError) as info:
        config.with_options(options)
    assert setting in str(info.value)
