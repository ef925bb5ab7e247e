"""The task registry: a task registered in its own module is run by the suite, and its metrics reach the report."""

from typing import ClassVar

import pytest

from aaq.errors import AaqError
from aaq.eval import tasks
from aaq.eval.suite import EvalConfig, evaluate
from aaq.eval.tasks import EvalTask, register_task, task_names


@pytest.fixture
def counting_task(monkeypatch):
    """A task counting the model's parameters (registered for this test only), and the calls it saw."""
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))
    calls = []

    @register_task
    class CountingTask(EvalTask):
        name = "params"
        takes_arguments = True
        metrics: ClassVar[dict[str, str]] = {"params": "parameters of the model, divided by the argument"}

        def prepare(self, config):
            calls.append("prepare")
            return int(self.arguments)

        def run(self, context, inputs, findings):
            calls.append("run")
            findings.metrics["params"] = sum(p.numel() for p in context.model.parameters()) / inputs

    return calls


def test_a_registered_task_runs_in_the_suite_with_its_arguments(counting_task, tiny_llama, tiny_tokenizer):
    report = evaluate(tiny_llama, tiny_tokenizer, EvalConfig(tasks="params:1000"))
    assert report["metrics"]["params"] == sum(p.numel() for p in tiny_llama.parameters()) / 1000
    assert report["metric_definitions"]["params"].startswith("parameters")
    assert report["metrics"]["ppl"] is None  # every registered metric is listed, unset when its task did not run
    assert counting_task == ["prepare", "run"]
    assert report["coherence"] == {"check": False, "reason": "no task generates answers"}


def test_task_names_are_checked_against_the_registry(counting_task):
    assert task_names()[:5] == ["ppl", "refusal", "benign", "safetybench", "lmeval"]
    assert "params" in task_names()
    for wrong in ("params", "ppl:3", "nope"):
        with pytest.raises(AaqError, match="params:<params tasks>"):
            EvalConfig(tasks=wrong)


def test_a_task_name_cannot_be_registered_twice():
    class Twice(EvalTask):
        name = "ppl"

    with pytest.raises(ValueError, match="twice"):
        register_task(Twice)
