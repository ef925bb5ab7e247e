"""Estimate each stage's peak memory from the model config alone, and what fits a device budget (`aaq plan`).

Reads only the model's config (no weights) and prints, per stage of `aaq quantize` with the same options, the estimated peak
device and host memory and the disk the teacher cache and run folder take; --budget searches the settings (teacher batch,
activation checkpointing, calibration and evaluation batch, offloading) under which every stage fits.
"""

import argparse

from aaq.cli import config, options
from aaq.runtime.memory import format_plan, plan_memory

NAME = "plan"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The plan command's flags: quantize's, plus --budget."""
    p.add_argument("--model", required=True, help="local folder, .gguf file, config.json file, hub id, or alias (only its config is read)")
    config.add_quantize_config(p)
    options.add_placement(p)
    options.add_evaluation(p, default_tasks="ppl")
    p.add_argument("--no-eval", action="store_true", help="plan without the evaluation stage")
    p.add_argument("--budget", help="device memory to fit, e.g. 24GiB or 80GB")


def run(args: argparse.Namespace) -> int:
    """Print the memory plan of a quantize run with these options."""
    quantize, placement = config.quantize_config(args), options.placement(args)
    plan = plan_memory(args.model, quantize, placement, None if args.no_eval else options.evaluation(args), args.budget, args.reference)
    print(f"{args.model}: {quantize.method.name} {quantize.bits} on {placement.compute_device}\n{format_plan(plan, options.flag)}")
    return 0
