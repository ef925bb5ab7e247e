"""`aaq` command line: parses arguments into the library's configs and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _add_quantize_parser(sub: argparse._SubParsersAction) -> None:
    from aaq.methods import method_names

    p = sub.add_parser(
        "quantize",
        help="quantize a model and save it with its run record",
        description="Quantize a model (fused norms, rotations, RTN/GPTQ weights, fake-quantized activations and KV "
        "cache), save it to --out with run.json (config, seed, versions, git commit, timings, perplexity).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--model", required=True, help="local folder, .gguf file, hub id, or alias (e.g. smollm2-135m-instruct)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--recipe", type=Path, help="YAML recipe with the config (flags given explicitly override it)")
    p.add_argument("--method", choices=method_names(), default=None, help="quantization method (default: quarot)")
    p.add_argument("--bits", default=None, help="w<W>a<A>[kv<KV>]: w4a4kv4, w4a8kv8, w4a16, w8a8 ... (default: w4a4kv4)")
    p.add_argument("--seed", type=int, default=None, help="seed for rotations and calibration sampling (default: 0)")
    p.add_argument("--weight-group-size", type=int, default=None, help="quantize weights in groups of this many inputs")
    p.add_argument("--act-group-size", type=int, default=None, help="quantize activations in groups of this many channels")
    p.add_argument("--symmetric-acts", action="store_true", default=None, help="symmetric activations (default asymmetric)")
    p.add_argument("--a-clip", type=float, default=None, help="activation clip ratio in (0, 1]")
    p.add_argument("--kv-clip", type=float, default=None, help="KV cache clip ratio in (0, 1]")
    cal = p.add_argument_group("calibration data")
    cal.add_argument("--calib-dataset", default=None, help="auto | python-docs | wikitext2 | c4 (default: auto)")
    cal.add_argument("--calib-samples", type=int, default=None, help="calibration sequences (default: 32)")
    cal.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration sequence (default: 256)")
    gptq = p.add_argument_group("GPTQ (methods gptq, quarot)")
    gptq.add_argument("--damp", type=float, default=None, help="damping, fraction of the mean Hessian diagonal (default: 0.01)")
    gptq.add_argument("--no-act-order", dest="act_order", action="store_false", default=None, help="keep column order")
    gptq.add_argument("--weight-quantizer", choices=["gptq", "rtn"], default=None, help="weight quantizer of quarot, ostquant and aaq (default: gptq)")
    rot = p.add_argument_group("rotations (method quarot)")
    kinds = ["hadamard", "random_hadamard", "random", "none"]
    rot.add_argument("--r1", choices=kinds, default=None, help="residual-stream rotation (default: random_hadamard)")
    rot.add_argument("--r2", choices=kinds, default=None, help="per-head value/output rotation (default: random_hadamard)")
    rot.add_argument("--no-r3", dest="r3", action="store_false", default=None, help="no online Hadamard on Q/K")
    rot.add_argument("--no-r4", dest="r4", action="store_false", default=None, help="no online Hadamard on down_proj input")
    learn = p.add_argument_group("learned transforms (methods ostquant, aaq)")
    learn.add_argument("--reference", default=None, help="unaligned reference model sharing the tokenizer (needed by aaq)")
    learn.add_argument("--no-cache", action="store_true", help="run the teachers every step instead of caching their targets")
    learn.add_argument("--steps", type=int, default=None, help="calibration steps (default: recipe or 150)")
    learn.add_argument("--loss", choices=["mse", "kl", "kl_top", "apc"], default=None, help="calibration loss")
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
    p.add_argument(
        "--resume", action="store_true", help="continue a killed run in --out (finished GPTQ layers, calibration checkpoint)"
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after quantization")
    _add_eval_options(p, default_tasks="ppl")
    p.add_argument("--overwrite", action="store_true", help="replace an existing finished run in --out")
    p.set_defaults(handler=cmd_quantize)


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
    p.set_defaults(handler=cmd_demo)


def _add_make_demo_pair_parser(sub: argparse._SubParsersAction) -> None:
    from aaq.demo_pair import PairConfig

    defaults = PairConfig()
    p = sub.add_parser(
        "make-demo-pair",
        help="train the LoRA safety adapter that turns smollm2-135m-instruct into the demo's aligned model",
        description="Train a LoRA safety adapter (refusals on HarmBench test `standard` minus the shipped 40-behaviour "
        "tuning split, self-distilled answers on the shipped benign training prompts, KL to the base on calibration "
        "text) and write it to --out with its training config, data and log. The shipped adapter behind the alias "
        "smollm2-135m-safe was made with the defaults. HarmBench val is never used.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--base", default=defaults.base, help="model the adapter is trained on (the unaligned reference)")
    p.add_argument("--out", type=Path, default=defaults.out, help="adapter folder to write")
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (all linear layers but lm_head)")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="LoRA alpha")
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the training examples")
    p.add_argument("--lr", type=float, default=defaults.lr, help="AdamW learning rate (linear decay to 0)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="examples per step")
    p.add_argument("--answer-tokens", type=int, default=defaults.answer_tokens, help="length cap of self-distilled answers")
    p.add_argument("--kl-weight", type=float, default=defaults.kl_weight, help="weight of KL(base || adapted) on plain text")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data order, templates and LoRA init")
    p.set_defaults(handler=cmd_make_demo_pair)


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--format", choices=("aaq", "compressed-tensors"), default="aaq", help="output format")
    p.add_argument("--scheme", choices=("W4A16", "W4A4"), default=None, help="compressed-tensors preset (default: W4A16)")
    p.add_argument("--strict", action="store_true", help="refuse an export that would compute differently from the run")
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
    _add_eval_parser(sub)
    _add_report_parser(sub)
    _add_demo_parser(sub)
    _add_make_demo_pair_parser(sub)
    _add_export_parser(sub)
    return parser


def _recipe_dict(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AaqError(f"recipe {path} does not exist; pass an existing YAML file") from None
    except yaml.YAMLError as err:
        raise AaqError(f"recipe {path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AaqError(f"recipe {path} must be a YAML mapping with keys method, bits, calibration, seed")
    return data


def _override(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace` with only the changes that were given (not None)."""
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(obj, **given) if given else obj


_FLAG_NAMES = {"r3": "--no-r3", "r4": "--no-r4", "act_order": "--no-act-order"}


def _reject_unused(args: argparse.Namespace, names: tuple[str, ...], where: str) -> None:
    """Error out on flags that were given but that nothing in the chosen config would read."""
    # Unset options are None; unset store_true switches are False; the --no-* switches store False.
    given = [
        _FLAG_NAMES.get(n, "--" + n.replace("_", "-"))
        for n in names
        if getattr(args, n) is not None and (getattr(args, n) is not False or n in _FLAG_NAMES)
    ]
    if given:
        raise AaqError(f"{', '.join(given)} has no effect {where}; drop it or pick a method/bits it applies to")


def _method_from_args(args: argparse.Namespace, recipe: dict[str, Any]):
    from aaq.methods import method_config_from_dict

    method_data = recipe.get("method", {"name": "quarot"})
    if isinstance(method_data, str):
        method_data = {"name": method_data}
    if args.method is not None and args.method != method_data.get("name"):
        method_data = {"name": args.method}
    method = method_config_from_dict(method_data)
    where = f"with method {method.name}"
    field_names = {f.name for f in dataclasses.fields(method)}
    if "rotation" in field_names:
        method.rotation = _override(method.rotation, r1=args.r1, r2=args.r2, r3=args.r3, r4=args.r4)
    elif "transforms" in field_names:
        _reject_unused(args, ("r1", "r2"), f"{where} (its R1/R2 are learned from a Hadamard start)")
        method.transforms = _override(method.transforms, r3=args.r3, r4=args.r4)
    else:
        _reject_unused(args, ("r1", "r2", "r3", "r4"), where)
    if "gptq" in field_names:
        method.gptq = _override(method.gptq, damp=args.damp, act_order=args.act_order)
    elif method.name == "gptq":
        method = _override(method, damp=args.damp, act_order=args.act_order)
    else:
        _reject_unused(args, ("damp", "act_order"), where)
    if "weight_quantizer" in field_names:
        method = _override(method, weight_quantizer=args.weight_quantizer)
    else:
        _reject_unused(args, ("weight_quantizer",), where)
    if "training" in field_names:
        loss = _override(method.training.loss, name=args.loss, lam=args.lam)
        steps = method.training.steps if args.steps is None else args.steps
        cache = method.training.cache and not args.no_cache
        in_loop = method.training.weights_in_loop if args.weights_in_loop is None else args.weights_in_loop == "on"
        recompute = method.training.activation_checkpointing if args.activation_checkpointing is None else args.activation_checkpointing == "on"
        method.training = dataclasses.replace(
            method.training, loss=loss, steps=steps, cache=cache, weights_in_loop=in_loop, activation_checkpointing=recompute
        )
    else:
        _reject_unused(args, ("reference", "no_cache", "steps", "loss", "lam", "weights_in_loop", "activation_checkpointing"), where)
    return method


def _calibration_from_args(args: argparse.Namespace, recipe: dict[str, Any]):
    from aaq.api import CalibrationConfig

    data = recipe.get("calibration", {})
    known = {f.name for f in dataclasses.fields(CalibrationConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise AaqError(f"unknown calibration setting(s) {', '.join(unknown)} in the recipe; known: {', '.join(sorted(known))}")
    calibration = CalibrationConfig(**data)
    return _override(calibration, dataset=args.calib_dataset, n_samples=args.calib_samples, seq_len=args.calib_seq_len)


def _scheme_from_args(args: argparse.Namespace, scheme):
    if scheme.weights is None:
        _reject_unused(args, ("weight_group_size",), "with 16-bit weights")
    else:
        scheme = scheme.with_overrides(weights=_override(scheme.weights, group_size=args.weight_group_size))
    if scheme.activations is None:
        _reject_unused(args, ("act_group_size", "a_clip", "symmetric_acts"), "with 16-bit activations")
    else:
        acts = _override(scheme.activations, group_size=args.act_group_size, clip_ratio=args.a_clip)
        scheme = scheme.with_overrides(activations=_override(acts, symmetric=args.symmetric_acts))
    if scheme.kv_cache is None:
        _reject_unused(args, ("kv_clip",), "with a 16-bit KV cache")
    else:
        scheme = scheme.with_overrides(kv_cache=_override(scheme.kv_cache, clip_ratio=args.kv_clip))
    return scheme


def quantize_config_from_args(args: argparse.Namespace):
    """The QuantizeConfig described by a recipe file plus explicitly given flags.

    A flag that the chosen method or bit widths would ignore is an error, not a silent no-op.
    """
    from aaq.api import QuantizeConfig

    recipe = _recipe_dict(args.recipe)
    unknown = sorted(set(recipe) - {"method", "bits", "calibration", "seed"})
    if unknown:
        raise AaqError(f"unknown recipe key(s) {', '.join(unknown)}; a recipe has method, bits, calibration, seed")
    config = QuantizeConfig(
        method=_method_from_args(args, recipe),
        bits=args.bits or recipe.get("bits", "w4a4kv4"),
        calibration=_calibration_from_args(args, recipe),
        seed=args.seed if args.seed is not None else recipe.get("seed", 0),
    )
    scheme = _scheme_from_args(args, config.resolved_scheme())
    if scheme != config.resolved_scheme():
        config.scheme = scheme
    return config


def _prepare_out(out: Path, overwrite: bool) -> None:
    if (out / "run.json").exists() and not overwrite:
        raise AaqError(f"{out} already holds a finished run; pass --overwrite or choose another --out")
    if out.exists() and overwrite:
        shutil.rmtree(out)


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


def _judge_from_args(args: argparse.Namespace):
    from aaq.eval.refusal import ModelJudge
    from aaq.loading import load_model

    if not args.judge:
        return None
    judge_model, judge_tokenizer = load_model(args.judge)
    return ModelJudge(judge_model, judge_tokenizer)


def _scorer_from_args(config, source: str | None):
    """The scorer of the garbled check: --scorer, else `source` (the full-precision model a run came from); None
    when the check is off or the evaluated model scores itself."""
    from aaq.eval.coherence import CoherenceScorer
    from aaq.loading import load_model

    name = config.scorer or source
    if not config.checks_coherence or name is None:
        return None
    try:
        model, tokenizer = load_model(name)
    except AaqError as err:
        raise AaqError(f"cannot load the scorer {name!r} ({err}); pass --scorer MODEL or --scorer none") from None
    return CoherenceScorer(model, tokenizer, name)


def cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize, save the model, evaluate it, write run.json."""
    from aaq.api import load_reference, quantize
    from aaq.checkpoint import save_quantized
    from aaq.eval.suite import evaluate
    from aaq.loading import load_model
    from aaq.runs import provenance, write_json

    config = quantize_config_from_args(args)
    if config.method.needs_reference() and not args.reference:
        raise AaqError(f"method {config.method.name} needs the unaligned reference model; pass --reference MODEL")
    eval_config = None if args.no_eval else dataclasses.replace(eval_config_from_args(args), seed=config.seed)
    _prepare_out(args.out, args.overwrite)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    timings = {"load_s": time.perf_counter() - start}
    # Loaded inline so that no local name keeps the reference alive once the method has cached its targets.
    result = quantize(
        model,
        config,
        tokenizer=tokenizer,
        reference=load_reference(args.reference, model, tokenizer) if args.reference else None,
        run_dir=args.out,
        resume=args.resume,
    )
    start = time.perf_counter()
    save_quantized(result, tokenizer, args.out, source=args.model)
    timings.update(result.timings, save_s=time.perf_counter() - start)
    metrics: dict[str, Any] = {}
    if eval_config is not None:
        meta = {"model": args.model, "method": config.method.name, "bits": config.bits}
        scorer = _scorer_from_args(eval_config, source=args.model)
        report = evaluate(model, tokenizer, eval_config, args.out, meta=meta, judge=_judge_from_args(args), scorer=scorer)
        metrics = {k: v for k, v in report["metrics"].items() if v is not None}
        timings["eval_s"] = sum(report["seconds"].values())
    run = {
        "status": "complete",
        "command": "aaq " + " ".join(sys.argv[1:]),
        "model": args.model,
        "method": config.method.name,
        "bits": config.bits,
        "seed": config.seed,
        "config": config.to_dict(),
        "metrics": metrics,
        "timings": timings,
        **provenance(),
    }
    write_json(args.out / "run.json", run)
    summary = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)) or "not evaluated"
    print(f"{config.method.name} {config.bits}: {summary}; saved to {args.out}")
    return 0


def _load_for_eval(args: argparse.Namespace):
    from aaq.checkpoint import is_quantized_folder, load_quantized
    from aaq.loading import ModelSource, load_model

    if is_quantized_folder(args.model):
        if args.adapter:
            raise AaqError("--adapter applies to full-precision models; merge the adapter before quantizing instead")
        model, tokenizer, info = load_quantized(args.model)
        method, bits = info["quantize"]["method"]["name"], info["quantize"]["bits"]
        return model, tokenizer, {"method": method, "bits": bits, "source_model": info.get("source_model")}
    model, tokenizer = load_model(ModelSource(args.model, adapter=args.adapter))
    return model, tokenizer, {"method": "fp", "bits": "fp", "adapter": args.adapter}


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model or run folder and write report.json / report.md / generations.jsonl."""
    from aaq.eval.suite import evaluate

    config = eval_config_from_args(args)
    model, tokenizer, meta = _load_for_eval(args)
    if meta["method"] != "fp" and config.checks_coherence and not (config.scorer or meta.get("source_model")):
        raise AaqError(f"{args.model} does not record its source model; pass --scorer MODEL (its full-precision model) or --scorer none")
    scorer = _scorer_from_args(config, source=meta.get("source_model"))
    report = evaluate(
        model, tokenizer, config, args.out, meta={"model": args.model, **meta}, judge=_judge_from_args(args), scorer=scorer
    )
    shown = ", ".join(f"{k} {v:.4g}" for k, v in report["metrics"].items() if isinstance(v, float))
    print(f"{args.model}: {shown}; report in {args.out / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run folder and print what the export differs in and how large it is."""
    from aaq.exporting import ExportConfig, export

    if args.scheme is not None and args.format == "aaq":
        raise AaqError("--scheme applies to --format compressed-tensors; the aaq format keeps the run's own scheme")
    config = ExportConfig(format=args.format, strict=args.strict)
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
    from aaq.eval.report import comparison_table, merge_reports, plot_safety_vs_ppl
    from aaq.runs import write_atomic, write_json

    reports = merge_reports(args.runs)
    table = comparison_table(reports)
    write_json(args.out / "report.json", reports)
    write_atomic(args.out / "report.md", lambda tmp: tmp.write_text("# aaq comparison\n\n" + table + "\n"))
    plot = plot_safety_vs_ppl(reports, args.out / "safety_vs_ppl.png")
    print(table)
    print(f"wrote {args.out / 'report.md'} and {plot}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the method comparison and print its table."""
    from aaq.demo import DemoConfig, run_demo

    names = ("model", "reference", "bits", "out", "tasks", "seed")
    config = DemoConfig(**{name: getattr(args, name) for name in names})
    if args.full:
        config = config.paper_sized()
    overrides = {name: getattr(args, name) for name in ("steps", "lam") if getattr(args, name) is not None}
    config = dataclasses.replace(config, **overrides)
    print(run_demo(config))
    return 0


def cmd_make_demo_pair(args: argparse.Namespace) -> int:
    """Train the demo pair's safety adapter."""
    from aaq.demo_pair import PairConfig, make_demo_pair

    names = ("base", "out", "rank", "alpha", "epochs", "lr", "batch_size", "answer_tokens", "kl_weight", "seed")
    folder = make_demo_pair(PairConfig(**{name: getattr(args, name) for name in names}))
    print(f"wrote the safety adapter to {folder}; evaluate it with: aaq eval --model {args.base} --adapter {folder}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `aaq` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        git_commit()  # record the commit of the code as loaded, before a long run
        return args.handler(args)
    except AaqError as err:
        print(f"aaq: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aaq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
