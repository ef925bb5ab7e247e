"""The one exception type users see: a one-line message naming the problem and the fix."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

SETTING = "{setting}"


def python_name(setting: str) -> str:
    """How a library message names a setting: as the Python argument or config field."""
    return f"`{setting}`"


_SETTING_NAMES: ContextVar[Callable[[str], str]] = ContextVar("setting_names", default=python_name)


@contextlib.contextmanager
def settings_named_by(name_of: Callable[[str], str]) -> Iterator[None]:
    """Within the block, every message names its settings with `name_of` (a front end's own options, e.g. the CLI's flags)."""
    token = _SETTING_NAMES.set(name_of)
    try:
        yield
    finally:
        _SETTING_NAMES.reset(token)


class AaqError(Exception):
    """A user-facing error; the CLI prints its message on one line and exits with status 2.

    When the fix is to change a setting, `setting` names it (a config field or argument such as
    "reference" or "r4") and the message says `{setting}` where its name goes: the library shows the
    Python name, and a front end such as the CLI shows its own option for it (`render`).
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        self.template = message
        self.setting = setting
        super().__init__(self.render())

    def render(self, name_of: Callable[[str], str] | None = None) -> str:
        """The message with the setting named by `name_of` (default: as the front end in use names it, see `settings_named_by`)."""
        if self.setting is None:
            return self.template
        return self.template.replace(SETTING, (name_of or _SETTING_NAMES.get())(self.setting))
