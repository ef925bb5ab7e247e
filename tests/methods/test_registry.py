"""Methods end to end on tiny models: GPTQ beats RTN, QuaRot beats RTN at W4A4, the registry is open."""

from dataclasses import dataclass
from typing import ClassVar

import pytest

from aaq.api import QuantizeConfig, quantize
from aaq.errors import AaqError
from aaq.methods import GPTQConfig, MethodConfig, MethodResult, QuaRotConfig, method_config_from_dict, method_names, register_method
from aaq.methods.registry import _METHODS
from tests.helpers import make_tiny_model


def test_methods_needing_data_say_so():
    model = make_tiny_model("llama")
    with pytest.raises(AaqError, match="needs calibration data"):
        quantize(model, QuantizeConfig(method=GPTQConfig(), bits="w4a16"))


def test_a_new_method_is_a_config_and_one_function():
    @dataclass
    class NoOpConfig(MethodConfig):
        name: ClassVar[str] = "noop-test"
        note: str = "x"

    calls = []
    register_method(NoOpConfig)(lambda context: calls.append(context.method.note) or MethodResult())
    try:
        assert "noop-test" in method_names()
        config = method_config_from_dict({"name": "noop-test", "note": "hello"})
        quantize(make_tiny_model("llama"), QuantizeConfig(method=config, bits="fp"))
        assert calls == ["hello"]
    finally:
        _METHODS.pop("noop-test")


def test_nested_method_config_round_trips():
    config = QuantizeConfig(method=QuaRotConfig(gptq=GPTQConfig(damp=0.05, act_order=False), weight_quantizer="rtn"))
    again = QuantizeConfig.from_dict(config.to_dict())
    assert again.method == config.method and again.to_dict() == config.to_dict()


def test_unknown_method_is_a_clear_error():
    with pytest.raises(AaqError, match="unknown method 'awq'"):
        method_config_from_dict({"name": "awq"})






