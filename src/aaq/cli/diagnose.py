"""Measure how an aligned model and its unaligned reference differ, and whether AAQ's push can see it (`aaq diagnose`).

Both models run over the calibration windows a quantize run with the same settings and seed would use, the chat-formatted benign
training prompts and the HarmBench test tuning split; per text: KL(aligned || reference) and, per choice of push tokens I_d, the
reference's mass and the contrast sum |p_a - p_b| on I_d, with a warning when the run's push sees nothing (contrast < 0.01).
"""

import argparse
import dataclasses
from pathlib import Path

from aaq.api import QuantizeConfig
from aaq.cli import options
from aaq.recipes import load_recipe
from aaq.workflows.diagnose import DiagnosticsConfig, diagnose_sources, push_of

NAME = "diagnose"


def positive_ints(text: str) -> tuple[int, ...]:
    """A comma list of positive integers (argparse reports anything else in one line)."""
    if not all(part.strip().isdigit() and int(part) > 0 for part in text.split(",")):
        raise argparse.ArgumentTypeError(f"must be a comma list of positive integers, got {text!r}")
    return tuple(int(part) for part in text.split(","))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The diagnose command's flags."""
    p.add_argument("--model", required=True, help="the aligned model (local folder, .gguf file, hub id or alias)")
    p.add_argument("--adapter", help="peft LoRA adapter folder merged into --model (e.g. one made by aaq make-demo-pair)")
    p.add_argument("--reference", required=True, help="the unaligned reference sharing the tokenizer")
    p.add_argument("--recipe", type=Path, help="YAML recipe whose calibration, seed and apc push tokens are diagnosed (flags override it)")
    p.add_argument("--seed", type=int, help="seed of the calibration windows (default: recipe or 0)")
    p.add_argument("--out", type=Path, help="folder for diagnostics.json and diagnostics.md")
    options.add_calibration_data(p)
    options.add_push(p)
    p.add_argument("--push-ks", type=positive_ints, default=(10, 100, 1000), help="comma list of top-k sizes at which every kind of push tokens is measured")
    p.add_argument("--answer-tokens", type=int, default=8, help="first answer tokens measured per chat prompt")
    p.add_argument("--max-prompts", type=int, help="an evenly spaced subset of at most N prompts per prompt set")
    options.add_placement(p)


def diagnostics_config(args: argparse.Namespace) -> DiagnosticsConfig:
    """The DiagnosticsConfig a recipe (calibration, seed, apc push tokens) plus the explicitly given flags describe."""
    recipe = QuantizeConfig() if args.recipe is None else load_recipe(args.recipe)
    calibration = dataclasses.replace(recipe.calibration, **options.calibration_changes(args))
    return DiagnosticsConfig(calibration, recipe.seed if args.seed is None else args.seed, push_of(recipe, args.push_tokens, args.push_k),
                             args.push_ks, args.answer_tokens, args.max_prompts)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Diagnose the pair: print the tables and the warning, write them with --out."""
    result, title = diagnose_sources(args.model, args.reference, diagnostics_config(args), args.adapter, options.placement(args), args.out)
    print(result.markdown(title) + ("" if args.out is None else f"\nwrote {args.out / 'diagnostics.json'} and {args.out / 'diagnostics.md'}"))
    return 0
