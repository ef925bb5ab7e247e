"""The public API is importable from the package root, lazily."""

import pytest

import aaq


@pytest.mark.parametrize("name", aaq.__all__)
def test_every_public_name_resolves(name):
    assert getattr(aaq, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'quantise'"):
        aaq.quantise  # noqa: B018
