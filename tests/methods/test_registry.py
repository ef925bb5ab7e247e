"""Methods end to end on tiny models: GPTQ beats RTN, QuaRot beats RTN at W4A4, the registry is open."""

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

import aaq
from aaq.api import QuantizeConfig, quantize
from aaq.calibration.loop import CalibrationSettings
from aaq.errors import AaqError
from aaq.methods import (
    AAQConfig,
    GPTQConfig,
    MethodConfig,
    MethodResult,
    OSTQuantConfig,
    QuaRotConfig,
    RTNConfig,
    method_config_from_dict,
    method_names,
    register_method,
)
from aaq.methods.registry import _METHODS
from aaq.quant.quantizers import QuantScheme, SchemeOptions
from tests.helpers import make_tiny_model


def test_methods_needing_data_say_so():
    model = make_tiny_model("llama")
    with pytest.raises(AaqError, match="needs calibration data"):
        quantize(model, QuantizeConfig(method=GPTQConfig(), bits="w4a16"))


def test_a_new_method_is_a_config_and_one_function():
    @dataclass
    class NoOpConfig(MethodConfig):
        name: ClassVar[str] = "noop-test"
        note: str = "x"

    calls = []
    register_method(NoOpConfig)(lambda context: calls.append(context.method.note) or MethodResult())
    try:
        assert "noop-test" in method_names()
        config = method_config_from_dict({"name": "noop-test", "note": "hello"})
        quantize(make_tiny_model("llama"), QuantizeConfig(method=config, bits="fp"))
        assert calls == ["hello"]
    finally:
        _METHODS.pop("noop-test")


def test_nested_method_config_round_trips():
    config = QuantizeConfig(method=QuaRotConfig(gptq=GPTQConfig(damp=0.05, act_order=False), weight_quantizer="rtn"))
    again = QuantizeConfig.from_dict(config.to_dict())
    assert again.method == config.method and again.to_dict() == config.to_dict()


def test_unknown_method_is_a_clear_error():
    with pytest.raises(AaqError, match="unknown method 'awq'"):
        method_config_from_dict({"name": "awq"})








@pytest.mark.parametrize(
    ("method", "bits", "stages", "folders"),
    [
        (RTNConfig(), "w4a4kv4", ("rtn",), ()),
        (RTNConfig(), "w16a4kv4", (), ()),
        (GPTQConfig(), "w4a16", ("gptq",), ("gptq_progress",)),
        (QuaRotConfig(), "w4a4kv4", ("fusion", "gptq"), ("gptq_progress",)),
        (QuaRotConfig(weight_quantizer="rtn"), "w4a4kv4", ("fusion", "rtn"), ()),
        (OSTQuantConfig(), "w4a4kv4", ("teachers", "calibration", "fusion", "gptq"), ("teacher_cache", "calibration", "gptq_progress")),
        (AAQConfig(training=CalibrationSettings(cache=False)), "w16a4kv4", ("teachers", "calibration", "fusion"), ("calibration", "gptq_progress")),
    ],
)
def test_a_method_says_which_stages_it_runs_and_which_work_folders_it_keeps(method, bits, stages, folders):
    assert method.stages(QuantScheme.from_string(bits)) == stages
    assert method.work_folders() == folders
    learns = "calibration" in stages
    assert (method.calibration_settings() is not None) == learns == (method.learned_transforms() is not None)


def test_a_method_says_whether_its_runs_can_be_exported():
    grouped, per_channel = QuantScheme.from_string("w4a16").with_options(SchemeOptions(weight_group_size=32)), QuantScheme.from_string("w4a16")
    blocked = QuaRotConfig().export_blocker(grouped)
    assert blocked is not None and blocked.setting == "static_groups"
    assert QuaRotConfig(gptq=GPTQConfig(static_groups=True)).export_blocker(grouped) is None
    assert QuaRotConfig().export_blocker(per_channel) is None
    assert QuaRotConfig(weight_quantizer="rtn").export_blocker(grouped) is None
    assert OSTQuantConfig().export_blocker(grouped) is not None and RTNConfig().export_blocker(grouped) is None


def test_calibration_settings_change_through_the_method():
    changed = OSTQuantConfig().with_calibration_settings(batch_size=1, activation_checkpointing=True)
    assert (changed.training.batch_size, changed.training.activation_checkpointing) == (1, True)
    assert QuaRotConfig().with_calibration_settings(batch_size=1) == QuaRotConfig()


def test_importing_export_loads_no_method_module():
    """Export reads the run record; it needs no method's code (a fresh interpreter, so nothing was imported before)."""
    code = "import sys, aaq.exporting, aaq.exporting.compressed; print(sorted(m for m in sys.modules if m.startswith('aaq.methods')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    assert result.stdout.strip() == "[]"


def _module_imports(path: Path, modules: set[str]) -> set[str]:
    """The aaq modules a module imports when it is loaded (top-level statements; not under TYPE_CHECKING or inside functions).

    `from aaq.pkg import mod` imports the submodule; the package itself is then being (or already) initialised.
    """
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aaq"):
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names if alias.name.startswith("aaq")}
    return names


def test_no_module_imports_itself_back():
    """The import graph of src/aaq (module-level imports) has no cycle."""
    root = Path(aaq.__file__).parent
    modules = {".".join(("aaq", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): path for path in root.rglob("*.py")}
    graph = {name: {m for m in _module_imports(path, set(modules)) if m in modules and not name.startswith(m)} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join((*trail, name))
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, (*trail, name))
        state[name] = "done"

    for name in sorted(graph):
        visit(name, ())
