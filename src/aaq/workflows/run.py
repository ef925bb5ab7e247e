"""The runs the CLI and the demo make, as library calls.

`run_quantization`: check everything that can be checked -> load -> quantize -> save the run
folder -> evaluate -> write `run.json` (the config, seed, metrics, timings, library versions and git
commit); an attempt that stops on an error writes `failed.json` (the error and the stage) instead,
and the next attempt removes it before it starts. `evaluate_source`: evaluate a model, a model with
a LoRA adapter, or an aaq run folder, and write its report (an error when its perplexity is not finite).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.api import QuantizeConfig, QuantizeResult, check_reference_source, load_reference, quantize
from aaq.data.corpus import corpus_documents
from aaq.errors import AaqError
from aaq.eval.coherence import CoherenceScorer
from aaq.eval.refusal import Judge, ModelJudge
from aaq.eval.suite import EvalConfig, EvalInputs, evaluate, prepare_inputs
from aaq.models.loading import ModelSource, load_model
from aaq.quant.fake_quant import release_weights
from aaq.runs.checkpoint import FAILED_RECORD, is_run_folder, load_quantized, save_quantized, saved_weight_bytes
from aaq.runs.folders import check_free_space, check_output_folder, folder_bytes, prepare_output_folder, remove_file
from aaq.runs.records import provenance, write_json
from aaq.runtime import distributed
from aaq.runtime.devices import Placement, StageMeter, dispatched, placement_of, tf32_matmuls

logger = logging.getLogger(__name__)

RUN_RECORD = "run.json"
# A generous bound of a saved tokenizer's size per vocabulary entry (SmolLM2's tokenizer.json: 3.5 MB for 49152, 72 bytes each).
TOKENIZER_BYTES_PER_ENTRY = 128


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
        if self.resume and self.overwrite:
            raise AaqError("{setting} starts the run afresh, which contradicts resuming it; drop one of the two", setting="overwrite")


@dataclass
class RunResult:
    """The record written to `run.json` and the evaluation report (None when nothing was evaluated); both empty on processes other than 0."""

    record: dict[str, Any]
    report: dict[str, Any] | None


def check_run_folder(out: Path, overwrite: bool) -> None:
    """Raise AaqError unless `out` can take a run: new, empty, or aaq's, and a finished run only with `overwrite`; changes nothing."""
    check_output_folder(out, "run", overwrite=overwrite)
    if (out / RUN_RECORD).exists() and not overwrite:
        raise AaqError(f"{out} already holds a finished run; choose another folder or replace it ({{setting}})", setting="overwrite")


def prepare_run_folder(out: Path, overwrite: bool) -> None:
    """Make `out` this attempt's run folder after `check_run_folder`; `overwrite` removes what aaq wrote there before (and logs it).

    Foreign files are an error either way, and so is a file aaq wrote that changed since (`aaq.runs.folders`);
    temporary files of a killed run and the `failed.json` of an earlier attempt are removed.
    """
    check_run_folder(out, overwrite)
    removed = prepare_output_folder(out, "run", overwrite=overwrite)
    if removed:
        logger.info("replacing the aaq output in %s: removed %s", out, ", ".join(removed))
    remove_file(out / FAILED_RECORD)


def planned_run_bytes(config: RunConfig, model: PreTrainedModel, calibration: torch.Tensor | None) -> dict[str, int]:
    """The disk space a run takes at its peak, by what it is for: the teacher cache (exact), the weights and the tokenizer (estimated).

    The weights are what the run folder stores (`saved_weight_bytes`: packed codes and the other
    tensors); the GPTQ progress holds only the codes and is removed before the save, so it counts
    only in a run that saves no model.
    """
    method, scheme = config.quantize.method, config.quantize.resolved_scheme()
    steps = method.stages(scheme)
    codes, rest = saved_weight_bytes(model, scheme, fuses_norms="fusion" in steps)
    shape = calibration.shape if calibration is not None else (config.quantize.calibration.n_samples, config.quantize.calibration.seq_len)
    vocab_size = model.config.get_text_config().vocab_size
    return {
        "teacher cache": method.teacher_cache_bytes(*shape, vocab_size),
        "weights": codes + rest if config.save_model else codes if "gptq" in steps else 0,
        "tokenizer": TOKENIZER_BYTES_PER_ENTRY * vocab_size if config.save_model else 0,
    }


@dataclass
class _Progress:
    """The stage a run has reached, for `failed.json`."""

    stage: str = "quantize"


def load_judge(name: str | None, placement: Placement | None = None) -> Judge | None:
    """The judge model `name` (a path or alias) ready to give verdicts, or None for the refusal-phrase detector."""
    if not name:
        return None
    model, tokenizer = load_model(name, placement)
    return ModelJudge(model, tokenizer)


def load_scorer(config: EvalConfig, source: str | None, placement: Placement | None = None) -> CoherenceScorer | None:
    """The full-precision scorer of the garbled check: `config.scorer`, else `source` (the model a run was made from).

    None when the check is off or neither is given (an unquantized evaluated model then scores itself).
    """
    name = config.scorer or source
    if not config.checks_coherence or name is None:
        return None
    try:
        model, tokenizer = load_model(name, placement)
    except AaqError as error:
        raise AaqError(f"cannot load the scorer {name!r} ({error}); pass another full-precision model or none ({{setting}})", setting="scorer") from None
    return CoherenceScorer(model, tokenizer, name)


def scorer_after_release(
    config: EvalConfig, source: str | None, placement: Placement, model: PreTrainedModel, placed: ExitStack
) -> tuple[Callable[[], CoherenceScorer | None] | None, Callable[[], None] | None]:
    """The garbled check's scorer as a loader, and the function that frees the evaluated `model` before it runs.

    `evaluate` calls them once the model's answers are in, so the model and the full-precision scorer
    never take memory at the same time; `placed` holds the model's dispatch, undone first. (None, None)
    when no scorer is to be loaded (the check is off, or an unquantized model scores itself).
    """
    if not config.checks_coherence or not (config.scorer or source):
        return None, None

    def release() -> None:
        placed.close()
        release_weights(model)

    return partial(load_scorer, config, source, placement), release


def run_quantization(
    config: RunConfig,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: torch.Tensor | None = None,
    scorer: CoherenceScorer | None = None,
) -> RunResult:
    """Quantize `config.model`, save the run folder, evaluate it and write `run.json`.

    `model`/`tokenizer`: an already loaded copy of `config.model` to quantize in place (else it is
    loaded here); `calibration`: token ids to calibrate on instead of those the config describes;
    `scorer`: the full-precision scorer of the garbled check (default: `config.model` loaded again
    after quantization, unless the evaluation names another).
    The output folder, the evaluation's inputs, the calibration text, the reference's vocabulary
    and the free disk space are checked before the work. If the run stops on an error, the folder
    gets `failed.json` with the error and the stage, and the error is raised.

    Called on every process of an initialised `torch.distributed` process group (the CLI under
    `torchrun`), the processes share the quantization (`aaq.quantize`); process 0 alone writes the
    run folder and evaluates, and the others return an empty record once the model is quantized.
    """
    main = distributed.is_main_process()
    with distributed.agreed("the checks before the work"):
        config.placement.check_available()
        check_run_folder(config.out, config.overwrite)
        blocker = config.quantize.method.export_blocker(config.quantize.resolved_scheme())
        if blocker is not None and main:
            logger.warning("warning: %s", blocker)
        inputs = None if config.evaluation is None or not main else prepare_inputs(config.evaluation)
        if calibration is None and config.quantize.method.needs_calibration():
            corpus_documents(config.quantize.calibration.dataset, "calibration")
    meter = StageMeter(config.placement.compute_device)
    owned = model is None  # the run loads the model itself, so it may free it once evaluated
    with tf32_matmuls(config.placement.tf32):
        with distributed.agreed("the loading of the model"):
            if model is None:
                with meter.stage("load"):
                    model, tokenizer = load_model(config.model, config.placement)
            if config.reference is not None:
                check_reference_source(config.reference, model, tokenizer)
            check_free_space(config.out, planned_run_bytes(config, model, calibration), already=folder_bytes(config.out))
            if main:
                prepare_run_folder(config.out, config.overwrite)
        progress = _Progress()
        try:
            return _run(config, model, tokenizer, calibration, inputs, scorer, meter, progress, owned)
        except BaseException as error:
            if main:
                _record_failure(config, progress.stage, error)
            raise


def _run(
    config: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    calibration: torch.Tensor | None,
    inputs: EvalInputs | None,
    scorer: CoherenceScorer | None,
    meter: StageMeter,
    progress: _Progress,
    owned: bool,
) -> RunResult:
    """The work of `run_quantization` once everything is checked, with `progress` naming the current stage; `owned`: the run loaded the model."""
    result = quantize(
        model,
        config.quantize,
        tokenizer=tokenizer,
        calibration=calibration,
        reference=None if config.reference is None else partial(load_reference, config.reference, model, tokenizer, config.placement),
        run_dir=config.out,
        resume=config.resume,
        placement=config.placement,
    )
    meter.records |= result.stages
    if not distributed.is_main_process():
        return RunResult(record={}, report=None)
    report = _save_and_evaluate(config, result, tokenizer, inputs, scorer, meter, progress, owned)
    progress.stage = "record"
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
        "processes": distributed.world().size,
        "metrics": {} if report is None else {k: v for k, v in report["metrics"].items() if v is not None},
        "method_metrics": result.metrics,
        "timings": {f"{name}_s": record.seconds for name, record in meter.records.items()},
        "stages": meter.to_dict(),
        **provenance(),
    }
    write_json(config.out / RUN_RECORD, record)
    return RunResult(record=record, report=report)


def _save_and_evaluate(
    config: RunConfig,
    result: QuantizeResult,
    tokenizer: PreTrainedTokenizerBase,
    inputs: EvalInputs | None,
    scorer: CoherenceScorer | None,
    meter: StageMeter,
    progress: _Progress,
    owned: bool,
) -> dict[str, Any] | None:
    """Save the run's model (when asked) and evaluate it (when asked), as measured stages.

    Without a given `scorer`, a model the run loaded itself (`owned`) is freed once its answers are
    in and the full-precision scorer is loaded after it (`scorer_after_release`); a caller's model
    is left as it is, with the scorer loaded beside it.
    """
    if config.save_model:
        progress.stage = "save"
        with meter.stage("save"):
            save_quantized(result, tokenizer, config.out, source=config.model)
    if config.evaluation is None:
        return None
    progress.stage = "evaluate"
    meta = {"model": config.model, "method": config.quantize.method.name, "bits": config.quantize.bits}
    meta |= {"reference": config.reference, "quantize_s": round(result.stages["quantize"].seconds, 1)}
    judge = load_judge(config.evaluation.judge, config.placement)
    with meter.stage("eval"), ExitStack() as placed:
        placed.enter_context(dispatched(result.model, config.placement))
        release = None
        if scorer is None and owned:
            scorer, release = scorer_after_release(config.evaluation, config.model, config.placement, result.model, placed)
        scorer = scorer or load_scorer(config.evaluation, config.model, config.placement)
        return evaluate(result.model, tokenizer, config.evaluation, config.out, meta=meta, judge=judge, scorer=scorer, inputs=inputs, release_model=release)


def _record_failure(config: RunConfig, stage: str, error: BaseException) -> None:
    """Write `failed.json` (the error and the stage) into the run folder, if the disk still takes it."""
    if isinstance(error, AaqError):
        message = str(error)
    elif isinstance(error, KeyboardInterrupt):
        message = "interrupted"
    else:
        message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    record = {"status": "failed", "stage": stage, "error": message, "command": config.command, **provenance()}
    try:
        write_json(config.out / FAILED_RECORD, record)
    except AaqError as write_error:  # a full disk: the error itself still reaches the user
        logger.warning("could not record the failure in %s: %s", config.out, write_error)


def evaluate_source(
    source: str, config: EvalConfig, out: Path | None, adapter: str | None = None, placement: Placement | None = None
) -> dict[str, Any]:
    """Evaluate a model (path, `.gguf`, hub id or alias; with an optional LoRA `adapter`) or an aaq run folder.

    `placement`: device, dtype and memory budgets (default: the default device; a run folder in its
    saved dtype). Writes report.json, report.md and generations.jsonl to `out` (when given; new,
    empty, or an aaq evaluation or run folder); returns the report. The device, the output folder
    and the evaluation's inputs are checked before the model is loaded. A perplexity that is not
    finite (the model's outputs overflow, or are NaN) is an AaqError once the report is written.
    """
    (placement or Placement()).check_available()
    if out is not None:
        check_output_folder(out, "eval", joins=("run",))
    inputs = prepare_inputs(config)
    scorer_source = None
    if is_run_folder(source):
        if adapter:
            raise AaqError("{setting} applies to full-precision models; merge the adapter before quantizing instead", setting="adapter")
        model, tokenizer, info = load_quantized(source, placement=placement)
        meta = {"method": info["quantize"]["method"]["name"], "bits": info["quantize"]["bits"], "source_model": info.get("source_model")}
        scorer_source = info.get("source_model")
        if config.checks_coherence and not (config.scorer or scorer_source):
            raise AaqError(f"{source} does not record its source model; pass its full-precision model or none ({{setting}})", setting="scorer")
    else:
        model, tokenizer = load_model(ModelSource(source, adapter=adapter), placement)
        meta = {"method": "fp", "bits": "fp", "adapter": adapter}
    placement = placement or placement_of(model)
    judge = load_judge(config.judge, placement)
    with tf32_matmuls(placement.tf32), ExitStack() as placed:
        placed.enter_context(dispatched(model, placement))
        scorer, release = scorer_after_release(config, scorer_source, placement, model, placed)
        report = evaluate(model, tokenizer, config, out, meta={"model": source, **meta}, judge=judge, scorer=scorer, inputs=inputs, release_model=release)
    ppl = report["metrics"].get("ppl")
    if ppl is not None and not math.isfinite(ppl):
        where = "" if out is None else f" (report in {out})"
        raise AaqError(f"the perplexity of {source} is {ppl}: its outputs overflow or are NaN, a broken model or corrupt weights{where}")
    return report
