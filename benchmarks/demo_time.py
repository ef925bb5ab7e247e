"""Time every stage of `aaq demo` with its default settings and write JSON.

Runs `aaq.workflows.demo.run_demo(DemoConfig(out=...))` in this process, as `aaq demo` does, and records for
each stage (loading and preparing; the FP model's evaluation; each method's quantization and
evaluation) its wall-clock and CPU seconds, and within it the seconds of each part (threshold
calibration, perplexity, refusal, benign, SafetyBench; load, calibration data, quantization, GPTQ,
evaluation) from the runs' own records. By default the aaq cache starts empty, as on a fresh clone,
except for the demo's model files (`models/`, linked from the existing cache: fetching them is a
one-time download). With one torch thread (`--threads 1`, the default) a stage's CPU seconds are
what it takes on one idle core, whatever else the machine runs; `aaq demo` uses every core.
Writes benchmarks/results/demo_time.json (`--out`); the demo's own output goes to a temporary
folder, removed at the end.

    python benchmarks/demo_time.py [--threads 1] [--label after] [--keep-cache] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "demo_time.json"
# The demo announces each stage as "[k/n] ..." (aaq.workflows.demo).
STAGE = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


class _StageClock(logging.Handler):
    """Wall-clock and process CPU time at each stage announcement of the demo."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[str, float, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = STAGE.match(record.getMessage())
        if match:
            self.marks.append((match.group(3), time.perf_counter(), time.process_time()))


def _fresh_cache(root: Path) -> Path:
    """An empty aaq cache whose `models/` is the user's (the demo's model files), as on a fresh clone after the download."""
    from aaq.models.loading import cache_root

    root.mkdir(parents=True)
    (root / "models").symlink_to(cache_root() / "models", target_is_directory=True)
    return root


def _stage_details(out: Path) -> dict[str, dict]:
    """Seconds of each part of each stage, from the FP report and the runs' records."""
    details = {"fp": json.loads((out / "fp" / "report.json").read_text())["seconds"]}
    for run in sorted(p for p in out.iterdir() if (p / "run.json").is_file()):
        record = json.loads((run / "run.json").read_text())
        report = json.loads((run / "report.json").read_text())
        details[run.name] = {**record["timings"], "eval_tasks": report["seconds"]}
    return details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo itself uses every core)")
    parser.add_argument("--label", default="", help="a name for this measurement, kept in the JSON (e.g. before / after)")
    parser.add_argument("--keep-cache", action="store_true", help="use the existing aaq cache (thresholds, token ids) instead of an empty one")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="aaq_demo_time_"))
    if not args.keep_cache:
        os.environ["AAQ_CACHE_DIR"] = str(_fresh_cache(work / "cache"))
    from aaq.runs.records import provenance, write_json
    from aaq.workflows.demo import DemoConfig, run_demo

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    clock = _StageClock()
    logging.getLogger("aaq.workflows.demo").addHandler(clock)
    config = DemoConfig(out=work / "demo")
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    table = run_demo(config)
    end, cpu_end = time.perf_counter(), time.process_time()
    marks = [("load and prepare", start, cpu_start), *clock.marks, ("end", end, cpu_end)]
    stages = [
        {"stage": name, "wall_s": round(next_wall - wall, 1), "cpu_s": round(next_cpu - cpu, 1)}
        for (name, wall, cpu), (_, next_wall, next_cpu) in itertools.pairwise(marks)
    ]
    record = {
        "label": args.label,
        "total_wall_s": round(end - start, 1),
        "total_cpu_s": round(cpu_end - cpu_start, 1),
        "stages": stages,
        "details": _stage_details(config.out),
        "fresh_cache": not args.keep_cache,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "demo_config": {k: str(v) for k, v in vars(config).items()},
        "table": table,
        **provenance(),
    }
    write_json(args.out, record)
    shutil.rmtree(work)
    print(json.dumps({k: record[k] for k in ("label", "total_wall_s", "total_cpu_s", "stages")}, indent=2))


if __name__ == "__main__":
    main()
