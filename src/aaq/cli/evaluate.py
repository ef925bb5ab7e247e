"""Evaluate a model or a quantized run folder (`aaq eval`).

A full-precision model, a model with a LoRA adapter, or an aaq run folder; writes report.json, report.md and generations.jsonl
to --out.
"""

import argparse
from pathlib import Path

from aaq.cli import options
from aaq.workflows.run import evaluate_source

NAME = "eval"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The eval command's flags."""
    p.add_argument("--model", required=True, help="aaq run folder, local folder, .gguf file, hub id or alias")
    p.add_argument("--adapter", help="peft LoRA adapter folder merged into --model before evaluation")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed recorded in the report")
    options.add_evaluation(p, default_tasks="ppl,refusal,benign,safetybench")
    options.add_placement(p)


def run(args: argparse.Namespace) -> int:
    """Evaluate and write report.json / report.md / generations.jsonl."""
    report = evaluate_source(args.model, options.evaluation(args), args.out, adapter=args.adapter, placement=options.placement(args))
    print(f"{args.model}: {options.summary(report['metrics'])}; report in {args.out / 'report.md'}")
    return 0
