"""Recipes: the shipped ones load and round-trip; options layer on top of them or refuse to."""

import json
from pathlib import Path

import pytest
import yaml

from aaq.api import QuantizeConfig
from aaq.cli import build_parser
from aaq.cli.config import quantize_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes"



@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_load_and_round_trip(recipe, tmp_path):
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", str(tmp_path), "--recipe", str(recipe)])
    config = quantize_config(args)
    data = yaml.safe_load(recipe.read_text())
    assert config.method.name == data["method"]["name"]
    assert config.method.training.steps == data["method"]["training"]["steps"]
    assert config.method.training.loss.name == data["method"]["training"]["loss"]["name"]
    assert config.calibration.n_samples == data["calibration"]["n_samples"]
    again = QuantizeConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.method == config.method and again.to_dict() == config.to_dict()


def _recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_a_recipe_names_only_what_it_changes(tmp_path):
    from aaq.recipes import load_recipe

    config = load_recipe(_recipe(tmp_path, "version: 2\nmethod: ostquant\nseed: 4\n"))
    assert config.method.name == "ostquant" and config.seed == 4 and config.bits == "w4a4kv4"
    assert config.method.transforms.smoothing and config.method.training.steps == 150


@pytest.mark.parametrize(
    ("text", "needle"),
    [("version: 1\n", "config version 1 is not supported"), ("- a\n- b\n", "must be a YAML mapping"), ("method: [\n", "not valid YAML")],
)
def test_bad_recipes_are_one_line_errors(tmp_path, text, needle):
    from aaq.errors import AaqError
    from aaq.recipes import load_recipe

    with pytest.raises(AaqError, match=needle):
        load_recipe(_recipe(tmp_path, text))


def test_options_change_only_what_they_name():
    from aaq.methods import MethodOptions
    from aaq.quant.quantizers import SchemeOptions
    from aaq.recipes import QuantizeOptions, configure, load_recipe

    recipe = load_recipe(RECIPES / "aaq_demo.yaml")
    options = QuantizeOptions(
        seed=3, method_options=MethodOptions(steps=2, lam=0.5, transforms={"r4": False}), scheme_options=SchemeOptions(kv_clip=0.9), calibration={"n_samples": 4}
    )
    config = configure(options, recipe)
    assert (config.seed, config.method.training.steps, config.method.training.loss.lam) == (3, 2, 0.5)
    assert config.method.transforms.r4 is False and config.method.training.rotation_lr == recipe.method.training.rotation_lr
    assert config.resolved_scheme().kv_cache.clip_ratio == 0.9 and config.calibration.n_samples == 4
    assert config.calibration.seq_len == recipe.calibration.seq_len


def test_another_method_than_the_recipes_is_refused_not_silently_reset():
    from aaq.errors import AaqError
    from aaq.recipes import QuantizeOptions, configure, load_recipe

    with pytest.raises(AaqError, match="the recipe is for method ostquant, not aaq") as info:
        configure(QuantizeOptions(method="aaq"), load_recipe(RECIPES / "ostquant_demo.yaml"))
    assert info.value.setting == "method"


def test_without_a_recipe_the_method_starts_from_its_defaults():
    from aaq.recipes import QuantizeOptions, configure

    assert configure(QuantizeOptions()).method.name == "quarot"
    config = configure(QuantizeOptions(method="gptq", bits="w4a16"))
    assert config.method.name == "gptq" and config.resolved_scheme().activations is None
