"""Whether the hub can be used is decided at once: offline mode from the environment, otherwise one quick request."""

import pytest

from aaq.runtime import hub


@pytest.mark.parametrize("variable", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
def test_offline_mode_is_read_from_the_environment_without_a_request(monkeypatch, variable):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, "1")
    monkeypatch.setattr("huggingface_hub.get_session", lambda: pytest.fail("the hub was asked"))
    assert hub.unavailable_reason() == f"{variable} is set"


def test_a_hub_that_does_not_answer_is_unavailable_and_one_that_answers_is_not(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    timeouts = []

    class Session:
        def __init__(self, error):
            self.error = error

        def head(self, url, timeout):
            timeouts.append(timeout)
            if self.error:
                raise OSError("Name or service not known")

    monkeypatch.setattr("huggingface_hub.get_session", lambda: Session(error=True))
    assert hub.unavailable_reason().endswith("did not answer: Name or service not known")
    monkeypatch.setattr("huggingface_hub.get_session", lambda: Session(error=False))
    assert hub.unavailable_reason() is None
    assert timeouts == [hub.PROBE_TIMEOUT_S] * 2
