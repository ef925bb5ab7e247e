"""Answers paired by prompt: each model's verdicts from the evaluation suite, the flips, and the paired figures.

Every answer gets the evaluation suite's verdict (`aaq.eval.safety.judged_records`: refused, refused_garbled,
complied or garbled, with the original model as the garbled check's scorer). The audit's figures are the shares
`aaq eval` reports (harmful complied, refused, garbled, refused-but-garbled; benign compliance, refusals of either
kind, garbled), here paired by prompt between the original and a quantized model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from aaq.auditing.stats import PairedTable, auroc, mcnemar_exact_p, paired_difference_interval
from aaq.eval.coherence import COMPLIED, GARBLED, REFUSED, REFUSED_GARBLED, VERDICTS, CoherenceScorer
from aaq.eval.generate import GenerationConfig
from aaq.eval.prompts import Prompt
from aaq.eval.refusal import Judge
from aaq.eval.safety import SafetyRecord, judged_records

HARMFUL, BENIGN = "harmful", "benign"
REFUSALS = (REFUSED, REFUSED_GARBLED)
# The flips an audit lists prompt by prompt: (prompts, original verdict, quantized verdicts). A refusal that turned
# into noise is refused -> garbled whether or not the noise still opens with a refusal phrase.
FLIPS = {
    "refused_to_complied": (HARMFUL, REFUSED, (COMPLIED,)),
    "refused_to_garbled": (HARMFUL, REFUSED, (GARBLED, REFUSED_GARBLED)),
    "complied_to_refused": (BENIGN, COMPLIED, REFUSALS),
}
# Each paired figure: (prompts, the verdicts it counts); the same shares as `aaq eval`'s refusal and benign metrics.
FIGURES = {
    "harmful_complied": (HARMFUL, (COMPLIED,)),
    "harmful_refused": (HARMFUL, (REFUSED,)),
    "harmful_garbled": (HARMFUL, (GARBLED,)),
    "harmful_refused_garbled": (HARMFUL, (REFUSED_GARBLED,)),
    "benign_compliance": (BENIGN, (COMPLIED,)),
    "benign_refused": (BENIGN, REFUSALS),
    "benign_garbled": (BENIGN, (GARBLED,)),
}


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
    """One model's judged answers to the audit's prompts, by task."""

    records: dict[str, list[SafetyRecord]]

    def indicator(self, task: str, verdicts: tuple[str, ...]) -> list[bool]:
        """Per prompt of `task`: whether the answer's verdict is one of `verdicts`."""
        return [record.verdict in verdicts for record in self.records[task]]

    def shares(self) -> dict[str, dict[str, float]]:
        """The share of each verdict among each task's answers."""
        return {task: {name: sum(self.indicator(task, (name,))) / len(records) for name in VERDICTS}
                for task, records in self.records.items() if records}  # fmt: skip


def model_answers(
    model, tokenizer, prompts: AuditPrompts, generation: GenerationConfig, judge: Judge, scorer: CoherenceScorer | None
) -> ModelAnswers:
    """The model's greedy answers to every audit prompt with their verdicts (the evaluation suite's refusal and benign tasks)."""
    harmful = [record for name, items in prompts.harmful.items()
               for record in judged_records("refusal", model, tokenizer, items, generation, judge, scorer, name)]  # fmt: skip
    return ModelAnswers({HARMFUL: harmful, BENIGN: judged_records("benign", model, tokenizer, prompts.benign, generation, judge, scorer)})


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
    """Every paired figure (`FIGURES`) of a quantized model against the original, for the tasks both answered."""
    return {
        name: paired_figure(original.indicator(task, verdicts), quantized.indicator(task, verdicts))
        for name, (task, verdicts) in FIGURES.items()
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
        name: [i for i, (a, b) in enumerate(zip(original.records[task], quantized.records[task], strict=True)) if a.verdict == before and b.verdict in after]
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
    flip_of = {(task, before, verdict): name for name, (task, before, after) in FLIPS.items() for verdict in after}
    rows = []
    for task, records in original.records.items():
        sets = prompts.prompt_sets(task)
        for i, (a, b) in enumerate(zip(records, quantized.records[task], strict=True)):
            rows.append({
                "model": label, "task": task, "prompt_set": sets[i], "prompt": a.prompt,
                "category": a.category, "looks_harmful": a.looks_harmful,
                "original": _answer(a), "quantized": _answer(b),
                "flip": flip_of.get((task, a.verdict, b.verdict)), "changed": a.verdict != b.verdict,
                "kl_first_token": kl[task][i] if kl.get(task) else None,
            })  # fmt: skip
    return rows


def _answer(record: SafetyRecord) -> dict[str, Any]:
    return {"response": record.response, "verdict": record.verdict, "nll": record.score.nll if record.score else None}
