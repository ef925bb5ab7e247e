"""Cached-teacher calibration step vs the uncached three-forward step: median time and peak RSS.

Targets: time_ratio = cached / uncached <= 0.65, peak_mem_ratio = cached / uncached <= 0.70.
The model is quantized W4A4KV4 with learnable transforms (the `aaq` student); aligned = the model,
reference = the same model with perturbed weights (only timing and memory matter here). By default
the student is the one `aaq`/`ostquant` calibrate before GPTQ (weights unquantized in the loop);
`--weights-in-loop` measures the RTN variant and `--activation-checkpointing` the memory-saving
mode; each configuration writes its own JSON. One run
of this script builds the teacher cache, then measures each mode in its own subprocess, so the two
peak-RSS high-water marks are independent; each subprocess resets its high-water mark after loading
(Linux `clear_refs`) so only the resident models and the steps count. The modes run twice, in the
order cached, uncached, uncached, cached, so that a load on the machine that drifts during the run
weighs on both alike; each mode's step time is the median over both of its runs, its peak RSS the
larger of the two. Writes benchmarks/results/calibration_step[_weights_in_loop][_checkpointed].json.

    python benchmarks/calibration_step.py [--model smollm2-135m-instruct] [--batch 2] [--seq-len 256] [--steps 5]
        [--weights-in-loop] [--activation-checkpointing]

On a shared machine run it with OMP_NUM_THREADS=1: two-thread torch processes competing for two
cores slow small kernels down by an order of magnitude, which swamps the comparison.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aaq.api import CalibrationConfig, QuantizeConfig, calibration_tokens
from aaq.calibration.loop import CalibrationSettings, activation_checkpointing, batch_indices, build_optimizers, student_loss
from aaq.calibration.losses import LossConfig
from aaq.calibration.teachers import TeacherCache, build_teacher_cache, cached_teacher, live_teacher
from aaq.methods.ostquant import install_for_calibration
from aaq.models import transform_plan
from aaq.models.loading import load_model
from aaq.models.plan import TransformConfig
from aaq.quant.quantizers import QuantScheme
from aaq.runs.records import provenance, write_json

RESULTS = Path(__file__).parent / "results" / "calibration_step.json"
LOSS = LossConfig(name="apc", lam=0.1, k=1000)
# ABBA: a load on the shared machine that drifts linearly during the run weighs on both modes alike.
ROUND_ORDER = ("cached", "uncached", "uncached", "cached")


def _tokens(tokenizer, args: argparse.Namespace) -> torch.Tensor:
    n_samples = args.batch * 4
    config = QuantizeConfig(calibration=CalibrationConfig(dataset="python-docs", n_samples=n_samples, seq_len=args.seq_len))
    return calibration_tokens(tokenizer, config)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """A stand-in for the unaligned reference: every weight plus 1% relative noise."""
    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return reference


def _logits_fn(model):
    return lambda batch: model(input_ids=batch, use_cache=False).logits


def _build_cache(args: argparse.Namespace) -> None:
    model, tokenizer = load_model(args.model)
    tokens = _tokens(tokenizer, args)
    with torch.no_grad():
        reference = _perturbed(model)
        build_teacher_cache(_logits_fn(model), _logits_fn(reference), tokens, args.workdir / "cache", LOSS.k, torch.float16, args.batch)


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _measure(args: argparse.Namespace) -> dict:
    model, tokenizer = load_model(args.model)
    tokens = _tokens(tokenizer, args)
    if args.mode == "cached":
        teacher = cached_teacher(TeacherCache.open(args.workdir / "cache", tokens))
    else:
        aligned = copy.deepcopy(model).requires_grad_(False)
        teacher = live_teacher(aligned, _perturbed(model), tokens, LOSS)
    scheme = QuantScheme.from_string("w4a4kv4")
    transforms = TransformConfig(smoothing=True)
    setup = install_for_calibration(model, transform_plan(model), scheme, transforms, seed=0, weights_in_loop=args.weights_in_loop)
    settings = CalibrationSettings(batch_size=args.batch, loss=LOSS, cache=args.mode == "cached")
    optimizers = build_optimizers(setup.transforms, settings).values()
    times = []
    with activation_checkpointing(model, args.activation_checkpointing):
        for step in range(args.steps + 1):
            if step == 1:  # the first step is a warm-up (allocator, optimiser state)
                _reset_peak_rss()
            start = time.perf_counter()
            indices = batch_indices(step, tokens.shape[0], args.batch, seed=0)
            terms = student_loss(model, tokens[indices], teacher(indices), LOSS)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            for optimizer in optimizers:
                optimizer.step()
            times.append(time.perf_counter() - start)
    return {"median_step_s": statistics.median(times[1:]), "peak_rss_mb": _peak_rss_mb(), "step_times_s": times[1:]}


def _default_out(args: argparse.Namespace) -> Path:
    """results/calibration_step[_weights_in_loop][_checkpointed].json: one file per configuration."""
    suffix = "_weights_in_loop" * args.weights_in_loop + "_checkpointed" * args.activation_checkpointing
    return RESULTS.with_name(f"calibration_step{suffix}.json")


def _run_mode(mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--mode", mode, "--workdir", str(args.workdir), "--model", args.model]
    command += ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    command += ["--weights-in-loop"] if args.weights_in_loop else []
    command += ["--activation-checkpointing"] if args.activation_checkpointing else []
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _combine(runs: list[dict]) -> dict:
    """One mode's result over its runs: median step time over all steps, the largest peak RSS."""
    times = [t for run in runs for t in run["step_times_s"]]
    peaks = [run["peak_rss_mb"] for run in runs]
    return {"median_step_s": statistics.median(times), "peak_rss_mb": max(peaks), "step_times_s": times, "peak_rss_mb_per_run": peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--weights-in-loop",
        action="store_true",
        help="fake-quantize the weights every step (the calibration used when RTN follows); default: the GPTQ default, weights unquantized",
    )
    parser.add_argument("--activation-checkpointing", action="store_true", help="measure the memory-saving calibration mode")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default: {RESULTS.name} in {RESULTS.parent})")
    parser.add_argument("--mode", choices=["cached", "uncached", "build"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "build":
        _build_cache(args)
        return
    if args.mode is not None:
        print(json.dumps(_measure(args)))
        return
    with tempfile.TemporaryDirectory(prefix="aaq-bench-") as workdir:
        args.workdir = Path(workdir)
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--mode", "build", "--workdir", workdir, "--model", args.model,
                        "--batch", str(args.batch), "--seq-len", str(args.seq_len)], check=True)
        cache_s = time.perf_counter() - start
        runs: dict[str, list[dict]] = {"cached": [], "uncached": []}
        for mode in ROUND_ORDER:
            runs[mode].append(_run_mode(mode, args))
        cached, uncached = _combine(runs["cached"]), _combine(runs["uncached"])
    result = {
        "time_ratio": cached["median_step_s"] / uncached["median_step_s"],
        "peak_mem_ratio": cached["peak_rss_mb"] / uncached["peak_rss_mb"],
        "targets": {"time_ratio": 0.65, "peak_mem_ratio": 0.70},
        "cached": cached,
        "uncached": uncached,
        "cache_build_process_s": cache_s,
        "model": args.model,
        "bits": "w4a4kv4",
        "tokens_per_step": args.batch * args.seq_len,
        "steps": args.steps,
        "loss": "apc (k=1000)",
        "weights_in_loop": args.weights_in_loop,
        "activation_checkpointing": args.activation_checkpointing,
        **provenance(),
    }
    write_json(args.out or _default_out(args), result)
    print(json.dumps({k: result[k] for k in ("time_ratio", "peak_mem_ratio", "targets")} | {
        "cached_step_s": cached["median_step_s"], "uncached_step_s": uncached["median_step_s"],
        "cached_peak_rss_mb": cached["peak_rss_mb"], "uncached_peak_rss_mb": uncached["peak_rss_mb"]}, indent=2))


if __name__ == "__main__":
    main()
