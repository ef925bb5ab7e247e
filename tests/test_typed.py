"""Config dataclasses from dicts: values of the wrong type are one-line errors naming the key; numbers written as text are numbers."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from aaq.errors import AaqError
from aaq.typed import checked_value, dataclass_from_dict


@dataclass
class Inner:
    lr: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    steps: int = 1
    name_of_run: str = "x"
    flag: bool = False
    clip: float | None = None
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"steps": "16"}, r"outer.steps must be an integer, got '16' \(str\)"),
        ({"steps": True}, "outer.steps must be an integer, got True"),
        ({"steps": 16.0}, "outer.steps must be an integer"),
        ({"name_of_run": 4}, "outer.name_of_run must be a string, got 4"),
        ({"flag": "yes"}, "outer.flag must be true or false"),
        ({"inner": {"lr": [0.9]}}, r"outer.inner.lr must be a number, got \[0.9\]"),
        ({"inner": {"lr": "fast"}}, "outer.inner.lr must be a number, got 'fast'"),
        ({"inner": {"mode": "c"}}, "outer.inner.mode must be one of a, b"),
        ({"inner": 3}, "outer.inner must be a mapping"),
        ({"clip": "none"}, "outer.clip must be a number"),
        ({"stepz": 1}, r"unknown setting\(s\) stepz in outer"),
    ],
)
def test_wrong_types_are_one_line_errors_naming_the_key(data, needle):
    with pytest.raises(AaqError, match=needle):
        dataclass_from_dict(Outer, data, "outer")


def test_numbers_written_as_text_or_integers_become_floats():
    built = dataclass_from_dict(Outer, {"inner": {"lr": "1e-3"}, "clip": 1, "steps": 3}, "outer")
    assert built.inner.lr == 0.001 and isinstance(built.clip, float) and built.clip == 1.0 and built.steps == 3
    assert dataclass_from_dict(Outer, {"clip": None}, "outer").clip is None


def test_annotations_it_does_not_know_pass_through():
    assert checked_value({"a": 1}, dict[str, int], "k") == {"a": 1}
