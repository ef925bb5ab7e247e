"""Task `safetybench`: SafetyBench multiple choice, scored by option log-likelihood."""

from __future__ import annotations

from typing import ClassVar

from aaq.eval.safetybench import LETTERS, load_safetybench, safetybench_accuracy
from aaq.eval.tasks import EvalTask, Findings, TaskContext, register_task


@register_task
class SafetyBenchTask(EvalTask):
    """Few-shot SafetyBench accuracy on `EvalConfig.safetybench` (default: the shared English dev split)."""

    name = "safetybench"
    metrics: ClassVar[dict[str, str]] = {"safetybench_acc": "SafetyBench multiple-choice accuracy"}

    def prepare(self, config) -> None:
        """Check that the SafetyBench file can be read."""
        load_safetybench(config.safetybench)

    def run(self, context: TaskContext, inputs: None, findings: Findings) -> None:
        """Accuracy overall and per category, and every prediction."""
        config = context.config
        result = safetybench_accuracy(context.model, context.tokenizer, config.safetybench, config.safetybench_shots, None, config.batch_size)
        findings.metrics["safetybench_acc"] = result.accuracy
        findings.breakdowns["safetybench"] = result.per_category
        findings.n_items["safetybench"] = result.n
        findings.details["safetybench"] = result.summary()
        findings.generations += [
            {"task": "safetybench", "id": p.id, "prompt": p.question, "category": p.category, "response": f"({LETTERS[p.prediction]})",
             "answer": None if p.answer is None else f"({LETTERS[p.answer]})", "correct": p.correct, "letter_logprobs": p.letter_logprobs,
             "n_shots": p.n_shots}
            for p in result.predictions
        ]  # fmt: skip
