"""The option groups several commands share, and how their flags become the library's configs."""

import argparse
from pathlib import Path
from typing import Any

from aaq.data.corpus import DATASETS
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig
from aaq.models.plan import TRANSFORM_SWITCHES
from aaq.runtime.devices import DTYPES, Placement, parse_memory

NO_SCORER = "none"
_FLAGS = {"act_order": "--no-act-order", "cache": "--no-cache", "reference": "--reference MODEL", "batch_size": "--step-batch"}
_FLAGS |= {"calibration": "--calib-dataset/--calib-samples", **{name: f"--no-{name}" for name in TRANSFORM_SWITCHES if name not in ("r1", "r2")}}


def flag(setting: str) -> str:
    """The command-line option that sets a library setting."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def add_placement(p: argparse.ArgumentParser) -> None:
    """--device, --dtype, --max-memory, --fusion-device, --no-tf32."""
    g = p.add_argument_group("device and memory")
    g.add_argument("--device", help="compute device: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=DTYPES, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--max-memory", help="budgets such as cuda:0=20GiB,cpu=64GiB: the model rests on the CPU, accelerate runs each forward within them")
    g.add_argument("--fusion-device", help="where transforms are fused in float64 (default: the compute device)")
    g.add_argument("--no-tf32", dest="tf32", action="store_false", help="forbid TF32 matmuls on CUDA")


def placement(args: argparse.Namespace) -> Placement:
    """The Placement the device and memory flags describe."""
    budgets = None if args.max_memory is None else parse_memory(args.max_memory)
    return Placement(device=args.device, dtype=args.dtype, max_memory=budgets, fusion_device=args.fusion_device, tf32=args.tf32)


def add_calibration_data(p: argparse.ArgumentParser) -> None:
    """The flags of the calibration text (CalibrationConfig)."""
    g = p.add_argument_group("calibration data")
    g.add_argument("--calib-dataset", choices=DATASETS, help="calibration text (default: auto)")
    g.add_argument("--calib-samples", type=int, help="calibration sequences (default: 32)")
    g.add_argument("--calib-seq-len", type=int, help="tokens per calibration sequence (default: 256)")
    g.add_argument("--calib-form", choices=["raw", "chat"], help="raw: corpus text as it is; chat: exchanges built from the Python docs, in the chat template (default: raw)")
    g.add_argument("--calib-benign-train", action="store_true", default=None, help="with --calib-form chat, add the benign training prompts with the instruct model's answers")


def calibration_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The CalibrationConfig fields the calibration flags set."""
    given = {"dataset": args.calib_dataset, "n_samples": args.calib_samples, "seq_len": args.calib_seq_len, "form": args.calib_form, "benign_train": args.calib_benign_train}
    return {name: value for name, value in given.items() if value is not None}


def add_push(p: argparse.ArgumentParser) -> None:
    """--push-tokens and --push-k (the push tokens I_d of the apc loss)."""
    g = p.add_argument_group("push tokens I_d of the apc loss (method aaq)")
    g.add_argument("--push-tokens", choices=["diff", "reference", "vocab"], help="diff: top-k of |z_a - z_b|; reference: top-k of the reference's logits; vocab: all (default: diff)")
    g.add_argument("--push-k", type=int, help="how many push tokens (default: the pull's top-k)")


def add_answers(g: argparse._ArgumentGroup) -> None:
    """The flags of the prompts an evaluation or an audit answers, and how it generates and judges the answers."""
    g.add_argument("--harmful-prompts", help="comma list of prompt sets harmbench-val, harmbench-tuning (the demo pair's tuning split), advbench, or files; each reported and pooled (default: harmbench-val)")
    g.add_argument("--benign-prompts", type=Path, help="file of benign prompts (default: the shipped benign evaluation set)")
    g.add_argument("--max-prompts", type=int, help="an evenly spaced subset of at most N prompts per prompt set")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    g.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation batch")
    g.add_argument("--judge", help="judge model (path/alias) asked yes/no instead of the refusal-phrase detector")


def add_perplexity(g: argparse._ArgumentGroup, samples_help: str = "held-out sequences for perplexity") -> None:
    """The flags of a PerplexityConfig."""
    g.add_argument("--ppl-dataset", default="auto", help="auto | python-docs | wikitext2")
    g.add_argument("--ppl-samples", type=int, default=24, help=samples_help)
    g.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per held-out sequence")


def perplexity(args: argparse.Namespace) -> PerplexityConfig:
    """The PerplexityConfig the perplexity flags describe."""
    return PerplexityConfig(dataset=args.ppl_dataset, n_samples=args.ppl_samples, seq_len=args.ppl_seq_len)


def add_evaluation(p: argparse.ArgumentParser, default_tasks: str) -> None:
    """The flags of an EvalConfig."""
    g = p.add_argument_group("evaluation")
    g.add_argument("--tasks", default=default_tasks, help="comma list of ppl, refusal, benign, safetybench, lmeval:TASK[,TASK...]")
    add_answers(g)
    g.add_argument("--safetybench", type=Path, help="SafetyBench file (default: the shared English dev split)")
    g.add_argument("--scorer", help="full-precision model whose per-token NLL decides whether an answer is garbled, or none (default: a run's source model; an unquantized model scores itself)")
    add_perplexity(g)


def evaluation(args: argparse.Namespace, seed: int | None = None) -> EvalConfig:
    """The EvalConfig the evaluation flags describe (`seed`: the run's, else the --seed flag's)."""
    files = {name: str(getattr(args, name)) for name in ("benign_prompts", "safetybench") if getattr(args, name) is not None}
    return EvalConfig(
        tasks=args.tasks, harmful_prompts=args.harmful_prompts, max_new_tokens=args.max_new_tokens, max_prompts=args.max_prompts, judge=args.judge,
        batch_size=args.eval_batch_size, ppl=perplexity(args), seed=args.seed or 0 if seed is None else seed, garbled_check=args.scorer != NO_SCORER,
        scorer=None if args.scorer == NO_SCORER else args.scorer, **files,
    )  # fmt: skip


def summary(metrics: dict) -> str:
    """The float metrics of a report in one line."""
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)) or "not evaluated"
