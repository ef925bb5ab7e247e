"""Task `lmeval:<tasks>`: any lm-eval harness tasks, run on the evaluated model through `HFLM`."""

from __future__ import annotations

from aaq.eval.lmeval import LmEvalConfig, lmeval_tasks, prepare_lmeval
from aaq.eval.tasks import EvalTask, Findings, TaskContext, register_task


@register_task
class LmEvalTask(EvalTask):
    """The lm-eval tasks named in the arguments (`lmeval:arc_easy,piqa`), their data read from the local cache."""

    name = "lmeval"
    takes_arguments = True

    def settings(self, config) -> LmEvalConfig:
        """The lm-eval settings of these tasks under the evaluation's config."""
        return LmEvalConfig(self.arguments.split(","), batch_size=config.batch_size, seed=config.seed)

    def prepare(self, config):
        """lm-eval's task manager, with every task's data in the local cache (downloaded now if the hub answers)."""
        return prepare_lmeval(self.settings(config))

    def run(self, context: TaskContext, inputs, findings: Findings) -> None:
        """Every task's numeric metrics under `lmeval`."""
        results = lmeval_tasks(context.model, context.tokenizer, self.settings(context.config), inputs)
        findings.metrics["lmeval"] = results
        findings.n_items["lmeval_tasks"] = len(results)
