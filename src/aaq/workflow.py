"""The runs the CLI and the demo make, as library calls.

`run_quantization`: load -> quantize -> save the run folder -> evaluate -> write `run.json` (the
config, seed, metrics, timings, library versions and git commit). `evaluate_source`: evaluate a
model, a model with a LoRA adapter, or an aaq run folder, and write its report.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.api import QuantizeConfig, load_reference, quantize
from aaq.checkpoint import is_quantized_folder, load_quantized, save_quantized
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

    `model`: a local folder, `.gguf` file, hub id or alias; `out`: the run folder. `reference`: the
    unaligned model of a method with a push term. `evaluation`: what to evaluate on the quantized
    model (None: nothing). `save_model`: write the quantized weights, so that `aaq eval` and
    `aaq export` can read the folder. `resume`: continue a killed run in `out`; `overwrite`: replace
    a finished run there. `command`: how the run was started, for the record.
    """

    model: str
    out: Path
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
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


def load_judge(name: str | None) -> Judge | None:
    """The judge model `name` (a path or alias) ready to give verdicts, or None for the refusal-phrase detector."""
    if not name:
        return None
    model, tokenizer = load_model(name)
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
    timings: dict[str, float] = {}
    if model is None:
        start = time.perf_counter()
        model, tokenizer = load_model(config.model)
        timings["load_s"] = time.perf_counter() - start
    # Loaded inline so that no local name keeps the reference alive once the method has cached its targets.
    result = quantize(
        model,
        config.quantize,
        tokenizer=tokenizer,
        calibration=calibration,
        reference=None if config.reference is None else load_reference(config.reference, model, tokenizer),
        run_dir=config.out,
        resume=config.resume,
    )
    timings.update(result.timings)
    if config.save_model:
        start = time.perf_counter()
        save_quantized(result, tokenizer, config.out, source=config.model)
        timings["save_s"] = time.perf_counter() - start
    report = None
    if config.evaluation is not None:
        meta = {"model": config.model, "method": config.quantize.method.name, "bits": config.quantize.bits}
        meta |= {"reference": config.reference, "quantize_s": round(result.timings["quantize_s"], 1)}
        report = evaluate(model, tokenizer, config.evaluation, config.out, meta=meta, judge=load_judge(config.evaluation.judge))
        timings["eval_s"] = sum(report["seconds"].values())
    record = {
        "status": "complete",
        "command": config.command,
        "model": config.model,
        "reference": config.reference,
        "method": config.quantize.method.name,
        "bits": config.quantize.bits,
        "seed": config.quantize.seed,
        "config": config.quantize.to_dict(),
        "metrics": {} if report is None else {k: v for k, v in report["metrics"].items() if v is not None},
        "timings": timings,
        **provenance(),
    }
    write_json(config.out / RUN_RECORD, record)
    return RunResult(record=record, report=report)


def evaluate_source(source: str, config: EvalConfig, out: Path | None, adapter: str | None = None) -> dict[str, Any]:
    """Evaluate a model (path, `.gguf`, hub id or alias; with an optional LoRA `adapter`) or an aaq run folder.

    Writes report.json, report.md and generations.jsonl to `out` (when given); returns the report.
    """
    if is_quantized_folder(source):
        if adapter:
            raise AaqError("{setting} applies to full-precision models; merge the adapter before quantizing instead", setting="adapter")
        model, tokenizer, info = load_quantized(source)
        meta = {"method": info["quantize"]["method"]["name"], "bits": info["quantize"]["bits"]}
    else:
        model, tokenizer = load_model(ModelSource(source, adapter=adapter))
        meta = {"method": "fp", "bits": "fp", "adapter": adapter}
    return evaluate(model, tokenizer, config, out, meta={"model": source, **meta}, judge=load_judge(config.judge))
