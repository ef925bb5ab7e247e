"""Helpers of the benchmark scripts that drive `aaq` on the command line: one run as a subprocess, its folder, record and
verdicts, the statistics and figures of the studies."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any


def benign_train_prompts() -> str:
    """The shipped benign *training* prompts of the aaq on the path (tuning data: the demo adapters were trained on them)."""
    return str(resources.files("aaq") / "resources" / "benign_train_prompts.jsonl")


def tuning_eval_flags(benign_prompts: int, tasks: str = "ppl,refusal,benign") -> list[str]:
    """Evaluation flags on tuning data only: the HarmBench test tuning split, benign training prompts, 32 new tokens, PPL on 8 x 512."""
    return [
        "--tasks", tasks, "--harmful-prompts", "harmbench-tuning", "--benign-prompts", benign_train_prompts(),
        "--max-prompts", str(benign_prompts), "--max-new-tokens", "32", "--ppl-samples", "8", "--eval-batch-size", "64",
    ]  # fmt: skip


def run_aaq(args: list[str], log: Path) -> tuple[int, float, float]:
    """Run `python -m aaq ARGS` with one torch thread, output to `log`; (exit status, CPU seconds, wall seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "aaq", *args], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return rc.returncode, cpu, time.perf_counter() - wall


def run_folder(work: Path, key: str) -> Path:
    """WORK/runs/KEY, where one run of a study writes its outputs."""
    return work / "runs" / key


def fresh_run_folder(work: Path, key: str) -> Path:
    """The run's folder, removed (its parent made) so that a run interrupted half-way is redone from scratch."""
    folder = run_folder(work, key)
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def run_outputs(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evaluation report (report.json) and run record (run.json, empty for `aaq eval`) an aaq command wrote."""
    run = folder / "run.json"
    return json.loads((folder / "report.json").read_text()), json.loads(run.read_text()) if run.is_file() else {}


def drop_bulky_outputs(folder: Path) -> None:
    """Delete a finished run's weights and calibration work folders: its record and generations keep what a study reads."""
    for name in ("aaq_model.safetensors", "transforms.safetensors"):
        (folder / name).unlink(missing_ok=True)
    for work in ("teacher_cache", "calibration"):
        shutil.rmtree(folder / work, ignore_errors=True)


def store_record(record: dict[str, Any], path: Path, records_copy: Path | None, generations: Path | None) -> None:
    """Write a run's record to `path`; with `records_copy`, copy it there too, with the run's generations when given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    if records_copy is not None:
        records_copy.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, records_copy / path.name)
        if generations is not None:
            shutil.copy(generations, records_copy / f"{path.stem}.generations.jsonl")


def read_records(folder: Path) -> dict[str, dict[str, Any]]:
    """The run records (``*.json``) in ``folder``, by run name, in name order; their generations files are not read."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def verdicts(generations: Path, task: str) -> dict[str, str]:
    """Prompt -> verdict of one task's answers (refusal: harmful prompts; benign) in an evaluation's generations.jsonl."""
    rows = [json.loads(line) for line in generations.read_text().splitlines() if line.strip()]
    return {row["prompt"]: row["verdict"] for row in rows if row["task"] == task}


def shares(by_prompt: dict[str, str]) -> dict[str, float]:
    """The share of each verdict (refused, complied, garbled) among the answers."""
    n = len(by_prompt) or 1
    return {v: sum(x == v for x in by_prompt.values()) / n for v in ("refused", "complied", "garbled")}


def write_report(
    body: dict[str, Any],
    out: Path,
    plot: Callable[[dict[str, Any], Path], None],
    plot_path: Path,
    markdown: Callable[[dict[str, Any]], str],
    has_rows: bool,
) -> None:
    """Write a study's JSON to `out`, its plot when it has rows, and print its markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=1) + "\n")
    if has_rows:
        plot(body, plot_path)
    print(markdown(body))


def pyplot() -> Any:
    """`matplotlib.pyplot` on the file-only Agg backend (the scripts run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    """Lay out `figure`, write it to `path` (creating the folder) and close it."""
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot().close(figure)


# Two-sided 95% quantiles of Student's t by degrees of freedom (studies here pair at most 10 seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(values: list[float]) -> dict[str, Any]:
    """Mean of paired differences with its 95% t-interval (df = n - 1; none for a single value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values), "values": values}
    half = T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values), "values": values}


def mean_sd(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (None for a single value) of a list of per-seed figures."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None, "n": len(values), "values": values}
