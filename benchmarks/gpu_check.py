"""Check a machine (a GPU) with every aaq stage on a random-weight model built from a real model config.

No weights are downloaded: the model is built from a config shipped in benchmarks/configs
(Llama-3.1-8B-Instruct, Qwen2.5-7B-Instruct, Mistral-7B-Instruct, or a tiny one) with random
weights, and a word-level tokenizer is trained on the shipped Python docs. Each stage runs at a small
token budget on the chosen device: QuaRot, GPTQ, OSTQuant and AAQ (cached teachers, reference loaded
only while its targets are computed), evaluation of a few prompts, and both exports. Per stage it
prints seconds, peak device and host memory, and the planner's estimate next to them, and writes
JSON (default benchmarks/results/gpu_check_<config>_<device>.json).

    python benchmarks/gpu_check.py --config llama-3.1-8b-instruct --device cuda --dtype bfloat16
    python benchmarks/gpu_check.py --config llama-3.1-8b-instruct --device cuda --dtype bfloat16 --seq-len 2048 --budget 24GiB
    python benchmarks/gpu_check.py --config tiny-llama --device cpu        # what the test suite runs

With --budget every method runs with the settings `aaq plan --budget` chooses for it (one teacher on the
device at a time, GPTQ layer by layer, micro-batches, offloading), and each stage's peak is checked against it.
    torchrun --nproc-per-node 2 benchmarks/gpu_check.py --device cuda     # the quantize stages split over 2 GPUs

Under torchrun every process runs the quantize stages on its own GPU (aaq.runtime.distributed splits them) in
process 0's work folder, and process 0 prints and writes the JSON; evaluation, save and export, which aaq
does not split, are left to the one-process check (compressed-tensors' export would itself try to work
with the other processes of an initialised group).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from aaq.api import CalibrationConfig, QuantizeConfig, quantize
from aaq.calibration.loop import CalibrationSettings
from aaq.calibration.losses import LossConfig
from aaq.data.corpus import python_docs_files
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig, evaluate
from aaq.exporting import ExportConfig, export
from aaq.methods import AAQConfig, GPTQConfig, MethodConfig, OSTQuantConfig, QuaRotConfig
from aaq.runs.checkpoint import save_quantized
from aaq.runs.records import provenance, write_json
from aaq.runtime import distributed
from aaq.runtime.devices import Placement, StageMeter, StageRecord, dispatched
from aaq.runtime.memory import GiB, estimate, fit_to_budget, fitted_settings, parse_budget

CONFIGS = Path(__file__).parent / "configs"
RESULTS = Path(__file__).parent / "results"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"


def model_config(name: str) -> PretrainedConfig:
    """A shipped config by name (benchmarks/configs/<name>.json) or a path to a config.json."""
    path = Path(name) if name.endswith(".json") else CONFIGS / f"{name}.json"
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def docs_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the shipped Python docs, with at most `vocab_size` entries."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    files = [str(path) for path in python_docs_files("calibration")[:60]]
    tokenizer.train(files, trainers.WordLevelTrainer(vocab_size=min(vocab_size, 8000), special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def random_model(config: PretrainedConfig, placement: Placement, seed: int) -> PreTrainedModel:
    """The model `config` describes with seeded random weights, built on its resting device in its dtype."""
    with torch.random.fork_rng(devices=[]), torch.device(placement.rest_device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=placement.torch_dtype)
    return model.eval()


def methods(steps: int, batch: int) -> list[MethodConfig]:
    """The methods every check runs, at a small step budget."""
    training = CalibrationSettings(steps=steps, batch_size=batch, checkpoint_every=steps, rotation_lr=0.0017, scale_lr=0.00018)
    return [
        QuaRotConfig(),
        GPTQConfig(),
        OSTQuantConfig(training=replace(training, loss=LossConfig(name="kl_top"))),
        AAQConfig(training=replace(training, loss=LossConfig(name="apc", lam=1.0))),
    ]


def _row(stage: str, record: StageRecord, estimated: dict[str, Any] | None, changes: dict[str, Any]) -> dict[str, Any]:
    return {"stage": stage, **asdict(record), "estimate": estimated, "changes": changes}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Run every stage, measure it, and put the planner's estimate beside it."""
    config = model_config(args.config)
    placement = Placement(device=args.device, dtype=args.dtype)
    placement.check_available()
    tokenizer = docs_tokenizer(config.vocab_size)
    calibration = CalibrationConfig(n_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch)
    # A random model has no full-precision answers worth calibrating the garbled check on.
    evaluation = EvalConfig(
        tasks="ppl,refusal", ppl=PerplexityConfig(n_samples=2, seq_len=args.seq_len, batch_size=1), max_new_tokens=16, max_prompts=4, batch_size=4,
        garbled_check=False,
    )  # fmt: skip
    tokens = torch.randint(4, len(tokenizer), (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="aaq-gpu-check-") as own:
        work = distributed.from_main(own, "the work folder")  # under torchrun: process 0's, shared by all
        for method in methods(args.steps, args.batch):
            qconfig = QuantizeConfig(method=method, bits="w4a4kv4", calibration=calibration)
            placement, changes = Placement(device=args.device, dtype=args.dtype), {}
            if args.budget:
                fit = fit_to_budget(config, qconfig, placement, evaluation, parse_budget(args.budget), args.batch)
                qconfig, placement, _ = fitted_settings(config, qconfig, placement, evaluation, fit, args.batch)
                changes = {name: value for name, value in fit.changes.items() if name != "eval_batch_size"}
            training = qconfig.method.calibration_settings()
            teacher_batch = args.batch if training is None else training.teacher_batch or args.batch
            planned = {s.stage: asdict(s) for s in estimate(config, qconfig, placement, evaluation, teacher_batch=teacher_batch)}
            model = random_model(config, placement, seed=0)
            reference: Callable[[], PreTrainedModel] | None = partial(random_model, config, placement, seed=1) if method.needs_reference() else None
            result = quantize(model, qconfig, calibration=tokens, reference=reference, run_dir=Path(work) / method.name, placement=placement)
            rows += [_row(f"{method.name}/{name}", record, planned.get(name), changes) for name, record in result.stages.items()]
            if method.name == "aaq" and not distributed.active():
                meter = StageMeter(placement.compute_device)
                with meter.stage("eval"), dispatched(model, placement):
                    evaluate(model, tokenizer, evaluation, Path(work) / "eval")
                with meter.stage("save"):
                    save_quantized(result, tokenizer, Path(work) / "run")
                for fmt in ("aaq", "compressed-tensors"):
                    with meter.stage(f"export_{fmt}"):
                        export(Path(work) / "run", Path(work) / f"export-{fmt}", ExportConfig(format=fmt))
                rows += [_row(f"aaq/{name}", record, planned.get(name), changes) for name, record in meter.records.items()]
            del model, result
    return {"config": args.config, "placement": asdict(placement), "settings": vars(args) | {"out": str(args.out)}, "stages": rows, **provenance()}


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GiB:6.2f}"


def print_table(result: dict[str, Any]) -> None:
    """Per stage: seconds, measured peaks and the planner's estimates (GiB)."""
    print(f"{'stage':<28} {'seconds':>8} {'device':>7} {'host':>7} {'anon':>7}   {'est. device':>11} {'est. host':>9}")
    for row in result["stages"]:
        est = row["estimate"] or {}
        print(f"{row['stage']:<28} {row['seconds']:8.1f} {_gib(row['peak_device']):>7} {_gib(row['peak_host']):>7} "
              f"{_gib(row['peak_host_anon']):>7}   {_gib(est.get('device')):>11} {_gib(est.get('host')):>9}")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the options, run the check, print and write its results."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="llama-3.1-8b-instruct", help="a name in benchmarks/configs or a config.json path")
    parser.add_argument("--device", default=None, help="compute device (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence")
    parser.add_argument("--batch", type=int, default=2, help="calibration batch (and teacher batch)")
    parser.add_argument("--steps", type=int, default=2, help="calibration steps of OSTQuant and AAQ")
    parser.add_argument("--budget", help="device memory to fit, e.g. 24GiB: each method runs with the settings the planner chooses for it")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/gpu_check_<config>_<device>.json)")
    args = parser.parse_args(argv)
    with distributed.process_group(Placement(device=args.device).compute_device):
        result = run_check(args)
    if not distributed.launched().is_main:
        return result
    out = args.out or RESULTS / f"gpu_check_{Path(args.config).stem}_{result['placement']['device'] or 'default'}.json"
    write_json(out, result)
    print_table(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
