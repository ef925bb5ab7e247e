"""lm-evaluation-harness tasks on a model already in memory (full precision, quantized or with an adapter).

The model is wrapped in lm-eval's `HFLM` as-is, so every lm-eval task a user has data for runs
through our own modules. Task names follow lm-eval; `include_path` adds folders of custom task YAMLs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aaq.data.corpus import datasets_offline
from aaq.errors import AaqError
from aaq.runtime.hub import unavailable_reason

log = logging.getLogger(__name__)


@dataclass
class LmEvalConfig:
    """Which lm-eval tasks to run and how: batch size, few-shot count, item limit and extra task folders.

    `include_defaults=False` indexes only `include_path` (much faster when only custom tasks are used).
    """

    tasks: Sequence[str]
    batch_size: int = 8
    num_fewshot: int | None = None
    limit: int | float | None = None
    include_path: str | Path | None = None
    include_defaults: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        self.tasks = [task.strip() for task in self.tasks if task.strip()]
        if not self.tasks:
            raise AaqError("no lm-eval task given; pass task names such as lmeval:arc_easy,piqa")


def _numeric_metrics(metrics: dict) -> dict[str, float]:
    # lm-eval keys look like "acc,none" / "acc_stderr,none"; keep the metric name, drop the filter suffix.
    values = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key.split(",")[0]] = float(value)
    return values


def prepare_lmeval(config: LmEvalConfig):
    """lm-eval's task manager for `config`, with every task's data in the local cache.

    Checked before any model work: an unknown task, or a data set that is neither cached nor
    downloadable right now (no network, offline mode), is a one-line AaqError.
    """
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise AaqError('lm-eval is not installed; run pip install "lm-eval>=0.4.5,<0.5" (or pip install aaq[eval])') from error

    manager = TaskManager(
        include_path=str(config.include_path) if config.include_path else None,
        include_defaults=config.include_defaults,
    )
    unknown = [task for task in config.tasks if task not in manager.all_tasks]
    if unknown:
        raise AaqError(f"unknown lm-eval task(s) {unknown}; check the names with `lm-eval --tasks list`")
    if _loads_from_cache(manager, config.tasks):
        return manager
    tasks = ", ".join(config.tasks)
    reason = unavailable_reason()
    if reason is not None:
        raise AaqError(
            f"the data of lm-eval task(s) {tasks} is not in the local datasets cache and the hub is unavailable ({reason}); "
            "run once where the hub is reachable to cache it, or drop those tasks from {setting}",
            setting="tasks",
        )
    log.info("lm-eval: downloading the data of %s", tasks)
    try:
        manager.load(list(config.tasks))
    except Exception as error:  # as above
        raise AaqError(f"could not load the data of lm-eval task(s) {tasks} ({_first_line(error)}); drop those tasks from {{setting}}", setting="tasks") from error
    return manager


def _loads_from_cache(manager, tasks: Sequence[str]) -> bool:
    """Whether the data of every task loads from the local datasets cache."""
    try:
        with datasets_offline():
            manager.load(list(tasks))
    except Exception:  # noqa: BLE001 (lm-eval and datasets raise many unrelated types for data they cannot find)
        return False
    return True


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def lmeval_tasks(model, tokenizer, config: LmEvalConfig, manager=None) -> dict[str, dict[str, float]]:
    """Return {task: {metric: value}} for the lm-eval tasks in `config`, run on the given model and tokenizer.

    `manager`: the task manager `prepare_lmeval(config)` returned (prepared here when not given).
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = manager or prepare_lmeval(config)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size, device=device)
    log.info("lm-eval: running %s", ", ".join(config.tasks))
    # prepare_lmeval put every data set in the local cache: read it there, without hub requests.
    with datasets_offline():
        results = simple_evaluate(
            model=lm,
            tasks=list(config.tasks),
            num_fewshot=config.num_fewshot,
            limit=config.limit,
            task_manager=manager,
            log_samples=False,
            random_seed=config.seed,
            numpy_random_seed=config.seed,
            torch_random_seed=config.seed,
            fewshot_random_seed=config.seed,
        )
    return {task: _numeric_metrics(metrics) for task, metrics in results["results"].items()}
