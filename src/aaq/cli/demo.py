"""Compare FP, QuaRot, OSTQuant and AAQ (and RTN on request) on the demo's aligned model, for safety and utility (`aaq demo`).

Quantizes the aligned model (default smollm2-135m-safe-unanchored, at W4A5KV5) with every method at the same bits and calibration data, evaluates each
and the FP model, and writes report.md, report.json and safety_vs_ppl.png to --out; --full uses the paper's settings (hours).
"""

import argparse
import dataclasses
from pathlib import Path

from aaq.cli import options
from aaq.workflows.demo import DEMO_METHODS, DemoConfig, run_demo

NAME = "demo"
DEFAULTS = DemoConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo command's flags, with the demo's defaults."""
    p.add_argument("--model", default=DEFAULTS.model, help="the aligned model to quantize")
    p.add_argument("--reference", default=DEFAULTS.reference, help="the unaligned reference of AAQ's push term")
    p.add_argument("--bits", default=DEFAULTS.bits, help="bit widths of every quantized variant")
    p.add_argument("--methods", default=",".join(DEFAULTS.methods), help=f"comma list of the compared methods, some of {','.join(DEMO_METHODS)}")
    p.add_argument("--out", type=Path, default=DEFAULTS.out, help="output folder")
    p.add_argument("--tasks", default=DEFAULTS.tasks, help="evaluation tasks for every variant (see aaq eval --help)")
    p.add_argument("--steps", type=int, help=f"transform steps of OSTQuant and AAQ (default: {DEFAULTS.steps}, 150 with --full)")
    p.add_argument("--lam", type=float, help=f"AAQ's push weight lambda (default: {DEFAULTS.lam}, 0.1 with --full)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of calibration windows, rotations and evaluation")
    p.add_argument("--full", action="store_true", help="paper-sized calibration (128 x 2048 tokens, 150 steps) and evaluation")
    p.add_argument("--save-models", action="store_true", help="also save each variant's quantized weights (exportable run folders)")
    options.add_placement(p)


def run(args: argparse.Namespace) -> int:
    """Run the method comparison and print its table."""
    fields = {name: getattr(args, name) for name in ("model", "reference", "bits", "out", "tasks", "seed", "save_models")}
    config = DemoConfig(**fields, methods=tuple(args.methods.split(",")), placement=options.placement(args))
    config = config.paper_sized() if args.full else config
    print(run_demo(dataclasses.replace(config, **{name: getattr(args, name) for name in ("steps", "lam") if getattr(args, name) is not None})))
    return 0
