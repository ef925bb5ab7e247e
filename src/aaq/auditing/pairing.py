"""Answers paired by prompt: each model's verdicts from the evaluation suite, the flips, and the paired figures.

Every answer gets the evaluation suite's verdict (`aaq.eval.safety.judged_records`: refused, complied or
garbled, with the original model as the garbled check's scorer). A refusal is not checked for coherence there;
the audit also asks of each refusal whether its text would be garbled if it were not one (the same rule,
`aaq.eval.coherence.verdict`), and counts those as **refused-but-garbled**: a quantized model that still opens
with "I'm sorry" but continues in noise refuses by accident more than by alignment.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aaq.auditing.stats import PairedTable, auroc, mcnemar_exact_p, paired_difference_interval
from aaq.eval.coherence import COMPLIED, GARBLED, REFUSED, VERDICTS, CoherenceScorer, verdict
from aaq.eval.generate import GenerationConfig
from aaq.eval.prompts import Prompt
from aaq.eval.refusal import Judge
from aaq.eval.safety import SafetyRecord, judged_records

HARMFUL, BENIGN = "harmful", "benign"
# The flips an audit lists prompt by prompt: (prompts, original verdict, quantized verdict).
FLIPS = {
    "refused_to_complied": (HARMFUL, REFUSED, COMPLIED),
    "refused_to_garbled": (HARMFUL, REFUSED, GARBLED),
    "complied_to_refused": (BENIGN, COMPLIED, REFUSED),
}
REFUSED_GARBLED = "refused_garbled"


@dataclass(frozen=True)
class AuditPrompts:
    """The prompts every model answers: each harmful set by name, and the benign prompts."""

    harmful: dict[str, list[Prompt]]
    benign: list[Prompt]

    def texts(self, task: str) -> list[str]:
        """The prompt texts of `task` (harmful: every set in order), in the order the answers are kept."""
        prompts = [p for ps in self.harmful.values() for p in ps] if task == HARMFUL else self.benign
        return [p.text for p in prompts]

    def prompt_sets(self, task: str) -> list[str | None]:
        """The set of each prompt of `task`, in answer order (None for the benign prompts)."""
        return [name for name, ps in self.harmful.items() for _ in ps] if task == HARMFUL else [None] * len(self.benign)

    def counts(self) -> dict[str, Any]:
        """How many prompts of each set."""
        return {HARMFUL: {name: len(ps) for name, ps in self.harmful.items()}, BENIGN: len(self.benign)}


@dataclass
class ModelAnswers:
    """One model's judged answers to the audit's prompts, by task, and which of its refusals are garbled after the refusal."""

    records: dict[str, list[SafetyRecord]]
    refused_garbled: dict[str, list[bool]] = field(default_factory=dict)

    def indicator(self, task: str, name: str) -> list[bool]:
        """Per prompt of `task`: whether the answer has verdict `name` (or is refused-but-garbled)."""
        if name == REFUSED_GARBLED:
            return self.refused_garbled[task]
        return [record.verdict == name for record in self.records[task]]

    def shares(self) -> dict[str, dict[str, float]]:
        """The share of each verdict (and of refused-but-garbled) among each task's answers."""
        return {task: {name: sum(self.indicator(task, name)) / len(records) for name in (*VERDICTS, REFUSED_GARBLED)}
                for task, records in self.records.items() if records}  # fmt: skip


def refused_but_garbled(records: list[SafetyRecord], scorer: CoherenceScorer | None, generation: GenerationConfig) -> list[bool]:
    """Per answer: refused, and garbled by the coherence rule were it not a refusal (all False without a scorer)."""
    refused = [i for i, record in enumerate(records) if record.verdict == REFUSED]
    flags = [False] * len(records)
    if scorer is None or not refused:
        return flags
    threshold = scorer.calibration(generation).threshold
    scores = scorer.scores([records[i].prompt for i in refused], [records[i].response for i in refused], generation.batch_size)
    for index, score in zip(refused, scores, strict=True):
        flags[index] = verdict(False, score, threshold) == GARBLED
    return flags


def model_answers(
    model, tokenizer, prompts: AuditPrompts, generation: GenerationConfig, judge: Judge, scorer: CoherenceScorer | None
) -> ModelAnswers:
    """The model's greedy answers to every audit prompt with their verdicts (the evaluation suite's refusal and benign tasks)."""
    harmful = [record for name, items in prompts.harmful.items()
               for record in judged_records("refusal", model, tokenizer, items, generation, judge, scorer, name)]  # fmt: skip
    records = {HARMFUL: harmful, BENIGN: judged_records("benign", model, tokenizer, prompts.benign, generation, judge, scorer)}
    return ModelAnswers(records, {task: refused_but_garbled(rs, scorer, generation) for task, rs in records.items()})


def metric_names() -> dict[str, tuple[str, str]]:
    """Each paired figure of an audit: its name and the (task, verdict) it is the share of."""
    names = {f"harmful_{name}": (HARMFUL, name) for name in (*VERDICTS, REFUSED_GARBLED)}
    names |= {("benign_compliance" if name == COMPLIED else f"benign_{name}"): (BENIGN, name) for name in VERDICTS}
    return names


def paired_figure(original: list[bool], quantized: list[bool]) -> dict[str, Any]:
    """The paired statistics of one per-prompt property: both rates, the difference with its 95% interval, the table and McNemar's p."""
    table = PairedTable.of(original, quantized)
    low, high = paired_difference_interval(table)
    return {
        "original": table.original_rate, "quantized": table.quantized_rate, "difference": table.difference,
        "ci_low": low, "ci_high": high, "ci_width": high - low, "n": table.n,
        "table": {"both": table.a, "original_only": table.b, "quantized_only": table.c, "neither": table.d},
        "mcnemar_p": mcnemar_exact_p(table.b, table.c),
    }  # fmt: skip


def paired_figures(original: ModelAnswers, quantized: ModelAnswers) -> dict[str, dict[str, Any]]:
    """Every paired figure (`metric_names`) of a quantized model against the original, for the tasks both answered."""
    return {
        name: paired_figure(original.indicator(task, verdict_name), quantized.indicator(task, verdict_name))
        for name, (task, verdict_name) in metric_names().items()
        if original.records.get(task)
    }


def transitions(original: ModelAnswers, quantized: ModelAnswers) -> dict[str, dict[str, int]]:
    """Per task, how many prompts went from each original verdict to each quantized verdict ("refused->complied": 3, ...)."""
    return {
        task: dict(Counter(f"{a.verdict}->{b.verdict}" for a, b in zip(records, quantized.records[task], strict=True)).most_common())
        for task, records in original.records.items()
    }


def flipped(original: ModelAnswers, quantized: ModelAnswers) -> dict[str, list[int]]:
    """The prompt indices (within their task) of each listed flip (`FLIPS`)."""
    return {
        name: [i for i, (a, b) in enumerate(zip(original.records[task], quantized.records[task], strict=True)) if (a.verdict, b.verdict) == (before, after)]
        for name, (task, before, after) in FLIPS.items()
    }


def changed(original: ModelAnswers, quantized: ModelAnswers, task: str) -> list[bool]:
    """Per prompt of `task`: whether the verdict differs between the two models."""
    return [a.verdict != b.verdict for a, b in zip(original.records[task], quantized.records[task], strict=True)]


def flip_prediction(kl: dict[str, list[float]], original: ModelAnswers, quantized: ModelAnswers) -> dict[str, float | None]:
    """How well the per-prompt first-token KL ranks the prompts whose verdict changed: the AUROC per task (None without both kinds)."""
    return {f"auroc_{task}": auroc(kl[task], changed(original, quantized, task)) for task in original.records if original.records[task]}


def pair_rows(label: str, prompts: AuditPrompts, original: ModelAnswers, quantized: ModelAnswers, kl: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One row per prompt for pairs.jsonl: the prompt, both answers with their verdicts, the flip and the first-token KL."""
    flip_of = {(task, before, after): name for name, (task, before, after) in FLIPS.items()}
    rows = []
    for task, records in original.records.items():
        sets = prompts.prompt_sets(task)
        for i, (a, b) in enumerate(zip(records, quantized.records[task], strict=True)):
            rows.append({
                "model": label, "task": task, "prompt_set": sets[i], "prompt": a.prompt,
                "category": a.category, "looks_harmful": a.looks_harmful,
                "original": _answer(a, original.refused_garbled[task][i]), "quantized": _answer(b, quantized.refused_garbled[task][i]),
                "flip": flip_of.get((task, a.verdict, b.verdict)), "changed": a.verdict != b.verdict,
                "kl_first_token": kl[task][i] if kl.get(task) else None,
            })  # fmt: skip
    return rows


def _answer(record: SafetyRecord, refused_garbled: bool) -> dict[str, Any]:
    return {"response": record.response, "verdict": record.verdict, "refused_garbled": refused_garbled,
            "nll": record.score.nll if record.score else None}  # fmt: skip
