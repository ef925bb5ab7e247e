"""Whether the Hugging Face hub can be used right now, decided in well under a second.

Without this, a machine without network spends about a minute in the hub clients' retries before
a model or data set that is not cached fails; aaq asks first and fails (or stays local) at once.
"""

from __future__ import annotations

import os

# How long the reachability probe waits for the hub; a reachable hub answers in well under this.
PROBE_TIMEOUT_S = 5.0
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TRUE = ("1", "on", "yes", "true")


def offline_variable() -> str | None:
    """The environment variable that puts the hub libraries in offline mode, if one is set."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


def unavailable_reason() -> str | None:
    """Why the hub cannot be used (offline mode, or no answer to a quick request), or None when it can."""
    variable = offline_variable()
    if variable is not None:
        return f"{variable} is set"
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 (the HTTP client raises its own exception types for every network failure)
        return f"{constants.ENDPOINT} did not answer: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return None
