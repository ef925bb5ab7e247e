"""Config dataclasses from plain dicts (YAML recipes, saved JSON), every value checked against its type hint.

One place decides what a recipe value may be, from the dataclass's own annotations: `steps: "16"`
or `seed: zero` is a one-line error naming the key, while `rotation_lr: 1e-3` (which YAML 1.1
reads as the text "1e-3") is read as the number it is meant to be.
"""

from __future__ import annotations

import types
from dataclasses import Field, fields, is_dataclass
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from aaq.errors import AaqError

_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def dataclass_from_dict(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from its `asdict` form, nested dataclasses rebuilt at any depth.

    `where` names the mapping in error messages (e.g. "method", "calibration"). A `name` key is
    allowed and ignored (it tags method settings).
    """
    if not isinstance(data, dict):
        raise AaqError(f"{where} must be a mapping of settings, got {data!r}; correct it in the recipe")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known - {"name"})
    if unknown:
        raise AaqError(f"unknown setting(s) {', '.join(map(str, unknown))} in {where}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name in data and f.init:
            kwargs[f.name] = checked_value(data[f.name], _field_type(f, hints), f"{where}.{f.name}")
    return cls(**kwargs)


def checked_value(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` describes (a number written as text becomes a float), or AaqError naming `key`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return _union_value(value, get_args(hint), key)
    if origin is Literal:
        choices = get_args(hint)
        if value in choices and type(value) in {type(choice) for choice in choices}:
            return value
        raise _type_error(key, "one of " + ", ".join(map(str, choices)), value)
    if isinstance(hint, type) and is_dataclass(hint):
        return dataclass_from_dict(hint, value, key)
    if hint not in _NAMES:  # containers and other annotations: the dataclass checks them itself
        return value
    converted = _scalar(value, hint)
    if converted is None:
        raise _type_error(key, _NAMES[hint], value)
    return converted


def _scalar(value: Any, hint: type) -> Any:
    """`value` as a bool, int, float or str, or None when it is not one."""
    if hint is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        except ValueError:
            return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is an int to Python, never to a recipe: `steps: true` is a mistake.
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    return None


def _union_value(value: Any, options: tuple, key: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return checked_value(value, option, key)
        except AaqError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    expected = " or ".join(_NAMES.get(o, getattr(o, "__name__", str(o))) for o in options if o is not type(None))
    raise _type_error(key, expected + (" (or null)" if type(None) in options else ""), value)


def _type_error(key: str, expected: str, value: Any) -> AaqError:
    return AaqError(f"{key} must be {expected}, got {value!r} ({type(value).__name__}); correct it in the recipe")


def _field_type(f: Field, hints: dict[str, Any]) -> Any:
    """The annotation of field `f`; for an annotation that is no dataclass, the dataclass its default factory makes, if any."""
    hint = hints.get(f.name, Any)
    if not (isinstance(hint, type) and is_dataclass(hint)) and callable(f.default_factory):
        made = f.default_factory()
        if is_dataclass(made):
            return type(made)
    return hint
