"""Task `ppl`: perplexity on held-out text."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from aaq.data.corpus import corpus_documents
from aaq.eval.perplexity import evaluate_perplexity
from aaq.eval.tasks import EvalTask, Findings, TaskContext, register_task


@register_task
class PerplexityTask(EvalTask):
    """Perplexity on the held-out windows `EvalConfig.ppl` describes."""

    name = "ppl"
    metrics: ClassVar[dict[str, str]] = {"ppl": "perplexity on held-out text"}

    def prepare(self, config) -> None:
        """Check that the held-out text can be read."""
        corpus_documents(config.ppl.dataset, "heldout")

    def run(self, context: TaskContext, inputs: None, findings: Findings) -> None:
        """Perplexity, its token count and details."""
        result = evaluate_perplexity(context.model, context.tokenizer, context.config.ppl)
        findings.metrics["ppl"] = result.ppl
        findings.n_items["ppl_tokens"] = result.n_tokens
        findings.details["ppl"] = dataclasses.asdict(result)
