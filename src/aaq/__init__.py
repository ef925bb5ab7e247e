"""aaq: alignment-aware 4-bit quantization of safety-aligned LLMs.

The public API, imported lazily so that `aaq --help` does not pay for torch and transformers:

- `aaq.quantize(model, config, tokenizer=...)` -> QuantizeResult  (aaq.api)
- `aaq.save_quantized(result, tokenizer, out_dir)` / `aaq.load(path_or_name)`  (aaq.runs.checkpoint)
- `aaq.evaluate(model, tokenizer, EvalConfig(...), out_dir=...)` -> report dict  (aaq.eval.suite)
- `aaq.export(run_dir, out_dir, ExportConfig(format="aaq" | "compressed-tensors", scheme="W4A16" | "W4A4"))`
  -> ExportReport: packed int4 aaq folders, or compressed-tensors folders for transformers/vLLM  (aaq.exporting)
- `aaq.load_recipe(path)` -> QuantizeConfig  (aaq.recipes)
- `aaq.run_quantization(RunConfig(model=..., out=..., ...))`: load, quantize, save, evaluate, run.json  (aaq.workflows.run)
- `aaq.transform_plan(model)` -> TransformPlan: where every transform acts in a model  (aaq.models)
- `aaq.Placement(device=..., dtype=..., max_memory=...)`: where and in which dtype every stage runs  (aaq.runtime.devices)
- `aaq.audit(AuditConfig(original=..., quantized=[...], out=...))` -> AuditResult: did quantization cost a model its
  safety? Any quantized checkpoint against its original, paired by prompt, with a CI gate  (aaq.auditing)
- `aaq.plan_memory(source, config, placement)` -> MemoryPlan: each stage's estimated peak memory, from the config alone  (aaq.runtime.memory)
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "quantize": "aaq.api",
    "QuantizeConfig": "aaq.api",
    "CalibrationConfig": "aaq.api",
    "QuantizeResult": "aaq.api",
    "save_quantized": "aaq.runs.checkpoint",
    "load": "aaq.runs.checkpoint",
    "evaluate": "aaq.eval.suite",
    "EvalConfig": "aaq.eval.suite",
    "export": "aaq.exporting",
    "ExportConfig": "aaq.exporting",
    "QuantScheme": "aaq.quant.quantizers",
    "TransformConfig": "aaq.models.plan",
    "transform_plan": "aaq.models",
    "load_recipe": "aaq.recipes",
    "RunConfig": "aaq.workflows.run",
    "run_quantization": "aaq.workflows.run",
    "evaluate_source": "aaq.workflows.run",
    "QuantSpec": "aaq.quant.quantizers",
    "AaqError": "aaq.errors",
    "Placement": "aaq.runtime.devices",
    "plan_memory": "aaq.runtime.memory",
    "audit": "aaq.auditing",
    "AuditConfig": "aaq.auditing",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 (the lazily imported public names)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aaq' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
