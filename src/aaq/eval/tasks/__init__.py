"""Evaluation tasks: a registry the suite iterates. A new task is one module: an `EvalTask` subclass with `@register_task`.

A task reads and checks its inputs before any model work (`prepare`), then runs on the model and writes its
metrics, breakdowns and per-item records into the evaluation's `Findings`. Task names in `EvalConfig.tasks` are
the registered names, with arguments after a colon for tasks that take them (`lmeval:arc_easy,piqa`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any, ClassVar

from aaq.errors import AaqError

if TYPE_CHECKING:
    from aaq.eval.coherence import CoherenceScorer
    from aaq.eval.refusal import Judge
    from aaq.eval.suite import EvalConfig


@dataclass
class Findings:
    """What the tasks of one evaluation write into its report: metrics, breakdowns, item counts, details, per-item records."""

    metrics: dict[str, Any] = field(default_factory=dict)
    breakdowns: dict[str, Any] = field(default_factory=dict)
    n_items: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    generations: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TaskContext:
    """What a task runs with: the model and tokenizer, the evaluation's config, the refusal judge and the garbled check's scorer."""

    model: Any
    tokenizer: Any
    config: EvalConfig
    judge: Judge
    scorer: CoherenceScorer | None


class EvalTask:
    """One evaluation task; subclasses set `name` and `metrics` and implement `run` (and `prepare` when they read inputs).

    `generates_answers`: its answers get verdicts (refused / complied / garbled), so it needs the garbled check's
    scorer; it implements `answer` (the model's work) and `record` (the verdicts) instead of `run`. `takes_arguments`: it is named `name:ARGUMENTS` (and needs them). `metrics`: the report metrics it
    sets, with their definitions.
    """

    name: ClassVar[str] = ""
    metrics: ClassVar[dict[str, str]] = {}
    generates_answers: ClassVar[bool] = False
    takes_arguments: ClassVar[bool] = False

    def __init__(self, arguments: str = "") -> None:
        self.arguments = arguments

    def prepare(self, config: EvalConfig) -> Any:
        """Read and check what the task needs besides the model (before any model work); passed back to `run`."""
        return None

    def run(self, context: TaskContext, inputs: Any, findings: Findings) -> None:
        """Evaluate the model and write the results into `findings` (a task that generates answers: `answer`, then `record`)."""
        if not self.generates_answers:
            raise NotImplementedError
        self.record(context, inputs, self.answer(context, inputs), findings)

    def answer(self, context: TaskContext, inputs: Any) -> Any:
        """The evaluated model's answers (a task that generates answers), passed to `record`; needs no judge or scorer."""
        raise NotImplementedError

    def record(self, context: TaskContext, inputs: Any, answers: Any, findings: Findings) -> None:
        """Give `answers` their verdicts (the judge and the garbled check's scorer) and write the results into `findings`.

        Needs no evaluated model (`context.model` may be None): the suite can free it before the scorer is loaded.
        """
        raise NotImplementedError


_TASKS: dict[str, type[EvalTask]] = {}


def register_task(cls: type[EvalTask]) -> type[EvalTask]:
    """Class decorator registering an evaluation task under its `name`."""
    if not cls.name or cls.name in _TASKS:
        raise ValueError(f"evaluation task {cls.name!r} has no name or is registered twice")
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every registered task name, in registration order."""
    return list(_TASKS)


def task_class(name: str) -> type[EvalTask]:
    """The task registered under `name`."""
    if name not in _TASKS:
        raise AaqError(f"unknown evaluation task {name!r}; valid tasks: {task_usage()}")
    return _TASKS[name]


def task_usage() -> str:
    """The task names as a user writes them (with `:<...>` for tasks that take arguments)."""
    return ", ".join(f"{name}:<{name} tasks>" if cls.takes_arguments else name for name, cls in _TASKS.items())


def metric_definitions() -> dict[str, str]:
    """Every registered task's metrics with their definitions, in registration order."""
    return {metric: text for cls in _TASKS.values() for metric, text in cls.metrics.items()}


def each_task(entries: list[str]) -> list[EvalTask]:
    """The tasks `entries` ("name" or "name:arguments") name, one per task in first-named order, arguments of repeats joined."""
    arguments: dict[str, list[str]] = {}
    for entry in entries:
        name, _, given = entry.partition(":")
        arguments.setdefault(name.strip(), []).extend(part.strip() for part in given.split(",") if part.strip())
    return [task_class(name)(",".join(given)) for name, given in arguments.items()]


# The shipped tasks, in the order their metrics are listed in a report; each module registers its task.
for _module in ("perplexity", "refusal", "benign", "safetybench", "lmeval"):
    import_module(f"aaq.eval.tasks.{_module}")
