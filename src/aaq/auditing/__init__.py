"""`aaq audit`: did quantization cost this model its safety? Any quantized checkpoint against its original, paired by prompt.

`audit(AuditConfig(original=FP, quantized=[Q, ...], out=DIR))` loads the full-precision original once (the
reference of every comparison and the scorer of the garbled check), then one quantized model at a time (GGUF,
compressed-tensors, aaq runs and exports, transformers-quantized folders, other full-precision models:
`aaq.auditing.sources`), and asks each the same prompts with the same generation settings as the original: the
harmful and benign prompt sets of `aaq eval`, answered and judged by the evaluation suite's own code. Per
quantized model it reports, paired by prompt (`aaq.auditing.pairing`, `aaq.auditing.stats`): the shares of
refused, complied, garbled and refused-but-garbled answers to harmful prompts and of compliant, refused and
garbled answers to benign ones, each with its change against the original and a 95% interval, McNemar's exact
test, the flips prompt by prompt, the perplexity ratio on held-out text, and the fast signal
(`aaq.auditing.signal`): KL(original || quantized) at the first answer token, which needs no generation and is
all `signal_only` computes. Limits (`aaq.auditing.gate`) turn it into a CI gate.

The output folder (an aaq folder of kind "audit") holds audit.json (everything), audit.md (the tables and the
flips), audit.png (verdict shares per model and the verdict of every prompt) and pairs.jsonl (every prompt with
both answers and both verdicts). audit.json is rewritten after each quantized model, so an interrupted audit
keeps the models it finished.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aaq.auditing.gate import SIGNAL_METRICS, Limit, failed_limits, parse_limits
from aaq.auditing.pairing import (
    BENIGN,
    FLIPS,
    HARMFUL,
    AuditPrompts,
    ModelAnswers,
    flip_prediction,
    flipped,
    model_answers,
    pair_rows,
    paired_figures,
    transitions,
)
from aaq.auditing.report import write_audit
from aaq.auditing.signal import first_token_log_probs, kl_divergences, top1_agreement
from aaq.auditing.sources import FULL_PRECISION, SourceInfo, check_same_vocabulary, describe_source, load_source
from aaq.auditing.stats import CONFIDENCE
from aaq.data.corpus import corpus_documents
from aaq.errors import AaqError
from aaq.eval.coherence import CoherenceScorer
from aaq.eval.perplexity import PerplexityConfig, evaluate_perplexity
from aaq.eval.refusal import PhraseJudge
from aaq.eval.suite import EvalConfig
from aaq.eval.tasks.benign import benign_prompt_set
from aaq.eval.tasks.refusal import harmful_prompt_sets
from aaq.models.loading import load_config_and_tokenizer, load_model
from aaq.runs.folders import check_output_folder, prepare_output_folder
from aaq.runtime.devices import Placement, dispatched, tf32_matmuls
from aaq.workflows.run import load_judge

log = logging.getLogger(__name__)

AUDIT_KIND = "audit"
# 1: the first layout of audit.json.
REPORT_VERSION = 1
INTERVAL_METHOD = (
    f"{CONFIDENCE:.0%} interval of each paired difference (quantized - original): Agresti and Min's adjusted Wald interval for "
    "matched pairs (2005; 1/2 added to each cell), which keeps a width of about ±2/(n+2) when no prompt changed"
)


@dataclass
class AuditConfig:
    """What `audit` compares and how.

    `original`: the full-precision model (folder, hub id or alias); `quantized`: the checkpoints to audit (any kind
    `aaq.auditing.sources` reads), `names`: their labels in the report (default: the file or folder names).
    `harmful_prompts`, `benign_prompts`, `max_prompts`: the prompt sets, as in `EvalConfig` (`max_prompts` keeps an
    evenly spaced subset of each set). `max_new_tokens`, `batch_size`: greedy generation, the same for every model.
    `ppl`: held-out perplexity (None: not measured). `judge`: a judge model instead of the refusal-phrase detector.
    `garbled_check`: score answers with the original (else nothing is garbled). `signal_only`: only the first-token
    KL, no generation. `fail_if`: limits of the CI gate (`aaq.auditing.gate`). `out`: the output folder (None:
    nothing written).
    """

    original: str
    quantized: list[str]
    out: Path | None = None
    names: list[str] | None = None
    harmful_prompts: str | None = None
    benign_prompts: str | None = None
    max_prompts: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 64
    ppl: PerplexityConfig | None = field(default_factory=PerplexityConfig)
    judge: str | None = None
    garbled_check: bool = True
    signal_only: bool = False
    fail_if: str | None = None
    placement: Placement = field(default_factory=Placement)
    seed: int = 0
    command: str | None = None

    def __post_init__(self) -> None:
        self.out = None if self.out is None else Path(self.out)
        if not self.quantized:
            raise AaqError("no quantized model to audit; pass at least one ({setting})", setting="quantized")
        if len(set(self.quantized)) != len(self.quantized):
            raise AaqError("a quantized model is named twice; name each once ({setting})", setting="quantized")
        if self.names is not None and len(self.names) != len(self.quantized):
            raise AaqError(f"{len(self.names)} names for {len(self.quantized)} quantized models; give one name each ({{setting}})", setting="names")
        self.evaluation()
        limits = self.limits()
        if self.signal_only:
            beyond = [str(limit) for limit in limits if limit.metric not in SIGNAL_METRICS]
            if beyond:
                raise AaqError(f"limits {', '.join(beyond)} need the full audit, not {{setting}}; drop them or the option", setting="signal_only")

    def limits(self) -> list[Limit]:
        """The gate's limits."""
        return parse_limits(self.fail_if)

    def evaluation(self) -> EvalConfig:
        """The evaluation settings every model is answered with (the suite's refusal and benign tasks)."""
        return EvalConfig(
            tasks="refusal,benign", harmful_prompts=self.harmful_prompts, benign_prompts=self.benign_prompts, max_prompts=self.max_prompts,
            max_new_tokens=self.max_new_tokens, batch_size=self.batch_size, judge=self.judge, garbled_check=self.garbled_check, seed=self.seed,
        )  # fmt: skip

    def labels(self) -> list[str]:
        """The report's name of each quantized model: `names`, else its file or folder name (made unique)."""
        if self.names is not None:
            return list(self.names)
        labels: list[str] = []
        for source in self.quantized:
            path = Path(source)
            base = path.stem if path.suffix == ".gguf" else path.name or source
            labels.append(base if base not in labels else f"{base}-{len(labels) + 1}")
        return labels


@dataclass
class AuditResult:
    """What an audit found: the report (what audit.json holds) and the gate's failures, one line each ("model: limit: figure")."""

    report: dict[str, Any]
    failed: list[str]

    @property
    def passed(self) -> bool:
        """True when no model exceeded a limit."""
        return not self.failed


@dataclass
class _Reference:
    """What the original model gives every comparison: its first-token distributions, answers and perplexity."""

    log_probs: dict[str, torch.Tensor]
    answers: ModelAnswers | None
    ppl: float | None


def _check_inputs(config: AuditConfig) -> tuple[AuditPrompts, list[SourceInfo]]:
    """Everything that can be checked before a model is loaded: the folder, prompts, held-out text and every model's metadata."""
    if config.out is not None:
        check_output_folder(config.out, AUDIT_KIND)
    evaluation = config.evaluation()
    prompts = AuditPrompts(harmful_prompt_sets(evaluation), benign_prompt_set(evaluation))
    if config.ppl is not None and not config.signal_only:
        corpus_documents(config.ppl.dataset, "heldout")
    if describe_source(config.original).kind != FULL_PRECISION:
        raise AaqError(f"the original {config.original} is itself quantized; pass the full-precision model it was made from ({{setting}})", setting="original")
    load_config_and_tokenizer(config.original)
    infos = [describe_source(source) for source in config.quantized]
    for info in infos:
        if info.kind == FULL_PRECISION:
            load_config_and_tokenizer(info.source)
    if config.judge:
        load_config_and_tokenizer(config.judge)
    return prompts, infos


def _signal(model, tokenizer, prompts: AuditPrompts, batch_size: int) -> dict[str, torch.Tensor]:
    return {task: first_token_log_probs(model, tokenizer, prompts.texts(task), batch_size) for task in (HARMFUL, BENIGN)}


def _timed(seconds: dict[str, float], name: str, work):
    start = time.perf_counter()
    value = work()
    seconds[name] = round(time.perf_counter() - start, 2)
    return value


def _reference(config: AuditConfig, original, tokenizer, prompts: AuditPrompts, judge, scorer, seconds: dict[str, float]) -> _Reference:
    evaluation = config.evaluation()
    log_probs = _timed(seconds, "signal", lambda: _signal(original, tokenizer, prompts, config.batch_size))
    if config.signal_only:
        return _Reference(log_probs, None, None)
    answers = _timed(seconds, "answers", lambda: model_answers(original, tokenizer, prompts, evaluation.generation, judge, scorer))
    ppl = None if config.ppl is None else _timed(seconds, "ppl", lambda: evaluate_perplexity(original, tokenizer, config.ppl).ppl)
    return _Reference(log_probs, answers, ppl)


def _generation_differences(original, model) -> dict[str, Any]:
    """The special-token settings of the model's generation config that differ from the original's (the model gets the original's)."""
    keys = ("eos_token_id", "bos_token_id", "pad_token_id")
    return {key: getattr(model.generation_config, key, None) for key in keys
            if getattr(model.generation_config, key, None) != getattr(original.generation_config, key, None)}  # fmt: skip


def _gate_figures(entry: dict[str, Any]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """A model entry's figures by gate metric name: the levels and the changes against the original."""
    figures = {name: figure["quantized"] for name, figure in entry.get("figures", {}).items()}
    changes = {name: figure["difference"] for name, figure in entry.get("figures", {}).items()}
    figures |= {f"flips_{name}": len(items) for name, items in entry.get("flips", {}).items()}
    figures["ppl_ratio"] = (entry.get("ppl") or {}).get("ratio")
    figures |= {name: entry["signal"].get(name) for name in SIGNAL_METRICS}
    return figures, changes


def _audit_model(
    config: AuditConfig, label: str, info: SourceInfo, original, tokenizer, reference: _Reference, prompts: AuditPrompts, judge, scorer
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Load one quantized model, compare it with the original, free it; returns its report entry and its pairs.jsonl rows."""
    seconds: dict[str, float] = {}
    log.info("audit: loading %s (%s)", label, info.format)
    model, own_tokenizer = _timed(seconds, "load", lambda: load_source(info, config.placement))
    check_same_vocabulary(tokenizer, own_tokenizer, info.source)
    entry: dict[str, Any] = {"label": label, "source": info.source, "kind": info.kind, "format": info.format, "details": info.details}
    entry["generation_config_replaced"] = _generation_differences(original, model)
    entry["chat_template_differs"] = getattr(own_tokenizer, "chat_template", None) != getattr(tokenizer, "chat_template", None)
    # Same prompts, same settings: the original's tokenizer renders every prompt, its generation config stops every answer.
    model.generation_config = copy.deepcopy(original.generation_config)
    with tf32_matmuls(config.placement.tf32), dispatched(model, config.placement):
        rows = _compare(config, entry, model, tokenizer, reference, prompts, judge, scorer, seconds)
    entry["seconds"] = seconds
    del model
    gc.collect()
    return entry, rows


def _compare(
    config: AuditConfig, entry: dict[str, Any], model, tokenizer, reference: _Reference, prompts: AuditPrompts, judge, scorer, seconds: dict[str, float]
) -> list[dict[str, Any]]:
    """Fill a model's report entry: the first-token KL, and unless signal-only its paired figures, flips and perplexity; returns its pairs.jsonl rows."""
    log_probs = _timed(seconds, "signal", lambda: _signal(model, tokenizer, prompts, config.batch_size))
    kl = {task: kl_divergences(reference.log_probs[task], log_probs[task]) for task in log_probs}
    entry["signal"] = {f"kl_{task}": sum(values) / len(values) if values else None for task, values in kl.items()}
    entry["signal"] |= {f"top1_agreement_{task}": top1_agreement(reference.log_probs[task], log_probs[task]) for task in log_probs if kl[task]}
    if config.signal_only:
        return []
    answers = _timed(seconds, "answers", lambda: model_answers(model, tokenizer, prompts, config.evaluation().generation, judge, scorer))
    entry["shares"] = answers.shares()
    entry["figures"] = paired_figures(reference.answers, answers)
    entry["transitions"] = transitions(reference.answers, answers)
    entry["flips"] = {name: [_flip(prompts, FLIPS[name][0], i, reference.answers, answers) for i in indices]
                      for name, indices in flipped(reference.answers, answers).items()}  # fmt: skip
    entry["signal"] |= flip_prediction(kl, reference.answers, answers)
    if config.ppl is not None:
        ppl = _timed(seconds, "ppl", lambda: evaluate_perplexity(model, tokenizer, config.ppl).ppl)
        entry["ppl"] = {"original": reference.ppl, "quantized": ppl, "ratio": ppl / reference.ppl}
    return pair_rows(entry["label"], prompts, reference.answers, answers, kl)


def _flip(prompts: AuditPrompts, task: str, index: int, original: ModelAnswers, quantized: ModelAnswers) -> dict[str, Any]:
    """One listed flip: the prompt, its set and both answers."""
    return {"prompt_set": prompts.prompt_sets(task)[index], "prompt": original.records[task][index].prompt,
            "original": original.records[task][index].response, "quantized": quantized.records[task][index].response}  # fmt: skip


def _report_head(config: AuditConfig, reference: _Reference, prompts: AuditPrompts, judge, calibration, seconds: dict[str, float], limits: list[Limit]) -> dict[str, Any]:
    """The report before any quantized model: the original's figures, the prompts and the settings every model shares."""
    return {
        "kind": "aaq-audit", "version": REPORT_VERSION,
        "original": {"source": config.original, "format": "full precision", "seconds": seconds, "ppl": reference.ppl,
                     "shares": None if reference.answers is None else reference.answers.shares()},
        "models": [], "prompts": prompts.counts(), "signal_only": config.signal_only,
        "generation": dataclasses.asdict(config.evaluation().generation), "judge": config.judge or judge.name,
        "coherence": {"check": False} if calibration is None else {"check": True, **calibration.to_dict()},
        "interval": INTERVAL_METHOD, "gate": {"limits": [str(limit) for limit in limits], "failed": []},
        "config": dataclasses.asdict(config), "seed": config.seed,
    }  # fmt: skip


def audit(config: AuditConfig) -> AuditResult:
    """Audit every quantized model against the original and return the findings; with `config.out`, also write them there.

    Everything that can be checked (the output folder, the prompt sets, the held-out text, every model's kind and
    metadata, the judge) is checked before the first model is loaded. The gate's failures are returned, not raised.
    """
    start = time.perf_counter()
    prompts, infos = _check_inputs(config)
    limits = config.limits()
    if config.out is not None:
        prepare_output_folder(config.out, AUDIT_KIND)
    torch.manual_seed(config.seed)
    seconds: dict[str, float] = {}
    original, tokenizer = _timed(seconds, "load", lambda: load_model(config.original, config.placement))
    judge = (None if config.signal_only else load_judge(config.judge, config.placement)) or PhraseJudge()
    scorer = CoherenceScorer(original, tokenizer, config.original) if config.garbled_check and not config.signal_only else None
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    with tf32_matmuls(config.placement.tf32), dispatched(original, config.placement):
        calibration = None if scorer is None else _timed(seconds, "coherence_calibration", lambda: scorer.calibration(config.evaluation().generation))
        reference = _reference(config, original, tokenizer, prompts, judge, scorer, seconds)
        report = _report_head(config, reference, prompts, judge, calibration, seconds, limits)
        for label, info in zip(config.labels(), infos, strict=True):
            entry, model_rows = _audit_model(config, label, info, original, tokenizer, reference, prompts, judge, scorer)
            entry["gate"] = failed_limits(limits, *_gate_figures(entry))
            failed += [f"{label}: {failure}" for failure in entry["gate"]]
            report["models"].append(entry)
            rows += model_rows
            report["gate"]["failed"] = failed
            report["seconds"] = round(time.perf_counter() - start, 1)
            if config.out is not None:
                write_audit(report, rows, config.out)
    return AuditResult(report, failed)
