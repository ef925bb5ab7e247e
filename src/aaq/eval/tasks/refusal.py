"""Task `refusal`: greedy answers to harmful prompt sets, each refused, complied or garbled."""

from __future__ import annotations

import time
from typing import ClassVar

from aaq.eval.generate import generate_responses
from aaq.eval.prompts import Prompt, evenly_spaced, harmful_records
from aaq.eval.safety import SafetyResult, safety_result, verdict_records
from aaq.eval.tasks import EvalTask, Findings, TaskContext, register_task


def harmful_prompt_sets(config) -> dict[str, list[Prompt]]:
    """Each configured harmful prompt set by name (default: HarmBench val `standard`), subsampled by `max_prompts`."""
    return {name: evenly_spaced(harmful_records(name), config.max_prompts) for name in config.harmful_set_names()}


def record_answers(findings: Findings, result: SafetyResult, rate_metric: str, garbled_metric: str) -> None:
    """Write a safety result into `findings`: its rate and garbled rate, breakdowns, summary and every answer with its verdict."""
    findings.metrics[rate_metric] = result.rate
    findings.metrics[garbled_metric] = result.garbled_rate
    findings.breakdowns[result.task] = result.per_category
    if result.per_looks_harmful:
        findings.breakdowns[f"{result.task}_by_looks_harmful"] = result.per_looks_harmful
    findings.n_items[result.task] = result.n
    findings.details[result.task] = result.summary()
    findings.generations += [
        {"task": r.task, "prompt_set": r.prompt_set, "prompt": r.prompt, "category": r.category, "looks_harmful": r.looks_harmful,
         "response": r.response, "verdict": r.verdict, "nll": r.score.nll if r.score else None,
         "distinct_4grams": r.score.distinct_4grams if r.score else None, "refused": r.refused, "judge": result.judge}
        for r in result.records
    ]  # fmt: skip


@register_task
class RefusalTask(EvalTask):
    """Refusal on every configured harmful prompt set, reported per set and pooled over all their prompts."""

    name = "refusal"
    generates_answers = True
    metrics: ClassVar[dict[str, str]] = {
        "refusal_rate": "refused answers / harmful prompts, pooled over the harmful sets (per set: refusal_by_set)",
        "garbled_rate": "garbled answers / harmful prompts: not refused, and empty, a loop (under half of its token "
        "4-grams distinct) or with a per-token NLL under the scorer above the threshold (see coherence)",
    }

    def prepare(self, config) -> dict[str, list[Prompt]]:
        """The harmful prompt sets."""
        return harmful_prompt_sets(config)

    def answer(self, context: TaskContext, inputs: dict[str, list[Prompt]]) -> dict[str, tuple[list[str], float]]:
        """Each set's greedy answers, with the seconds they took."""
        answers = {}
        for name, prompts in inputs.items():
            start = time.perf_counter()
            responses = generate_responses(context.model, context.tokenizer, [prompt.text for prompt in prompts], context.config.generation)
            answers[name] = (responses, time.perf_counter() - start)
        return answers

    def record(self, context: TaskContext, inputs: dict[str, list[Prompt]], answers: dict[str, tuple[list[str], float]], findings: Findings) -> None:
        """The rates pooled and per set, the breakdown per category (per set when there are several)."""
        per_set = {}
        for name, prompts in inputs.items():
            responses, seconds = answers[name]
            start = time.perf_counter()
            records = verdict_records("refusal", prompts, responses, context.config.generation, context.judge, context.scorer, name)
            per_set[name] = safety_result("refusal", records, context.judge.name, context.scorer is not None)
            findings.seconds[f"refusal:{name}"] = round(seconds + time.perf_counter() - start, 3)
        records = [record for result in per_set.values() for record in result.records]
        by_set = (lambda record: record.prompt_set) if len(per_set) > 1 else None
        pooled = safety_result("refusal", records, context.judge.name, context.scorer is not None, by_set)
        record_answers(findings, pooled, "refusal_rate", "garbled_rate")
        findings.metrics["refusal_by_set"] = {
            name: {"refusal_rate": result.rate, "garbled_rate": result.garbled_rate, "n": result.n} for name, result in per_set.items()
        }
        if len(per_set) > 1:
            findings.breakdowns.update({f"refusal:{name}": result.per_category for name, result in per_set.items()})
