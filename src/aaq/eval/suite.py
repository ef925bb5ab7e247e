"""The evaluation suite behind `aaq eval`: the registered tasks (`aaq.eval.tasks`) on one model, one report."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aaq.errors import AaqError
from aaq.eval.coherence import COHERENCE_RULE, CoherenceScorer
from aaq.eval.generate import GenerationConfig
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.prompts import HARMBENCH_VAL, NAMED_HARMFUL_SETS
from aaq.eval.refusal import Judge, PhraseJudge
from aaq.eval.report import write_report
from aaq.eval.tasks import EvalTask, Findings, TaskContext, each_task, metric_definitions, task_class, task_names, task_usage
from aaq.models.loading import load_config_and_tokenizer
from aaq.quant.fake_quant import quantized_linears
from aaq.runs.folders import check_output_folder, prepare_output_folder
from aaq.runs.records import provenance, write_atomic

log = logging.getLogger(__name__)

DEFAULT_TASKS = ("ppl", "refusal", "benign", "safetybench")
GENERATIONS_FILE = "generations.jsonl"


def _split_tasks(tasks: list[str] | str) -> list[str]:
    # "lmeval:arc_easy,piqa" carries its own commas: a bare name after an entry with arguments belongs to it.
    items = tasks.split(",") if isinstance(tasks, str) else [part for task in tasks for part in task.split(",")]
    merged: list[str] = []
    for item in (part.strip() for part in items):
        if not item:
            continue
        if merged and ":" in merged[-1] and item not in task_names() and ":" not in item:
            merged[-1] += "," + item
        else:
            merged.append(item)
    return merged


@dataclass
class EvalConfig:
    """What `evaluate` runs.

    tasks: registered task names (`aaq.eval.tasks`: "ppl", "refusal", "benign", "safetybench", "lmeval:<t1>,<t2>"),
    as a comma string or list.
    harmful_prompts: comma-separated harmful prompt sets, each a name ("harmbench-val" = HarmBench val
    `standard`, the default; "harmbench-tuning" = the demo pair's 40-behaviour tuning split of HarmBench
    test; "advbench") or a prompt file; several sets are reported one by one and pooled.
    benign_prompts: a prompt file (default: the shipped benign evaluation set).
    safetybench: a SafetyBench file (default: the shared dev split). judge: name of a judge model; the
    caller loads it and passes it to `evaluate(judge=...)` (None = the refusal-phrase detector).
    garbled_check: give every refusal/benign answer a verdict refused/complied/garbled (`aaq.eval.coherence`);
    off, every answer that does not refuse complies. scorer: name of the full-precision model that
    scores the answers; the caller loads it (or passes a function that does, called once the answers are
    in) as `evaluate(scorer=...)` (None = the evaluated model itself, which must then be unquantized).
    """

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    harmful_prompts: str | None = None
    benign_prompts: str | None = None
    safetybench: str | None = None
    safetybench_shots: int = 5
    max_new_tokens: int = 64
    batch_size: int = 8
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    judge: str | None = None
    seed: int = 0
    max_prompts: int | None = None
    garbled_check: bool = True
    scorer: str | None = None

    def __post_init__(self) -> None:
        self.tasks = _split_tasks(self.tasks)
        if not self.tasks:
            raise AaqError(f"no evaluation task given; choose from {task_usage()}")
        for entry in self.tasks:
            name, colon, arguments = entry.partition(":")
            takes = task_class(name.strip()).takes_arguments
            if takes != bool(arguments.strip(",").strip()) or (colon and not takes):
                raise AaqError(f"evaluation task {entry!r} is written wrong; valid tasks: {task_usage()}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise AaqError(f"max_prompts must be >= 1 (or None for all), got {self.max_prompts}")
        if self.safetybench_shots < 0:
            raise AaqError(f"safetybench_shots must be >= 0, got {self.safetybench_shots}")
        GenerationConfig(self.max_new_tokens, self.batch_size)
        self.harmful_set_names()

    def harmful_set_names(self) -> list[str]:
        """Return the harmful prompt sets to evaluate, in order: names of shipped sets or prompt files."""
        given = self.harmful_prompts or HARMBENCH_VAL
        # A file whose name holds a comma is still one set.
        names = [given] if Path(given).is_file() else [name.strip() for name in given.split(",") if name.strip()]
        for name in names:
            if name not in NAMED_HARMFUL_SETS and not Path(name).is_file():
                raise AaqError(
                    f"unknown harmful prompt set {name!r}; use {', '.join(NAMED_HARMFUL_SETS)} or an existing prompt "
                    "file (comma-separate several)"
                )
        if not names or len(set(names)) != len(names):
            raise AaqError(f"harmful prompt sets {given!r} are empty or repeat a set; name each set once")
        return names

    def selected_tasks(self) -> list[EvalTask]:
        """The configured tasks, once each, in the order first named."""
        return each_task(self.tasks)

    @property
    def checks_coherence(self) -> bool:
        """True when the garbled check is on and a task generates answers to check."""
        return self.garbled_check and any(task.generates_answers for task in self.selected_tasks())

    @property
    def generation(self) -> GenerationConfig:
        """Return the generation settings of the tasks that generate answers."""
        return GenerationConfig(self.max_new_tokens, self.batch_size)


@dataclass
class EvalInputs:
    """What an evaluation reads besides the model, read and checked before any model work: each task's inputs by task name."""

    by_task: dict[str, Any] = field(default_factory=dict)


def prepare_inputs(config: EvalConfig) -> EvalInputs:
    """Read and check every input the configured tasks need (held-out text, prompt files, SafetyBench, lm-eval data) and the judge and scorer.

    Meant for before any model work, so that a bad file or a missing data set stops a command at
    once instead of after a quantization.
    """
    for role, name in (("judge", config.judge), ("scorer", config.scorer if config.checks_coherence else None)):
        if name:
            try:
                load_config_and_tokenizer(name)
            except AaqError as error:
                raise AaqError(f"cannot load the {role} {name!r} ({error}); pass another model ({{setting}})", setting=role) from None
    return EvalInputs({task.name: task.prepare(config) for task in config.selected_tasks()})


def _write_generations(path: Path, generations: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generations)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# A function that loads the garbled check's scorer, called once the evaluated model's answers are in.
ScorerLoader = Callable[[], CoherenceScorer]


def _resolve_scorer(model, tokenizer, config: EvalConfig, scorer: CoherenceScorer | ScorerLoader | None, meta: dict) -> CoherenceScorer | ScorerLoader | None:
    if not config.checks_coherence:
        return None
    if scorer is not None:
        return scorer
    if config.scorer:
        raise AaqError(f"scorer model {config.scorer!r} is configured but not loaded; pass scorer=CoherenceScorer(model, tokenizer, name)")
    if quantized_linears(model):
        raise AaqError(
            "a quantized model cannot score its own answers for the garbled check; pass "
            "scorer=CoherenceScorer(full_precision_model, tokenizer, name) or EvalConfig(garbled_check=False)"
        )
    return CoherenceScorer(model, tokenizer, meta.get("model") or "evaluated model")


def _loaded_scorer(
    scorer: CoherenceScorer | ScorerLoader | None, release_model: Callable[[], None] | None, config: EvalConfig, findings: Findings
) -> CoherenceScorer | None:
    """The scorer, loaded now if it is a loader (after `release_model` has freed the evaluated model) and calibrated."""
    if scorer is None:
        return None
    if not isinstance(scorer, CoherenceScorer):
        if release_model is not None:
            release_model()
        start = time.perf_counter()
        scorer = scorer()
        findings.seconds["scorer_load"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    scorer.calibration(config.generation)  # calibrated (or read from the cache) before the verdicts
    findings.seconds["coherence_calibration"] = round(time.perf_counter() - start, 3)
    return scorer


def _coherence_record(config: EvalConfig, scorer: CoherenceScorer | None) -> dict:
    if scorer is None:
        reason = "turned off" if not config.garbled_check else "no task generates answers"
        return {"check": False, "reason": reason}
    return {"check": True, "rule": COHERENCE_RULE, **scorer.calibration(config.generation).to_dict()}


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
    judge: Judge | None = None,
    scorer: CoherenceScorer | ScorerLoader | None = None,
    inputs: EvalInputs | None = None,
    release_model: Callable[[], None] | None = None,
) -> dict:
    """Run the configured tasks on the model and return the report dict; with `out_dir`, also write
    report.json, report.md and generations.jsonl (every prompt, response, verdict and NLL) there.

    `meta` supplies `model`, `method` and `bits` (and anything else worth keeping); `judge` is the
    loaded judge for `config.judge` (default: the refusal-phrase detector); `scorer` is the
    full-precision model of the garbled check (default: the evaluated model, when it is unquantized),
    or a function that loads it. The tasks run on the model first (answers generated, nothing else
    needs the model after that); then the scorer is loaded (when given as a loader: after
    `release_model`, when given, has freed the evaluated model, so that the two never take memory at
    the same time) and the answers get their verdicts. The verdicts are the same either way.
    `inputs`: what `prepare_inputs(config)` returned, when the caller checked them before its own
    work (else they are read here, before the first task). `out_dir` must be new, empty, or an aaq
    evaluation or run folder (`aaq.runs.folders`).
    """
    if config.judge and judge is None:
        raise AaqError(f"judge model {config.judge!r} is configured but not loaded; pass judge=ModelJudge(model, tokenizer)")
    if out_dir is not None:
        check_output_folder(out_dir, "eval", joins=("run",))
    inputs = inputs or prepare_inputs(config)
    judge = judge or PhraseJudge()
    meta = dict(meta or {})
    scorer = _resolve_scorer(model, tokenizer, config, scorer, meta)
    if out_dir is not None:
        prepare_output_folder(out_dir, "eval", joins=("run",))
    model.eval()
    definitions = metric_definitions()
    findings = Findings(metrics=dict.fromkeys(definitions))
    context = TaskContext(model, tokenizer, config, judge, None)
    answers = {}
    for task in config.selected_tasks():
        log.info("eval: %s", task.name)
        start = time.perf_counter()
        if task.generates_answers:
            answers[task] = task.answer(context, inputs.by_task[task.name])
        else:
            task.run(context, inputs.by_task[task.name], findings)
        findings.seconds[task.name] = round(time.perf_counter() - start, 3)
    scorer = _loaded_scorer(scorer, release_model, config, findings) if answers else None
    context = TaskContext(None if release_model else model, tokenizer, config, judge, scorer)
    for task, answered in answers.items():
        start = time.perf_counter()
        task.record(context, inputs.by_task[task.name], answered, findings)
        findings.seconds[task.name] = round(findings.seconds[task.name] + time.perf_counter() - start, 3)
    for task in config.selected_tasks():
        log.info("eval: %s done in %.1fs", task.name, findings.seconds[task.name])
    report = {
        "model": meta.get("model"),
        "method": meta.get("method"),
        "bits": meta.get("bits"),
        "metrics": findings.metrics,
        "metric_definitions": definitions,
        "coherence": _coherence_record(config, scorer),
        "breakdowns": findings.breakdowns,
        "n_items": findings.n_items,
        "seconds": findings.seconds,
        "details": findings.details,
        "judge": config.judge or judge.name,
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "meta": meta,
        **provenance(),
    }
    if out_dir is not None:
        write_report(report, out_dir)
        _write_generations(Path(out_dir) / GENERATIONS_FILE, findings.generations)
    return report
