"""Quantize a model and save it with its run record (`aaq quantize`).

Fused norms, rotations, RTN/GPTQ weights, fake-quantized activations and KV cache; the run folder --out holds the weights and
run.json (config, seed, versions, git commit, timings, metrics).
"""

import argparse
import sys
from pathlib import Path

from aaq.cli import config, options
from aaq.runtime import distributed
from aaq.workflows.run import RunConfig, run_quantization

NAME = "quantize"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The quantize command's flags."""
    p.add_argument("--model", required=True, help="local folder, .gguf file, hub id, or alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    config.add_quantize_config(p)
    options.add_placement(p)
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out (finished GPTQ layers, calibration checkpoint)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after quantization")
    options.add_evaluation(p, default_tasks="ppl")
    p.add_argument("--overwrite", action="store_true", help="replace the aaq output in --out (removes only files aaq wrote there; anything else is an error)")


def run(args: argparse.Namespace) -> int:
    """Quantize, save the model, evaluate it, write run.json."""
    quantize = config.quantize_config(args)
    run = RunConfig(
        model=args.model, out=args.out, quantize=quantize, placement=options.placement(args), reference=args.reference, resume=args.resume,
        evaluation=None if args.no_eval else options.evaluation(args, seed=quantize.seed), overwrite=args.overwrite, command="aaq " + " ".join(sys.argv[1:]),
    )  # fmt: skip
    with distributed.process_group(run.placement.compute_device):
        result = run_quantization(run)
    if distributed.launched().is_main:
        print(f"{quantize.method.name} {quantize.bits}: {options.summary(result.record['metrics'])}; saved to {args.out}")
    return 0
