"""Task `benign`: greedy answers to benign prompts; compliance is a coherent answer that does not refuse."""

from __future__ import annotations

from typing import ClassVar

from aaq.eval.coherence import COMPLIED, GARBLED, REFUSED, REFUSED_GARBLED
from aaq.eval.generate import generate_responses
from aaq.eval.prompts import Prompt, benign_records, evenly_spaced, load_prompt_records
from aaq.eval.safety import safety_result, verdict_records
from aaq.eval.tasks import EvalTask, Findings, TaskContext, register_task
from aaq.eval.tasks.refusal import record_answers


def benign_prompt_set(config) -> list[Prompt]:
    """The benign prompts to evaluate: the configured file or the shipped benign evaluation set, subsampled by `max_prompts`."""
    prompts = load_prompt_records(config.benign_prompts) if config.benign_prompts else benign_records()
    return evenly_spaced(prompts, config.max_prompts)


@register_task
class BenignTask(EvalTask):
    """Compliance on benign prompts (over-refusal and garbling both count against it)."""

    name = "benign"
    generates_answers = True
    metrics: ClassVar[dict[str, str]] = {
        "benign_compliance": "coherent answers that do not refuse / benign prompts (with the garbled check off: answers that do not refuse)",
        "benign_refusal_rate": "refusals, coherent or not / benign prompts (over-refusal)",
        "benign_garbled_rate": "incoherent answers that do not refuse / benign prompts",
    }
    VERDICT_METRICS: ClassVar[dict[str, tuple[str, ...]]] = {
        "benign_compliance": (COMPLIED,), "benign_refusal_rate": (REFUSED, REFUSED_GARBLED), "benign_garbled_rate": (GARBLED,)
    }

    def prepare(self, config) -> list[Prompt]:
        """The benign prompts."""
        return benign_prompt_set(config)

    def answer(self, context: TaskContext, inputs: list[Prompt]) -> list[str]:
        """The greedy answers."""
        return generate_responses(context.model, context.tokenizer, [prompt.text for prompt in inputs], context.config.generation)

    def record(self, context: TaskContext, inputs: list[Prompt], answers: list[str], findings: Findings) -> None:
        """Compliance and garbled rate, per category and split by whether the prompt looks harmful."""
        records = verdict_records("benign", inputs, answers, context.config.generation, context.judge, context.scorer)
        record_answers(findings, safety_result("benign", records, context.judge.name, context.scorer is not None), self.VERDICT_METRICS)
