"""The runs the CLI and the demo make, as library calls.

`run_quantization`: load -> quantize -> save the run folder -> evaluate -> write `run.json` (the
config, seed, metrics, timings, library versions and git commit). `evaluate_source`: evaluate a
model, a model with a LoRA adapter, or an aaq run folder, and write its report.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.api import QuantizeConfig, QuantizeResult, load_reference, quantize
from aaq.checkpoint import is_quantized_folder, load_quantized, save_quantized
from aaq.devices import Placement, StageMeter, dispatched, placement_of, tf32_matmuls
from aaq.errors import AaqError
from aaq.eval.refusal import Judge, ModelJudge
from aaq.eval.suite import EvalConfig, evaluate
from aaq.loading import ModelSource, load_model
from aaq.runs import provenance, write_json

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"


@dataclass
class RunConfig:
    """One quantization run.

    `model`: a local folder, `.gguf` file, hub id or alias; `out`: the run folder. `placement`:
    device, dtype and memory budgets of every stage (the reference is loaded the same way).
    `reference`: the unaligned model of a method with a push term, loaded only while its teacher
    targets are computed. `evaluation`: what to evaluate on the quantized model (None: nothing).
    `save_model`: write the quantized weights, so that `aaq eval` and `aaq export` can read the
    folder. `resume`: continue a killed run in `out`; `overwrite`: replace a finished run there.
    `command`: how the run was started, for the record.
    """

    model: str
    out: Path
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    placement: Placement = field(default_factory=Placement)
    reference: str | None = None
    evaluation: EvalConfig | None = None
    save_model: bool = True
    resume: bool = False
    overwrite: bool = False
    command: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        needs = self.quantize.method.needs_reference()
        if needs and self.reference is None:
            raise AaqError(f"method {self.quantize.method.name} needs the unaligned reference model; pass one ({{setting}})", setting="reference")
        if not needs and self.reference is not None:
            raise AaqError(f"{{setting}} has no effect with method {self.quantize.method.name} (its loss has no push term); drop it", setting="reference")


@dataclass
class RunResult:
    """The record written to `run.json` and the evaluation report (None when nothing was evaluated)."""

    record: dict[str, Any]
    report: dict[str, Any] | None


def prepare_run_folder(out: Path, overwrite: bool) -> None:
    """Refuse to replace a finished run unless `overwrite`; with it, remove the old folder."""
    if (out / RUN_RECORD).exists() and not overwrite:
        raise AaqError(f"{out} already holds a finished run; choose another folder or replace it ({{setting}})", setting="overwrite")
    if out.exists() and overwrite:
        shutil.rmtree(out)


def load_judge(name: str | None, placement: Placement | None = None) -> Judge | None:
    """The judge model `name` (a path or alias) ready to give verdicts, or None for the refusal-phrase detector."""
    if not name:
        return None
    model, tokenizer = load_model(name, placement)
    return ModelJudge(model, tokenizer)


def run_quantization(
    config: RunConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: torch.Tensor | None = None,
) -> RunResult:
    """Quantize `config.model`, save the run folder, evaluate it and write `run.json`.

    `model`/`tokenizer`: an already loaded copy of `config.model` to quantize in place (else it is
    loaded here); `calibration`: token ids to calibrate on instead of those the config describes.
    """
    prepare_run_folder(config.out, config.overwrite)
    placement = config.placement
    meter = StageMeter(placement.compute_device)
    with tf32_matmuls(placement.tf32):
        if model is None:
            with meter.stage("load"):
                model, tokenizer = load_model(config.model, placement)
        result = quantize(
            model,
            config.quantize,
            tokenizer=tokenizer,
            calibration=calibration,
            reference=None if config.reference is None else partial(load_reference, config.reference, model, tokenizer, placement),
            run_dir=config.out,
            resume=config.resume,
            placement=placement,
        )
        meter.records |= result.stages
        report = _evaluate_run(config, result, tokenizer, meter)
    record = {
        "status": "complete",
        "command": config.command,
        "model": config.model,
        "reference": config.reference,
        "method": config.quantize.method.name,
        "bits": config.quantize.bits,
        "seed": config.quantize.seed,
        "config": config.quantize.to_dict(),
        "placement": asdict(config.placement),
        "metrics": {} if report is None else {k: v for k, v in report["metrics"].items() if v is not None},
        "timings": {f"{name}_s": record.seconds for name, record in meter.records.items()},
        "stages": meter.to_dict(),
        **provenance(),
    }
    write_json(config.out / RUN_RECORD, record)
    return RunResult(record=record, report=report)


def _evaluate_run(config: RunConfig, result: QuantizeResult, tokenizer: PreTrainedTokenizerBase, meter: StageMeter) -> dict[str, Any] | None:
    """Save the run's model (when asked) and evaluate it (when asked), as measured stages."""
    if config.save_model:
        with meter.stage("save"):
            save_quantized(result, tokenizer, config.out, source=config.model)
    if config.evaluation is None:
        return None
    meta = {"model": config.model, "method": config.quantize.method.name, "bits": config.quantize.bits}
    meta |= {"reference": config.reference, "quantize_s": round(result.stages["quantize"].seconds, 1)}
    judge = load_judge(config.evaluation.judge, config.placement)
    with meter.stage("eval"), dispatched(result.model, config.placement):
        return evaluate(result.model, tokenizer, config.evaluation, config.out, meta=meta, judge=judge)


def evaluate_source(
    source: str, config: EvalConfig, out: Path | None, adapter: str | None = None, placement: Placement | None = None
) -> dict[str, Any]:
    """Evaluate a model (path, `.gguf`, hub id or alias; with an optional LoRA `adapter`) or an aaq run folder.

    `placement`: device, dtype and memory budgets (default: the default device; a run folder in its
    saved dtype). Writes report.json, report.md and generations.jsonl to `out` (when given); returns
    the report.
    """
    if is_quantized_folder(source):
        if adapter:
            raise AaqError("{setting} applies to full-precision models; merge the adapter before quantizing instead", setting="adapter")
        model, tokenizer, info = load_quantized(source, placement=placement)
        meta = {"method": info["quantize"]["method"]["name"], "bits": info["quantize"]["bits"]}
    else:
        model, tokenizer = load_model(ModelSource(source, adapter=adapter), placement)
        meta = {"method": "fp", "bits": "fp", "adapter": adapter}
    placement = placement or placement_of(model)
    with tf32_matmuls(placement.tf32), dispatched(model, placement):
        return evaluate(model, tokenizer, config, out, meta={"model": source, **meta}, judge=load_judge(config.judge, placement))
