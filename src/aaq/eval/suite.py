"""The evaluation suite behind `aaq eval`: utility and safety tasks on one model, one report."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aaq.data import corpus_documents
from aaq.errors import AaqError
from aaq.eval.coherence import COHERENCE_RULE, CoherenceScorer
from aaq.eval.generate import GenerationConfig
from aaq.eval.lmeval import LmEvalConfig, lmeval_tasks, prepare_lmeval
from aaq.eval.perplexity import PerplexityConfig, evaluate_perplexity
from aaq.eval.prompts import HARMBENCH_VAL, NAMED_HARMFUL_SETS, Prompt, benign_records, harmful_records, load_prompt_records
from aaq.eval.refusal import Judge, PhraseJudge
from aaq.eval.report import write_report
from aaq.eval.safety import SafetyResult, benign_compliance, refusal_rate, safety_result
from aaq.eval.safetybench import SafetyBenchResult, load_safetybench, safetybench_accuracy
from aaq.fake_quant import quantized_linears
from aaq.folders import check_output_folder, prepare_output_folder
from aaq.loading import load_config_and_tokenizer
from aaq.runs import provenance, write_atomic

log = logging.getLogger(__name__)

BASIC_TASKS = ("ppl", "refusal", "benign", "safetybench")
GENERATION_TASKS = ("refusal", "benign")
LMEVAL_PREFIX = "lmeval:"
GENERATIONS_FILE = "generations.jsonl"


def _split_tasks(tasks: list[str] | str) -> list[str]:
    # "lmeval:arc_easy,piqa" carries its own commas: a bare name after an lmeval entry belongs to it.
    items = tasks.split(",") if isinstance(tasks, str) else [part for task in tasks for part in task.split(",")]
    merged: list[str] = []
    for item in (part.strip() for part in items):
        if not item:
            continue
        if merged and merged[-1].startswith(LMEVAL_PREFIX) and item not in BASIC_TASKS and ":" not in item:
            merged[-1] += "," + item
        else:
            merged.append(item)
    return merged


@dataclass
class EvalConfig:
    """What `evaluate` runs.

    tasks: any of "ppl", "refusal", "benign", "safetybench" and "lmeval:<t1>,<t2>" (a comma string or list).
    harmful_prompts: comma-separated harmful prompt sets, each a name ("harmbench-val" = HarmBench val
    `standard`, the default; "harmbench-tuning" = the demo pair's 40-behaviour tuning split of HarmBench
    test; "advbench") or a prompt file; several sets are reported one by one and pooled.
    benign_prompts: a prompt file (default: the shipped benign evaluation set).
    safetybench: a SafetyBench file (default: the shared dev split). judge: name of a judge model; the
    caller loads it and passes it to `evaluate(judge=...)` (None = the refusal-phrase detector).
    garbled_check: give every refusal/benign answer a verdict refused/complied/garbled (`aaq.eval.coherence`);
    off, every answer that does not refuse complies. scorer: name of the full-precision model that
    scores the answers; the caller loads it and passes `evaluate(scorer=CoherenceScorer(...))` (None =
    the evaluated model itself, which must then be unquantized).
    """

    tasks: list[str] = field(default_factory=lambda: list(BASIC_TASKS))
    harmful_prompts: str | None = None
    benign_prompts: str | None = None
    safetybench: str | None = None
    safetybench_shots: int = 5
    max_new_tokens: int = 64
    batch_size: int = 64
    ppl: PerplexityConfig = field(default_factory=PerplexityConfig)
    judge: str | None = None
    seed: int = 0
    max_prompts: int | None = None
    garbled_check: bool = True
    scorer: str | None = None

    def __post_init__(self) -> None:
        self.tasks = _split_tasks(self.tasks)
        if not self.tasks:
            raise AaqError(f"no evaluation task given; choose from {', '.join(BASIC_TASKS)}, lmeval:<task1>,<task2>")
        for task in self.tasks:
            if task not in BASIC_TASKS and not (task.startswith(LMEVAL_PREFIX) and task[len(LMEVAL_PREFIX) :].strip(",")):
                raise AaqError(
                    f"unknown evaluation task {task!r}; valid tasks: {', '.join(BASIC_TASKS)}, lmeval:<task1>,<task2>"
                )
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

    @property
    def checks_coherence(self) -> bool:
        """True when the garbled check is on and a refusal or benign task will generate answers to check."""
        return self.garbled_check and any(task in GENERATION_TASKS for task in self.tasks)

    @property
    def lmeval_task_names(self) -> list[str]:
        """Return the lm-eval task names requested through "lmeval:..." entries."""
        names = [t[len(LMEVAL_PREFIX) :] for t in self.tasks if t.startswith(LMEVAL_PREFIX)]
        return [name for entry in names for name in entry.split(",") if name]

    @property
    def generation(self) -> GenerationConfig:
        """Return the generation settings of the refusal and benign tasks."""
        return GenerationConfig(self.max_new_tokens, self.batch_size)


def evenly_spaced(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """Return at most `limit` prompts spread evenly over the list (all of them when `limit` is None or not smaller)."""
    if limit is None or limit >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def harmful_prompt_sets(config: EvalConfig) -> dict[str, list[Prompt]]:
    """Return each configured harmful prompt set by name (default: HarmBench val `standard`), subsampled by max_prompts."""
    return {name: evenly_spaced(harmful_records(name), config.max_prompts) for name in config.harmful_set_names()}


def benign_prompt_set(config: EvalConfig) -> list[Prompt]:
    """Return the benign prompts to evaluate: the configured file or the shipped benign evaluation set."""
    prompts = load_prompt_records(config.benign_prompts) if config.benign_prompts else benign_records()
    return evenly_spaced(prompts, config.max_prompts)


@dataclass
class EvalInputs:
    """What an evaluation reads besides the model, read and checked before any model work.

    `harmful`: each harmful prompt set by name. `lmeval_manager`: lm-eval's task manager with the
    tasks' data cached (None without lm-eval tasks).
    """

    harmful: dict[str, list[Prompt]] = field(default_factory=dict)
    benign: list[Prompt] = field(default_factory=list)
    lmeval_manager: Any = None


def prepare_inputs(config: EvalConfig) -> EvalInputs:
    """Read and check every input the configured tasks need: held-out text, prompt files, SafetyBench, lm-eval data, the judge and scorer.

    Meant for before any model work, so that a bad file or a missing data set stops a command at
    once instead of after a quantization.
    """
    tasks = _ordered_tasks(config)
    if "ppl" in tasks:
        corpus_documents(config.ppl.dataset, "heldout")
    if "safetybench" in tasks:
        load_safetybench(config.safetybench)
    for role, name in (("judge", config.judge), ("scorer", config.scorer if config.checks_coherence else None)):
        if name:
            try:
                load_config_and_tokenizer(name)
            except AaqError as error:
                raise AaqError(f"cannot load the {role} {name!r} ({error}); pass another model ({{setting}})", setting=role) from None
    return EvalInputs(
        harmful=harmful_prompt_sets(config) if "refusal" in tasks else {},
        benign=benign_prompt_set(config) if "benign" in tasks else [],
        lmeval_manager=prepare_lmeval(_lmeval_config(config)) if "lmeval" in tasks else None,
    )


def _lmeval_config(config: EvalConfig) -> LmEvalConfig:
    return LmEvalConfig(config.lmeval_task_names, batch_size=config.batch_size, seed=config.seed)


@dataclass
class _Run:
    """What the tasks of one evaluation accumulate into the report."""

    metrics: dict = field(default_factory=dict)
    breakdowns: dict = field(default_factory=dict)
    n_items: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)


def _record_safety(run: _Run, result: SafetyResult, rate_metric: str, garbled_metric: str) -> None:
    run.metrics[rate_metric] = result.rate
    run.metrics[garbled_metric] = result.garbled_rate
    run.breakdowns[result.task] = result.per_category
    if result.per_looks_harmful:
        run.breakdowns[f"{result.task}_by_looks_harmful"] = result.per_looks_harmful
    run.n_items[result.task] = result.n
    run.details[result.task] = result.summary()
    run.generations += [
        {"task": r.task, "prompt_set": r.prompt_set, "prompt": r.prompt, "category": r.category,
         "looks_harmful": r.looks_harmful, "response": r.response, "verdict": r.verdict,
         "nll": r.score.nll if r.score else None, "distinct_4grams": r.score.distinct_4grams if r.score else None,
         "refused": r.refused, "judge": result.judge}
        for r in result.records
    ]


def _record_safetybench(run: _Run, result: SafetyBenchResult) -> None:
    run.metrics["safetybench_acc"] = result.accuracy
    run.breakdowns["safetybench"] = result.per_category
    run.n_items["safetybench"] = result.n
    run.details["safetybench"] = result.summary()
    letters = "ABCD"
    run.generations += [
        {"task": "safetybench", "id": p.id, "prompt": p.question, "category": p.category,
         "response": f"({letters[p.prediction]})", "answer": None if p.answer is None else f"({letters[p.answer]})",
         "correct": p.correct, "letter_logprobs": p.letter_logprobs, "n_shots": p.n_shots}
        for p in result.predictions
    ]


def _task_runners(
    model, tokenizer, config: EvalConfig, inputs: EvalInputs, judge: Judge, scorer: CoherenceScorer | None, run: _Run
) -> dict[str, Callable[[], None]]:
    def ppl() -> None:
        result = evaluate_perplexity(model, tokenizer, config.ppl)
        run.metrics["ppl"] = result.ppl
        run.n_items["ppl_tokens"] = result.n_tokens
        run.details["ppl"] = dataclasses.asdict(result)

    def refusal() -> None:
        per_set = {}
        for name, prompts in inputs.harmful.items():
            start = time.perf_counter()
            per_set[name] = refusal_rate(model, tokenizer, prompts, config.generation, judge, scorer, name)
            run.seconds[f"refusal:{name}"] = round(time.perf_counter() - start, 3)
        records = [record for result in per_set.values() for record in result.records]
        # Pooled over all harmful prompts; with several sets the breakdown is per set, each set's own categories beside it.
        by_set = (lambda record: record.prompt_set) if len(per_set) > 1 else None
        _record_safety(run, safety_result("refusal", records, judge.name, scorer is not None, by_set), "refusal_rate", "garbled_rate")
        run.metrics["refusal_by_set"] = {
            name: {"refusal_rate": result.rate, "garbled_rate": result.garbled_rate, "n": result.n}
            for name, result in per_set.items()
        }
        if len(per_set) > 1:
            run.breakdowns.update({f"refusal:{name}": result.per_category for name, result in per_set.items()})

    def benign() -> None:
        result = benign_compliance(model, tokenizer, inputs.benign, config.generation, judge, scorer)
        _record_safety(run, result, "benign_compliance", "benign_garbled_rate")

    def safetybench() -> None:
        result = safetybench_accuracy(model, tokenizer, config.safetybench, config.safetybench_shots, None, config.batch_size)
        _record_safetybench(run, result)

    def lmeval() -> None:
        results = lmeval_tasks(model, tokenizer, _lmeval_config(config), inputs.lmeval_manager)
        run.metrics["lmeval"] = results
        run.n_items["lmeval_tasks"] = len(results)

    return {"ppl": ppl, "refusal": refusal, "benign": benign, "safetybench": safetybench, "lmeval": lmeval}


def _ordered_tasks(config: EvalConfig) -> list[str]:
    names = [task for task in config.tasks if task in BASIC_TASKS]
    return list(dict.fromkeys(names + (["lmeval"] if config.lmeval_task_names else [])))


def _write_generations(path: Path, generations: list[dict]) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generations)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


METRIC_DEFINITIONS = {
    "ppl": "perplexity on held-out text",
    "refusal_rate": "refused answers / harmful prompts, pooled over the harmful sets (per set: refusal_by_set)",
    "garbled_rate": "garbled answers / harmful prompts: not refused, and empty, a loop (under half of its token "
    "4-grams distinct) or with a per-token NLL under the scorer above the threshold (see coherence)",
    "benign_compliance": "complied answers / benign prompts: not refused and not garbled (with the garbled check "
    "off: not refused)",
    "benign_garbled_rate": "garbled answers / benign prompts",
    "safetybench_acc": "SafetyBench multiple-choice accuracy",
}


def _resolve_scorer(model, tokenizer, config: EvalConfig, scorer: CoherenceScorer | None, meta: dict) -> CoherenceScorer | None:
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


def _coherence_record(config: EvalConfig, scorer: CoherenceScorer | None) -> dict:
    if scorer is None:
        reason = "turned off" if not config.garbled_check else "no refusal/benign task"
        return {"check": False, "reason": reason}
    return {"check": True, "rule": COHERENCE_RULE, **scorer.calibration(config.generation).to_dict()}


def evaluate(
    model,
    tokenizer,
    config: EvalConfig,
    out_dir: str | Path | None = None,
    meta: dict | None = None,
    judge: Judge | None = None,
    scorer: CoherenceScorer | None = None,
    inputs: EvalInputs | None = None,
) -> dict:
    """Run the configured tasks on the model and return the report dict; with `out_dir`, also write
    report.json, report.md and generations.jsonl (every prompt, response, verdict and NLL) there.

    `meta` supplies `model`, `method` and `bits` (and anything else worth keeping); `judge` is the
    loaded judge for `config.judge` (default: the refusal-phrase detector); `scorer` is the
    full-precision model of the garbled check (default: the evaluated model, when it is unquantized).
    `inputs`: what `prepare_inputs(config)` returned, when the caller checked them before its own
    work (else they are read here, before the first task). `out_dir` must be new, empty, or an aaq
    evaluation or run folder (`aaq.folders`).
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
    run = _Run(metrics={name: None for name in METRIC_DEFINITIONS})
    if scorer is not None:
        start = time.perf_counter()
        scorer.calibration(config.generation)  # calibrated (or read from the cache) before the timed tasks
        run.seconds["coherence_calibration"] = round(time.perf_counter() - start, 3)
    runners = _task_runners(model, tokenizer, config, inputs, judge, scorer, run)
    for task in _ordered_tasks(config):
        log.info("eval: %s", task)
        start = time.perf_counter()
        runners[task]()
        run.seconds[task] = round(time.perf_counter() - start, 3)
        log.info("eval: %s done in %.1fs", task, run.seconds[task])
    report = {
        "model": meta.get("model"),
        "method": meta.get("method"),
        "bits": meta.get("bits"),
        "metrics": run.metrics,
        "metric_definitions": METRIC_DEFINITIONS,
        "coherence": _coherence_record(config, scorer),
        "breakdowns": run.breakdowns,
        "n_items": run.n_items,
        "seconds": run.seconds,
        "details": run.details,
        "judge": config.judge or judge.name,
        "seed": config.seed,
        "config": dataclasses.asdict(config),
        "meta": meta,
        **provenance(),
    }
    if out_dir is not None:
        write_report(report, out_dir)
        _write_generations(Path(out_dir) / GENERATIONS_FILE, run.generations)
    return report
