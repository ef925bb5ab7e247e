"""Recipes: a quantization config written as YAML, and the options a front end layers on top of one.

A recipe has the keys of `QuantizeConfig.to_dict` (`version`, `method`, `bits`, `scheme`,
`calibration`, `seed`), each optional: what it leaves out takes the default. `version` is the config
version this aaq reads (`aaq.api.CONFIG_VERSION`); a recipe without one is read as that version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aaq.api import QuantizeConfig
from aaq.errors import AaqError
from aaq.methods import MethodOptions, method_config_class
from aaq.quant.quantizers import SchemeOptions


def load_recipe(path: str | Path) -> QuantizeConfig:
    """The quantization config a YAML recipe describes."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AaqError(f"recipe {path} does not exist; pass an existing YAML file") from None
    except IsADirectoryError:
        raise AaqError(f"recipe {path} is a folder; pass a YAML file") from None
    except UnicodeDecodeError:
        raise AaqError(f"recipe {path} is not a text file (not UTF-8); pass a YAML file") from None
    except OSError as err:
        raise AaqError(f"recipe {path} cannot be read ({err.strerror}); pass a readable YAML file") from None
    except yaml.YAMLError as err:
        raise AaqError(f"recipe {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AaqError(f"recipe {path} must be a YAML mapping with keys such as method, bits, calibration, seed")
    return QuantizeConfig.from_dict(data)


@dataclass(frozen=True)
class QuantizeOptions:
    """What a front end may change on top of a recipe (or the defaults); None and empty options keep the recipe's values.

    `method` may only name the recipe's own method: switching methods would drop the recipe's method
    settings. `calibration` holds `CalibrationConfig` fields (dataset, n_samples, seq_len, batch_size).
    """

    method: str | None = None
    bits: str | None = None
    seed: int | None = None
    method_options: MethodOptions = field(default_factory=MethodOptions)
    scheme_options: SchemeOptions = field(default_factory=SchemeOptions)
    calibration: dict[str, object] = field(default_factory=dict)


def configure(options: QuantizeOptions, recipe: QuantizeConfig | None = None) -> QuantizeConfig:
    """`recipe` (default: the default config of `options.method`) with `options` applied."""
    if recipe is None:
        recipe = QuantizeConfig() if options.method is None else QuantizeConfig(method=method_config_class(options.method)())
    elif options.method is not None and options.method != recipe.method.name:
        raise AaqError(
            f"the recipe is for method {recipe.method.name}, not {options.method}; use a recipe for {options.method} or drop {{setting}}",
            setting="method",
        )
    config = QuantizeConfig(
        method=recipe.method.with_options(options.method_options),
        bits=recipe.bits if options.bits is None else options.bits,
        scheme=None if options.bits is not None else recipe.scheme,
        calibration=dataclasses.replace(recipe.calibration, **options.calibration),
        seed=recipe.seed if options.seed is None else options.seed,
    )
    scheme = config.resolved_scheme().with_options(options.scheme_options)
    if scheme != config.resolved_scheme():
        config.scheme = scheme
    return config
