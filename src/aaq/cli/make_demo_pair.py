"""Train the LoRA safety adapter that turns smollm2-135m-instruct into a demo aligned model (`aaq make-demo-pair`).

Refusals on HarmBench test `standard` minus the 40-behaviour tuning split, self-distilled answers on the benign training prompts,
KL to the base on calibration text (preset anchored, behind smollm2-135m-safe; unanchored drops it). HarmBench val is never used.
"""

import argparse
import dataclasses
from pathlib import Path

from aaq.workflows.demo_pair import PAIR_PRESETS, PairConfig, make_demo_pair

NAME = "make-demo-pair"
D = PairConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The make-demo-pair command's flags, one per training setting."""
    p.add_argument("--preset", choices=list(PAIR_PRESETS), default="anchored", help="the settings to start from")
    p.add_argument("--base", help=f"model the adapter is trained on, the unaligned reference (default: {D.base})")
    p.add_argument("--out", type=Path, default=D.out, help="adapter folder to write")
    p.add_argument("--rank", type=int, help=f"LoRA rank, all linear layers but lm_head (default: {D.rank})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default: {D.alpha})")
    p.add_argument("--epochs", type=int, help=f"passes over the training examples (default: {D.epochs})")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate, linear decay to 0 (default: {D.lr})")
    p.add_argument("--batch-size", type=int, help=f"examples per step (default: {D.batch_size})")
    p.add_argument("--answer-tokens", type=int, help=f"length cap of self-distilled answers (default: {D.answer_tokens})")
    p.add_argument("--kl-weight", type=float, help="weight of KL(base || adapted) on plain text (default: 1.0; 0 with --preset unanchored)")
    p.add_argument("--seed", type=int, help=f"seed of the data order, templates and LoRA init (default: {D.seed})")


def run(args: argparse.Namespace) -> int:
    """Train the adapter and say how to evaluate it."""
    fields = [f.name for f in dataclasses.fields(PairConfig) if f.name != "preset" and getattr(args, f.name, None) is not None]
    config = PairConfig.from_preset(args.preset, **{name: getattr(args, name) for name in fields})
    print(f"wrote the safety adapter to {make_demo_pair(config)}; evaluate it with: aaq eval --model {config.base} --adapter {config.out}")
    return 0
