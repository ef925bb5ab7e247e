"""Measured peak memory of each stage of an `aaq quantize` run next to the planner's estimate.

Runs one quantization (a recipe, default the AAQ demo recipe) with perplexity evaluation, reads
the stages' seconds and peak memory that the run records (on a CPU the anonymous part of the
resident set: the pages of a memory-mapped weight file are counted in the resident set while
mapped but are reclaimable page cache), estimates the same stages from the model config alone
(`aaq.runtime.memory.estimate`, what `aaq plan` prints), and writes both with their ratio.
Run it alone on the machine, once per model and dtype:

    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --model smollm2-135m-safe --reference smollm2-135m-instruct --dtype float32
    OMP_NUM_THREADS=1 python benchmarks/memory_plan.py --model /tmp/llama-1b --reference /tmp/llama-1b --dtype bfloat16

`--no-eval` stops after the run folder is saved (the calibration stage's peak in minutes at 1B:
recipes/aaq_paper_step_cpu.yaml). The script runs against whichever aaq is on the path, so the
same command measures an older commit (PYTHONPATH=<its worktree>/src); `--from` re-compares a
measurement with the current planner.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig
from aaq.models.loading import load_model_config
from aaq.recipes import load_recipe
from aaq.runs.records import provenance, write_json
from aaq.runtime.devices import Placement
from aaq.runtime.memory import GiB, estimate
from aaq.workflows.run import RunConfig, run_quantization

RESULTS = Path(__file__).parent / "results"
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "aaq_demo.yaml"


def measured_stages(args: argparse.Namespace, saved: dict | None, quantize, placement: Placement, evaluation: EvalConfig) -> tuple[dict, dict]:
    """Each stage's measured seconds and peaks from one run (or from `saved`, the JSON `--from` names), and the run's metrics."""
    if saved is not None:
        keep = ("estimate", "ratio", "stage")
        return {row["stage"]: {k: v for k, v in row.items() if k not in keep} for row in saved["stages"]}, saved["metrics"]
    with tempfile.TemporaryDirectory(prefix="aaq-memory-plan-") as work:
        run = RunConfig(model=args.model, out=Path(work) / "run", quantize=quantize, placement=placement, reference=args.reference, evaluation=evaluation)
        record = run_quantization(run).record
    return record["stages"], record["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-safe")
    parser.add_argument("--reference", default="smollm2-135m-instruct")
    parser.add_argument("--recipe", type=Path, default=RECIPE)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-eval", action="store_true", help="no evaluation after the run (default: perplexity on 8 x 512 tokens)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/memory_plan_<model>_<dtype>.json)")
    parser.add_argument("--from", dest="from_json", type=Path, default=None, help="compare the planner with the peaks measured in this JSON (an earlier output) instead of running again; rewrites it")
    args = parser.parse_args()
    saved = None if args.from_json is None else json.loads(args.from_json.read_text())
    if saved is not None:
        args.model, args.dtype, args.recipe = saved["model"], saved["dtype"], Path(saved["recipe"])
        args.no_eval = saved.get("evaluation", "ppl") is None
        args.out = args.out or args.from_json
    quantize = load_recipe(args.recipe)
    placement = Placement(device=args.device, dtype=args.dtype)
    evaluation = None if args.no_eval else EvalConfig(tasks="ppl", ppl=PerplexityConfig(n_samples=8, seq_len=512))
    stages, metrics = measured_stages(args, saved, quantize, placement, evaluation)
    teacher_batch = quantize.method.training.teacher_batch or quantize.calibration.batch_size
    planned = {stage.stage: stage for stage in estimate(load_model_config(args.model), quantize, placement, evaluation, teacher_batch)}
    rows = []
    for name, measured in stages.items():
        plan = planned.get(name)
        # On a CPU the anonymous part of the resident set: mapped weight files' clean pages are not needed memory.
        peak = measured["peak_device"] or measured["peak_host_anon"] or measured["peak_host"]
        expected = None if plan is None else (plan.device or plan.host)
        rows.append({"stage": name, **measured, "estimate": None if plan is None else asdict(plan), "ratio": None if not expected else peak / expected})
        ratio = "" if not expected else f"   estimate {expected / GiB:6.2f} GiB   measured/estimate {peak / expected:5.2f}"
        print(f"{name:<18} {measured['seconds']:8.1f} s   peak {peak / GiB:6.2f} GiB{ratio}")
    out = args.out or RESULTS / f"memory_plan_{Path(args.model).name}_{args.dtype}.json"
    measured_at = provenance()
    if saved is not None:  # the measurement's own provenance stays; the estimates are of this commit
        measured_at = {key: saved[key] for key in measured_at if key in saved} | {"estimates_git_commit": measured_at["git_commit"]}
    record = {"model": args.model, "dtype": args.dtype, "recipe": str(args.recipe), "evaluation": None if evaluation is None else "ppl", "metrics": metrics}
    write_json(out, {**record, "stages": rows, **measured_at})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
