"""QuaRot end to end: every family quantizes to a model near the full-precision one."""

import pytest

from aaq.methods import QuaRotConfig
from tests.helpers import quantized_logit_error


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_quarot_runs_for_every_family_and_stays_finite(family):
    error = quantized_logit_error(QuaRotConfig(), "w4a4kv4", family)
    assert 0 < error < 1
