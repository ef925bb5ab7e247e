"""`aaq` command line: parses arguments into the library's configs and calls the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aaq import distributed
from aaq.errors import AaqError
from aaq.runs import git_commit

logger = logging.getLogger("aaq")
NO_SCORER = "none"

EPILOG = """examples:
  aaq quantize --model smollm2-135m-instruct --method quarot --bits w4a4kv4 --out runs/quarot
  aaq eval --model runs/quarot --tasks ppl --out runs/quarot/eval
  aaq export runs/quarot --format compressed-tensors --scheme W4A4 --out runs/quarot-vllm
  aaq demo
"""

# The option of a library setting where it is not `--<setting with dashes>`.
_FLAGS = {
    "r3": "--no-r3",
    "r4": "--no-r4",
    "smoothing": "--no-smoothing",
    "act_order": "--no-act-order",
    "cache": "--no-cache",
    "reference": "--reference MODEL",
    "calibration": "--calib-dataset/--calib-samples",
    "batch_size": "--step-batch",
}


def flag(setting: str) -> str:
    """The command-line option that sets a library setting."""
    return _FLAGS.get(setting, "--" + setting.replace("_", "-"))


def cli_message(error: AaqError) -> str:
    """The error's message naming command-line options instead of Python settings."""
    return error.render(flag)


@contextlib.contextmanager
def _in_cli_terms() -> Iterator[None]:
    """Re-raise library errors with their settings named as this command line's options."""
    try:
        yield
    except AaqError as error:
        raise AaqError(cli_message(error)) from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_placement_options(p: argparse.ArgumentParser) -> None:
    from aaq.devices import DTYPES

    dev = p.add_argument_group("device and memory")
    dev.add_argument("--device", default=None, help="compute device: cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    dev.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    dev.add_argument(
        "--max-memory",
        default=None,
        help="per-device budgets, e.g. cuda:0=20GiB,cpu=64GiB: the model rests on the CPU, forward passes are dispatched by accelerate "
        "within them (CPU/disk offload), GPTQ onloads one layer at a time",
    )
    dev.add_argument("--fusion-device", default=None, help="where transforms are fused in float64 (default: the compute device)")
    dev.add_argument("--no-tf32", dest="tf32", action="store_false", help="forbid TF32 matmuls on CUDA")


def placement_from_args(args: argparse.Namespace):
    """The Placement the device and memory flags describe."""
    from aaq.devices import Placement, parse_memory

    with _in_cli_terms():
        budgets = None if args.max_memory is None else parse_memory(args.max_memory)
        return Placement(device=args.device, dtype=args.dtype, max_memory=budgets, fusion_device=args.fusion_device, tf32=args.tf32)


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model and save it with its run record",
        description="Quantize a model (fused norms, rotations, RTN/GPTQ weights, fake-quantized activations and KV "
        "cache), save it to --out with run.json (config, seed, versions, git commit, timings, perplexity).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help="local folder, .gguf file, hub id, or alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _add_config_options(p)
    _add_placement_options(p)
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run in --out (finished GPTQ layers, calibration checkpoint)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after quantization")
    _add_eval_options(p, default_tasks="ppl")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the aaq output in --out (removes only files aaq wrote there; anything else is an error)"
    )
    p.set_defaults(handler=cmd_quantize)


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate each stage's peak memory from the model config alone, and what fits a device budget",
        description="Read only the model's config (no weights) and print, per stage of `aaq quantize` with the same options, the "
        "estimated peak device and host memory and the disk the teacher cache and run folder take. With --budget, search "
        "the settings (teacher batch, activation checkpointing, calibration batch, evaluation batch, offloading) under which "
        "every stage fits that much device memory.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help="local folder, .gguf file, config.json file, hub id, or alias (only its config is read)")
    _add_config_options(p)
    _add_placement_options(p)
    _add_eval_options(p, default_tasks="ppl")
    p.add_argument("--no-eval", action="store_true", help="plan without the evaluation stage")
    p.add_argument("--budget", default=None, help="device memory to fit, e.g. 24GiB or 80GB")
    p.set_defaults(handler=cmd_plan)


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """The options that make a QuantizeConfig (recipe, method, bits, calibration, transforms, GPTQ)."""
    from aaq.losses import LOSS_NAMES
    from aaq.methods import method_names
    from aaq.methods.weights import WEIGHT_QUANTIZERS
    from aaq.plan import ROTATION_KINDS

    p.add_argument("--recipe", type=Path, help="YAML recipe with the config (flags given explicitly override it)")
    p.add_argument("--method", choices=method_names(), default=None, help="quantization method (default: the recipe's, else quarot)")
    p.add_argument("--bits", default=None, help="w<W>a<A>[kv<KV>]: w4a4kv4, w4a8kv8, w4a16, w8a8 ... (default: w4a4kv4)")
    p.add_argument("--seed", type=int, default=None, help="seed for rotations and calibration sampling (default: 0)")
    p.add_argument("--weight-group-size", type=int, default=None, help="quantize weights in groups of this many inputs")
    p.add_argument("--act-group-size", type=int, default=None, help="quantize activations in groups of this many channels")
    p.add_argument("--symmetric-acts", action="store_true", default=None, help="symmetric activations (default asymmetric)")
    p.add_argument("--a-clip", type=float, default=None, help="activation clip ratio in (0, 1]")
    p.add_argument("--kv-clip", type=float, default=None, help="KV cache clip ratio in (0, 1]")
    _add_calibration_data_options(p)
    gptq = p.add_argument_group("weights (GPTQ for methods gptq, quarot, ostquant, aaq)")
    gptq.add_argument("--weight-quantizer", choices=WEIGHT_QUANTIZERS, default=None, help="weight quantizer of quarot, ostquant and aaq (default: gptq)")
    gptq.add_argument("--damp", type=float, default=None, help="damping, fraction of the mean Hessian diagonal (default: 0.01)")
    gptq.add_argument("--no-act-order", dest="act_order", action="store_false", default=None, help="keep column order")
    gptq.add_argument(
        "--static-groups", action="store_true", default=None, help="group scales fixed up front, so act-order groups stay contiguous (exportable)"
    )
    rot = p.add_argument_group("transforms (methods quarot, ostquant, aaq)")
    rot.add_argument("--r1", choices=ROTATION_KINDS, default=None, help="residual-stream rotation; the start of the learned one (default: random_hadamard)")
    rot.add_argument("--r2", choices=ROTATION_KINDS, default=None, help="per-head value/output rotation (default: random_hadamard)")
    rot.add_argument("--no-r3", dest="r3", action="store_false", default=None, help="no online Hadamard on Q/K")
    rot.add_argument("--no-r4", dest="r4", action="store_false", default=None, help="no online Hadamard on the MLP down projection's input")
    rot.add_argument("--no-smoothing", dest="smoothing", action="store_false", default=None, help="no learnable smoothing scales (ostquant, aaq)")
    learn = p.add_argument_group("learned transforms (methods ostquant, aaq)")
    learn.add_argument("--reference", default=None, help="unaligned reference model sharing the tokenizer (needed by aaq)")
    learn.add_argument("--no-cache", dest="cache", action="store_false", default=None, help="run the teachers every step instead of caching their targets")
    learn.add_argument("--steps", type=int, default=None, help="calibration steps (default: recipe or 150)")
    learn.add_argument("--step-batch", dest="batch_size", type=int, default=None, help="calibration sequences per step (default: recipe or 4)")
    learn.add_argument("--loss", choices=LOSS_NAMES, default=None, help="calibration loss")
    learn.add_argument("--lam", type=float, default=None, help="push weight lambda of the apc loss (default: 0.1)")
    learn.add_argument(
        "--weights-in-loop",
        choices=["on", "off"],
        default=None,
        help="fake-quantize the weights during calibration (default: on with --weight-quantizer rtn or 16-bit activations)",
    )
    learn.add_argument(
        "--activation-checkpointing",
        choices=["on", "off"],
        default=None,
        help="recompute each layer in the backward: about half the calibration memory, a third more time (default: off; on in the paper recipes)",
    )
    learn.add_argument(
        "--teacher-batch", type=int, default=None, help="sequences per teacher forward (default: sized to the free device memory)"
    )
    learn.add_argument(
        "--heldout-windows",
        type=int,
        default=None,
        help="calibration sequences set aside to measure the loss on windows not trained on (default: 0, none)",
    )
    learn.add_argument("--heldout-every", type=int, default=None, help="measure the held-out loss every N steps (default: 10)")
    learn.add_argument(
        "--restore-best",
        action="store_true",
        default=None,
        help="end with the transforms of the step with the lowest held-out loss (needs --heldout-windows)",
    )
    learn.add_argument(
        "--heldout-patience",
        type=int,
        default=None,
        help="stop after N held-out measurements in a row without a new best (needs --heldout-windows)",
    )
    _add_optimizer_options(p)
    _add_push_options(p)


def _add_calibration_data_options(p: argparse.ArgumentParser) -> None:
    from aaq.data import DATASETS

    cal = p.add_argument_group("calibration data")
    cal.add_argument("--calib-dataset", choices=DATASETS, default=None, help="calibration text (default: auto)")
    cal.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: 32)")
    cal.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence (default: 256)")
    cal.add_argument(
        "--calib-form",
        choices=["raw", "chat"],
        default=None,
        help="raw: corpus text as it is; chat: user/assistant exchanges built from the calibration-split Python docs "
        "(faq, howto, tutorial), rendered with the model's chat template (default: raw)",
    )
    cal.add_argument(
        "--calib-benign-train",
        action="store_true",
        default=None,
        help="with --calib-form chat, add the shipped benign training prompts with the instruct model's answers "
        "(the demo's safety adapter was trained on them)",
    )


def _add_optimizer_options(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument_group("transform optimiser and pull tokens (methods ostquant, aaq)")
    opt.add_argument(
        "--optimizer", choices=["cayley_sgd", "riemannian_adam"], default=None, help="Stiefel optimiser of R1/R2 (default: cayley_sgd)"
    )
    opt.add_argument("--rotation-lr", type=float, default=None, help="learning rate of R1/R2 (default: recipe or 0.017)")
    opt.add_argument("--scale-lr", type=float, default=None, help="learning rate of the smoothing scales (default: recipe or 0.0018)")
    opt.add_argument("--top-k", type=int, default=None, help="pull tokens I_a: top-k of the aligned logits (default: 1000)")


def _add_push_options(p: argparse.ArgumentParser) -> None:
    push = p.add_argument_group("push tokens I_d of the apc loss (method aaq)")
    push.add_argument(
        "--push-tokens",
        choices=["diff", "reference", "vocab"],
        default=None,
        help="diff: top-k of |z_a - z_b|; reference: top-k of the reference's logits; vocab: every token (default: diff)",
    )
    push.add_argument("--push-k", type=int, default=None, help="how many push tokens (default: the pull's top-k)")


def _add_eval_options(p: argparse.ArgumentParser, default_tasks: str) -> None:
    ev = p.add_argument_group("evaluation")
    ev.add_argument(
        "--tasks", default=default_tasks, help="comma list of ppl, refusal, benign, safetybench, lmeval:TASK[,TASK...]"
    )
    ev.add_argument(
        "--harmful-prompts",
        help="comma list of harmful prompt sets, each harmbench-val (HarmBench val standard), harmbench-tuning (the "
        "demo pair's 40-behaviour tuning split of HarmBench test), advbench (520 behaviours) or a CSV/JSON/JSONL/text "
        "file; several sets are reported one by one and pooled (default: harmbench-val)",
    )
    ev.add_argument("--benign-prompts", type=Path, help="file of benign prompts (default: the shipped benign set)")
    ev.add_argument("--safetybench", type=Path, help="SafetyBench file (default: the shared English dev split)")
    ev.add_argument("--judge", help="judge model (path/alias) asked yes/no instead of the refusal-phrase detector")
    ev.add_argument(
        "--scorer",
        help="full-precision model (path/alias) whose per-token NLL of each answer that does not refuse decides "
        "whether it is garbled, or none to turn the garbled check off (default: a run folder's source model; "
        "an unquantized model scores itself)",
    )
    ev.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
    ev.add_argument("--max-prompts", type=int, help="evaluate an evenly spaced subset of at most N prompts per prompt set")
    ev.add_argument("--eval-batch-size", type=int, default=8, help="prompts per generation batch")
    ev.add_argument("--ppl-dataset", default="auto", help="auto | python-docs | wikitext2")
    ev.add_argument("--ppl-samples", type=int, default=24, help="held-out sequences for perplexity")
    ev.add_argument("--ppl-seq-len", type=int, default=512, help="tokens per held-out sequence")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model or a quantized run folder",
        description="Evaluate a full-precision model, a model with a LoRA adapter, or an aaq run folder; writes "
        "report.json, report.md and generations.jsonl to --out.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help="aaq run folder, local folder, .gguf file, hub id or alias")
    p.add_argument("--adapter", help="peft LoRA adapter folder merged into --model before evaluation")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed recorded in the report")
    _add_eval_options(p, default_tasks="ppl,refusal,benign,safetybench")
    _add_placement_options(p)
    p.set_defaults(handler=cmd_eval)


def _add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="merge several reports into one table and a safety-vs-perplexity plot",
        description="Merge the report.json of several runs into report.md (a comparison table), report.json and "
        "safety_vs_ppl.png (refusal rate against perplexity, one point per run).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, help="folders holding report.json (or report.json files)")
    p.add_argument("--out", type=Path, default=Path("runs/report"), help="output folder")
    p.set_defaults(handler=cmd_report)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    from aaq.demo import DemoConfig

    defaults = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="compare FP, RTN, QuaRot, OSTQuant and AAQ on the demo's aligned model (safety and utility)",
        description="Quantize the aligned model (default smollm2-135m-safe: the instruct model + the shipped safety "
        "adapter) with RTN, QuaRot, OSTQuant and AAQ (push term against --reference) at the same bits and "
        "calibration data, evaluate each and the FP model (PPL, refusal rate on HarmBench val, benign compliance, "
        "SafetyBench), and write report.md, report.json and safety_vs_ppl.png to --out. About 11 minutes on a "
        "2-core CPU with the defaults; --full uses the paper's calibration settings (hours on a CPU).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", default=defaults.model, help="the aligned model to quantize")
    p.add_argument("--reference", default=defaults.reference, help="the unaligned reference of AAQ's push term")
    p.add_argument("--bits", default=defaults.bits, help="bit widths of every quantized variant")
    p.add_argument("--out", type=Path, default=defaults.out, help="output folder")
    p.add_argument("--tasks", default=defaults.tasks, help="evaluation tasks for every variant (see aaq eval --help)")
    p.add_argument("--steps", type=int, default=None, help=f"transform steps of OSTQuant and AAQ (default: {defaults.steps}, 150 with --full)")
    p.add_argument("--lam", type=float, default=None, help=f"AAQ's push weight lambda (default: {defaults.lam}, 0.1 with --full)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of calibration windows, rotations and evaluation")
    p.add_argument("--full", action="store_true", help="paper-sized calibration (128 x 2048 tokens, 150 steps) and evaluation")
    p.add_argument("--save-models", action="store_true", help="also save each variant's quantized weights (exportable run folders)")
    _add_placement_options(p)
    p.set_defaults(handler=cmd_demo)


def _add_make_demo_pair_parser(sub: argparse._SubParsersAction) -> None:
    from aaq.demo_pair import PAIR_PRESETS, PairConfig

    defaults = PairConfig()
    p = sub.add_parser(
        "make-demo-pair",
        help="train the LoRA safety adapter that turns smollm2-135m-instruct into the demo's aligned model",
        description="Train a LoRA safety adapter (refusals on HarmBench test `standard` minus the shipped 40-behaviour "
        "tuning split, self-distilled answers on the shipped benign training prompts, KL to the base on calibration "
        "text) and write it to --out with its training config, data and log. --preset anchored (the default) rebuilds "
        "the adapter behind smollm2-135m-safe, --preset unanchored (no KL to the base) the one behind "
        "smollm2-135m-safe-unanchored; flags change a preset's settings. HarmBench val is never used.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--preset", choices=list(PAIR_PRESETS), default="anchored", help="the settings to start from")
    p.add_argument("--base", default=None, help=f"model the adapter is trained on, the unaligned reference (default: {defaults.base})")
    p.add_argument("--out", type=Path, default=defaults.out, help="adapter folder to write")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank, all linear layers but lm_head (default: {defaults.rank})")
    p.add_argument("--alpha", type=float, default=None, help=f"LoRA alpha (default: {defaults.alpha})")
    p.add_argument("--epochs", type=int, default=None, help=f"passes over the training examples (default: {defaults.epochs})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate, linear decay to 0 (default: {defaults.lr})")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per step (default: {defaults.batch_size})")
    p.add_argument("--answer-tokens", type=int, default=None, help=f"length cap of self-distilled answers (default: {defaults.answer_tokens})")
    p.add_argument("--kl-weight", type=float, default=None, help="weight of KL(base || adapted) on plain text (default: 1.0; 0 with --preset unanchored)")
    p.add_argument("--seed", type=int, default=None, help=f"seed of the data order, templates and LoRA init (default: {defaults.seed})")
    p.set_defaults(handler=cmd_make_demo_pair)


def _add_diagnose_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="measure how an aligned model and its unaligned reference differ, and whether AAQ's push can see it",
        description="Run the aligned model and the reference over the calibration windows a quantize run with the same "
        "calibration settings and seed would use, over chat-formatted benign training prompts and over the HarmBench test "
        "tuning split (first answer tokens of the aligned model's answers). Print per text the mean per-token "
        "KL(aligned || reference) and, per choice of push tokens I_d, the reference's probability mass and the contrast "
        "sum |p_a - p_b| on I_d; warn when the run's push has nothing to see on the calibration windows (contrast below "
        "0.01). --out writes diagnostics.json and diagnostics.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help="the aligned model (local folder, .gguf file, hub id or alias)")
    p.add_argument("--adapter", help="peft LoRA adapter folder merged into --model (e.g. one made by aaq make-demo-pair)")
    p.add_argument("--reference", required=True, help="the unaligned reference sharing the tokenizer")
    p.add_argument("--recipe", type=Path, help="YAML recipe whose calibration, seed and apc push tokens are diagnosed (flags override it)")
    p.add_argument("--seed", type=int, default=None, help="seed of the calibration windows (default: recipe or 0)")
    p.add_argument("--out", type=Path, help="folder for diagnostics.json and diagnostics.md")
    _add_calibration_data_options(p)
    _add_push_options(p)
    p.add_argument("--push-ks", default="10,100,1000", help="comma list of top-k sizes at which every kind of push tokens is measured")
    p.add_argument("--answer-tokens", type=int, default=8, help="first answer tokens measured per chat prompt")
    p.add_argument("--max-prompts", type=int, help="an evenly spaced subset of at most N prompts per prompt set")
    _add_placement_options(p)
    p.set_defaults(handler=cmd_diagnose)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    from aaq.exporting import EXPORT_DTYPES, FORMATS, SCHEMES

    p = sub.add_parser(
        "export",
        help="export a quantized run for shipping: packed int4 (aaq) or compressed-tensors (transformers/vLLM)",
        description="Export an aaq run folder. --format aaq packs the weights two int4 codes per byte with their scales "
        "(bit-exact; `aaq eval --model OUT` and aaq.load(OUT) rebuild the run's model). --format compressed-tensors "
        "writes a folder for other runtimes: --scheme W4A16 (int4 weights, full-precision activations; loads in plain "
        "transformers with compressed-tensors installed) or W4A4 (int4 weights, dynamic symmetric int4 per-token "
        "activations, R4 as an online Hadamard transform; for vLLM). R1/R2/smoothing are already fused into the "
        "weights. What the format cannot express (asymmetric activations, a 4-bit KV cache, an R4 it cannot apply) is "
        "listed in OUT/aaq_export.json and printed; --strict refuses such exports instead.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("run", type=Path, help="aaq run folder (from `aaq quantize`) or packed aaq export")
    p.add_argument("--format", choices=FORMATS, default="aaq", help="output format")
    p.add_argument("--scheme", choices=SCHEMES, default=None, help="compressed-tensors preset (default: W4A16)")
    p.add_argument("--strict", action="store_true", help="refuse an export that would compute differently from the run")
    p.add_argument(
        "--dtype", choices=EXPORT_DTYPES, default=None, help="dtype of everything but the integer codes (default: the run's if 16-bit, else float16)"
    )
    p.add_argument("--int8-embeddings", action="store_true", help="store embeddings and lm_head as int8 rows (aaq format)")
    p.add_argument("--device", default="cpu", help="device the run is loaded on while exporting")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.set_defaults(handler=cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The `aaq` argument parser with all subcommands."""
    parser = argparse.ArgumentParser(
        prog="aaq",
        description="Alignment-aware 4-bit quantization (W4A4KV4 and friends) of transformers LLMs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize_parser(sub)
    _add_plan_parser(sub)
    _add_eval_parser(sub)
    _add_report_parser(sub)
    _add_demo_parser(sub)
    _add_make_demo_pair_parser(sub)
    _add_diagnose_parser(sub)
    _add_export_parser(sub)
    return parser


def _given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of dataclass `cls` that the arguments set, by name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def _calibration_options(args: argparse.Namespace) -> dict[str, Any]:
    """The calibration-data settings the flags give, by `CalibrationConfig` field."""
    given = {
        "dataset": args.calib_dataset,
        "n_samples": args.calib_samples,
        "seq_len": args.calib_seq_len,
        "form": args.calib_form,
        "benign_train": args.calib_benign_train,
    }
    return {name: value for name, value in given.items() if value is not None}


def quantize_config_from_args(args: argparse.Namespace):
    """The QuantizeConfig described by a recipe file plus explicitly given flags.

    A flag that the chosen method or bit widths would ignore is an error, not a silent no-op.
    """
    from aaq.methods import MethodOptions
    from aaq.quantizers import SchemeOptions
    from aaq.recipes import QuantizeOptions, configure, load_recipe

    method = _given(args, MethodOptions) | {
        "weights_in_loop": _on_off(args.weights_in_loop),
        "activation_checkpointing": _on_off(args.activation_checkpointing),
    }
    calibration = _calibration_options(args)
    options = QuantizeOptions(
        method=args.method,
        bits=args.bits,
        seed=args.seed,
        method_options=MethodOptions(**method),
        scheme_options=SchemeOptions(**_given(args, SchemeOptions)),
        calibration=calibration,
    )
    with _in_cli_terms():
        return configure(options, None if args.recipe is None else load_recipe(args.recipe))


def _int_list(text: str, what: str) -> tuple[int, ...]:
    """A comma list of positive integers, or a one-line error naming the option."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise AaqError(f"{what} must be a comma list of positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise AaqError(f"{what} must be a comma list of positive integers, got {text!r}")
    return values


def diagnostics_config_from_args(args: argparse.Namespace):
    """The DiagnosticsConfig described by a recipe (calibration, seed, apc push tokens) plus explicitly given flags."""
    from aaq.api import QuantizeConfig
    from aaq.diagnostics import DiagnosticsConfig
    from aaq.losses import LossConfig
    from aaq.pair_stats import PushSet
    from aaq.recipes import load_recipe

    recipe = QuantizeConfig() if args.recipe is None else load_recipe(args.recipe)
    training = getattr(recipe.method, "training", None)
    loss = training.loss if training is not None and training.loss.name == "apc" else LossConfig(name="apc")
    with _in_cli_terms():
        return DiagnosticsConfig(
            calibration=dataclasses.replace(recipe.calibration, **_calibration_options(args)),
            seed=recipe.seed if args.seed is None else args.seed,
            push=PushSet.of_loss(loss.with_push(args.push_tokens, args.push_k)),
            push_ks=_int_list(args.push_ks, "--push-ks"),
            answer_tokens=args.answer_tokens,
            max_prompts=args.max_prompts,
        )


def eval_config_from_args(args: argparse.Namespace):
    """The EvalConfig described by the evaluation flags."""
    from aaq.eval.perplexity import PerplexityConfig
    from aaq.eval.suite import EvalConfig

    def text(path: Path | None) -> str | None:
        return None if path is None else str(path)

    return EvalConfig(
        tasks=args.tasks,
        harmful_prompts=args.harmful_prompts,
        benign_prompts=text(args.benign_prompts),
        safetybench=text(args.safetybench),
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        batch_size=args.eval_batch_size,
        ppl=PerplexityConfig(dataset=args.ppl_dataset, n_samples=args.ppl_samples, seq_len=args.ppl_seq_len),
        judge=args.judge,
        seed=args.seed if args.seed is not None else 0,
        garbled_check=args.scorer != NO_SCORER,
        scorer=None if args.scorer == NO_SCORER else args.scorer,
    )


def _summary(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)) or "not evaluated"


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize, save the model, evaluate it, write run.json."""
    from aaq.exporting import export_blocker
    from aaq.workflow import RunConfig, run_quantization

    config = quantize_config_from_args(args)
    blocker = export_blocker(config)
    if blocker is not None:
        logger.warning("warning: %s", cli_message(blocker))
    evaluation = None if args.no_eval else dataclasses.replace(eval_config_from_args(args), seed=config.seed)
    run = RunConfig(
        model=args.model,
        out=args.out,
        quantize=config,
        placement=placement_from_args(args),
        reference=args.reference,
        evaluation=evaluation,
        resume=args.resume,
        overwrite=args.overwrite,
        command="aaq " + " ".join(sys.argv[1:]),
    )
    with distributed.process_group(run.placement.compute_device):
        result = run_quantization(run)
    if distributed.launched().is_main:
        print(f"{config.method.name} {config.bits}: {_summary(result.record['metrics'])}; saved to {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan of a quantize run with these options."""
    from accelerate.utils import convert_file_size_to_int

    from aaq.memory import format_plan, plan_memory

    config = quantize_config_from_args(args)
    if config.method.needs_reference() and not args.reference:
        raise AaqError(f"method {config.method.name} needs the unaligned reference model; pass one (--reference MODEL)")
    evaluation = None if args.no_eval else eval_config_from_args(args)
    try:
        budget = None if args.budget is None else convert_file_size_to_int(args.budget)
    except ValueError:
        raise AaqError(f"bad --budget {args.budget!r}; write an amount such as 24GiB or 80GB") from None
    plan = plan_memory(args.model, config, placement_from_args(args), evaluation, budget)
    print(f"{args.model}: {config.method.name} {config.bits} on {placement_from_args(args).compute_device}")
    print(format_plan(plan, flag))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model or run folder and write report.json / report.md / generations.jsonl."""
    from aaq.workflow import evaluate_source

    report = evaluate_source(args.model, eval_config_from_args(args), args.out, adapter=args.adapter, placement=placement_from_args(args))
    print(f"{args.model}: {_summary(report['metrics'])}; report in {args.out / 'report.md'}")
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    """Diagnose an aligned/reference pair: print the tables and the warning, write them with --out."""
    from aaq.api import load_reference
    from aaq.diagnostics import diagnose_pair, save_diagnostics
    from aaq.folders import check_output_folder
    from aaq.loading import ModelSource, load_model

    config = diagnostics_config_from_args(args)
    if args.out is not None:
        check_output_folder(args.out, "diagnostics")
    placement = placement_from_args(args)
    model, tokenizer = load_model(ModelSource(args.model, adapter=args.adapter), placement)
    reference = load_reference(args.reference, model, tokenizer, placement)
    result = diagnose_pair(model, reference, tokenizer, config)
    aligned = args.model if args.adapter is None else f"{args.model} + {args.adapter}"
    title = f"Pair diagnostics: {aligned} (aligned) vs {args.reference} (reference)"
    print(result.markdown(title))
    if args.out is not None:
        meta = {"model": args.model, "adapter": args.adapter, "reference": args.reference, "seed": config.seed}
        out = save_diagnostics(result, args.out, title, meta)
        print(f"wrote {out / 'diagnostics.json'} and {out / 'diagnostics.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run folder and print what the export differs in and how large it is."""
    from aaq.exporting import ExportConfig, export

    if args.scheme is not None and args.format == "aaq":
        raise AaqError("--scheme applies to --format compressed-tensors; the aaq format keeps the run's own scheme")
    config = ExportConfig(format=args.format, strict=args.strict, dtype=args.dtype, int8_embeddings=args.int8_embeddings, device=args.device)
    if args.scheme is not None:
        config = dataclasses.replace(config, scheme=args.scheme)
    report = export(args.run, args.out, config)
    for difference in report.differences:
        print(f"differs: {difference}")
    for note in report.notes:
        print(f"note: {note}")
    scheme = f" {report.scheme}" if report.scheme and report.format != "aaq" else ""
    print(
        f"exported {args.run} as {report.format}{scheme} to {args.out}: linear weights {report.linear_bytes / 1e6:.1f} MB "
        f"({report.linear_ratio:.3f} of fp16), folder {report.folder_bytes / 1e6:.1f} MB"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Merge reports into a table, a JSON list and the safety-vs-perplexity plot."""
    from aaq.eval.report import REPORT_MD, merge_reports, write_comparison

    print(write_comparison(merge_reports(args.runs), args.out, "aaq comparison"))
    print(f"wrote {args.out / REPORT_MD}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the method comparison and print its table."""
    from aaq.demo import DemoConfig, run_demo

    names = ("model", "reference", "bits", "out", "tasks", "seed", "save_models")
    config = DemoConfig(**{name: getattr(args, name) for name in names}, placement=placement_from_args(args))
    if args.full:
        config = config.paper_sized()
    overrides = {name: getattr(args, name) for name in ("steps", "lam") if getattr(args, name) is not None}
    print(run_demo(dataclasses.replace(config, **overrides)))
    return 0


def cmd_make_demo_pair(args: argparse.Namespace) -> int:
    """Train the demo pair's safety adapter."""
    from aaq.demo_pair import PairConfig, make_demo_pair

    fields = [f.name for f in dataclasses.fields(PairConfig) if f.name != "preset"]
    config = PairConfig.from_preset(args.preset, **{name: getattr(args, name) for name in fields if getattr(args, name, None) is not None})
    folder = make_demo_pair(config)
    print(f"wrote the safety adapter to {folder}; evaluate it with: aaq eval --model {config.base} --adapter {folder}")
    return 0


def _split_over_processes(command: str) -> None:
    """Under torchrun (several processes): only quantize splits its work, and only process 0 shows progress bars."""
    if command != "quantize":
        raise AaqError(f"aaq {command} runs in one process; start it without torchrun (only aaq quantize splits its work over processes)")
    if not distributed.launched().is_main:
        import transformers

        transformers.utils.logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `aaq` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    this = distributed.launched()
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(
        level=level if this.is_main else logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        with distributed.sigterm_as_error() if this.size > 1 else contextlib.nullcontext():
            if this.size > 1:
                _split_over_processes(args.command)
            git_commit()  # record the commit of the code as loaded, before a long run
            return args.handler(args)
    except AaqError as err:
        print(f"aaq: error: {cli_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aaq: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        # A full disk can stop any library's write (a datasets or hub cache, say); aaq's own writes say so themselves.
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"aaq: error: {err.strerror} ({err.filename or 'while writing'}); free some disk space and run again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
