"""Did quantization cost a model its safety? Audit quantized checkpoints against their original (`aaq audit`).

Any quantized checkpoint (GGUF, compressed-tensors, aaq runs and exports, transformers-quantized folders) answers the same harmful and
benign prompts as the full-precision original; per model, paired by prompt: refused / complied / garbled shares with their changes
and 95% intervals, McNemar's exact test, the flips, the perplexity ratio and the first-token KL (--signal-only: that alone, in
seconds). --fail-if sets limits, e.g. "harmful_complied>+0.05,benign_compliance<-0.05" (signed: change against the original;
unsigned: the quantized model's own figure); a model beyond a limit makes the command exit with status 3.
"""

import argparse
import sys
from pathlib import Path

from aaq.auditing import AuditConfig, audit
from aaq.auditing.gate import CHANGE_METRICS, LEVEL_METRICS
from aaq.auditing.report import AUDIT_MD
from aaq.cli import options

NAME = "audit"
# Exit status of an audit that ran but found a model beyond a limit (0: within every limit; 2: an error).
GATE_FAILED = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The audit command's flags."""
    p.add_argument("--original", required=True, help="the full-precision model the quantized ones were made from (folder, hub id or alias)")
    p.add_argument("--quantized", required=True, nargs="+", help=".gguf files, compressed-tensors folders, aaq run or export folders, transformers-quantized folders")
    p.add_argument("--names", nargs="+", help="labels of the quantized models in the report (default: their file or folder names)")
    p.add_argument("--out", required=True, type=Path, help="output folder (audit.json, audit.md, audit.png, pairs.jsonl)")
    p.add_argument("--fail-if", help=f"limits, comma-separated: METRIC>+X or METRIC<-X (change), METRIC>X (level); metrics: {', '.join(CHANGE_METRICS + LEVEL_METRICS)}")
    p.add_argument("--signal-only", action="store_true", help="only the first-token KL of every prompt: no generation, seconds per model")
    p.add_argument("--seed", type=int, default=0, help="seed recorded in the report")
    g = p.add_argument_group("prompts and answers")
    options.add_answers(g)
    g.add_argument("--no-garbled-check", dest="garbled_check", action="store_false", help="do not score answers with the original (nothing is garbled)")
    options.add_perplexity(g, "held-out sequences for the perplexity ratio (0: not measured)")
    options.add_placement(p)


def audit_config(args: argparse.Namespace) -> AuditConfig:
    """The AuditConfig the flags describe."""
    ppl = None if args.ppl_samples == 0 else options.perplexity(args)
    return AuditConfig(
        original=args.original, quantized=args.quantized, out=args.out, names=args.names, harmful_prompts=args.harmful_prompts,
        benign_prompts=None if args.benign_prompts is None else str(args.benign_prompts), max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size, ppl=ppl, judge=args.judge, garbled_check=args.garbled_check,
        signal_only=args.signal_only, fail_if=args.fail_if, placement=options.placement(args), seed=args.seed, command="aaq " + " ".join(sys.argv[1:]),
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Audit, print where the report is and the gate's verdict; exit status 3 when a model is beyond a limit."""
    result = audit(audit_config(args))
    print(f"audit of {len(result.report['models'])} model(s) against {args.original}: {args.out / AUDIT_MD}")
    for failure in result.failed:
        print(f"aaq: limit exceeded: {failure}", file=sys.stderr)
    return 0 if result.passed else GATE_FAILED
