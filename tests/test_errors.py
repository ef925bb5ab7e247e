"""One-line errors name the setting at fault the way the caller knows it."""

from aaq.errors import AaqError


def test_the_library_names_python_settings_and_a_front_end_its_own():
    error = AaqError("method aaq needs a reference model; pass one ({setting})", setting="reference")
    assert str(error) == "method aaq needs a reference model; pass one (`reference`)"
    assert error.render(lambda name: f"--{name}") == "method aaq needs a reference model; pass one (--reference)"


def test_an_error_without_a_setting_is_its_message():
    error = AaqError("a {setting}-free message")
    assert str(error) == error.render(lambda name: "never") == "a {setting}-free message"
