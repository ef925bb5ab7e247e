"""How smooth is the calibration loss of learned transforms at 4-bit activations? (issue 20, item 2's diagnosis)

On the faithful aligned model `smollm2-135m-safe-unanchored`, with OSTQuant's learnable transforms at their
start (random Hadamard R1/R2, unit smoothing scales) installed in the activation form that calibration uses
(weights unquantized, as before GPTQ), this script measures:

1. `nudge`: the student's KL to the FP model per position on 4 calibration windows (4 x 128 tokens), at the
   start and with R1 turned by a tiny random rotation (R1 expm(A), A skew, entries ~1e-7: a relative change
   of about 3e-6, far below any learning step), for W16A4KV4, W16A4 and W16A16KV4. The same inputs twice
   give the same loss (checked); what a nudge changes is where the activations round.
2. `gradients`: the cosine between the R1 gradients (their skew-symmetric, Riemannian direction) of 8
   different windows, and of one window before and after a nudge, with the activation quantizers' scale
   gradient (the range path, as calibration runs) and with scale and zero point detached (STE on the
   values only).
3. `ppl`: held-out perplexity (8 x 512 tokens) of the start and of three nudged copies.

    OMP_NUM_THREADS=1 python benchmarks/a4_sensitivity.py --out benchmarks/results/a4_sensitivity.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import aaq
from aaq.calibration.loop import student_loss
from aaq.calibration.losses import LossConfig, teacher_targets
from aaq.eval.perplexity import PerplexityConfig, evaluate_perplexity
from aaq.methods.ostquant import install_for_calibration
from aaq.models.plan import TransformConfig
from aaq.quant import quantizers
from aaq.transforms import learnable as aaq_transforms

MODEL = "smollm2-135m-safe-unanchored"
NUDGE = 1e-7


def student(bits: str, n_windows: int = 0, seed: int = 0):
    """The faithful model with OSTQuant's starting transforms installed in the activation form, n calibration windows
    and the FP model's logits on them (computed before the transforms go in); (model, tokenizer, transforms, tokens, logits)."""
    from aaq.api import calibration_windows

    model, tokenizer = aaq.load(MODEL)
    tokens = calibration_windows(tokenizer, aaq.CalibrationConfig(dataset="python-docs", n_samples=max(n_windows, 1), seq_len=128), 0)[:n_windows]
    with torch.no_grad():
        logits = model(input_ids=tokens, use_cache=False).logits.float() if n_windows else None
    setup = install_for_calibration(model, aaq.transform_plan(model), aaq.QuantScheme.from_string(bits), TransformConfig(smoothing=True), seed, False)
    return model, tokenizer, setup.transforms, tokens, logits


@contextmanager
def nudged(r1: torch.nn.Parameter, seed: int):
    """R1 turned by exp(A) with A skew-symmetric, entries of order NUDGE; restored afterwards."""
    base = r1.detach().clone()
    a = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        r1.copy_((base.double() @ torch.linalg.matrix_exp((a - a.T) * NUDGE)).to(base.dtype))
    try:
        yield float((r1.detach() - base).norm() / base.norm())
    finally:
        with torch.no_grad():
            r1.copy_(base)


def per_position_kl(model, tokens: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        log_q = model(input_ids=tokens, use_cache=False).logits.float().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def nudge_study(bits: str) -> dict:
    model, _, transforms, tokens, logits = student(bits, 4)
    log_p = logits.log_softmax(-1)
    start = per_position_kl(model, tokens, log_p)
    again = per_position_kl(model, tokens, log_p)
    out = {"bits": bits, "deterministic": bool(torch.equal(start, again)), "start_mean_kl": start.mean().item(),
           "start_kl_per_window": start.mean(1).tolist(), "nudges": []}  # fmt: skip
    for seed in range(3):
        with nudged(transforms.r1, seed) as relative:
            kl = per_position_kl(model, tokens, log_p)
        d = (kl - start).abs()
        out["nudges"].append({
            "relative_change_of_r1": relative, "mean_kl": kl.mean().item(), "kl_per_window": kl.mean(1).tolist(),
            "abs_change_per_position_median": d.median().item(), "abs_change_per_position_mean": d.mean().item(),
            "abs_change_per_position_p90": d.quantile(0.9).item(),
        })  # fmt: skip
    return out


def _detached_scale(x: torch.Tensor, spec) -> torch.Tensor:
    grouped = quantizers._grouped(x, spec.group_size)
    scale, zero = quantizers.quant_params(grouped.detach(), spec, spec.clip_ratio)
    return quantizers.fake_quantize_grouped(grouped, scale, zero, spec).flatten(-2)


def gradient_study(bits: str, detach_scale: bool, n: int = 8) -> dict:
    model, _, transforms, tokens, z_a = student(bits, n)
    loss = LossConfig(name="kl_top")
    # The activation form's quantizers call the function through aaq.transforms.learnable, the others through aaq.quant.quantizers.
    modules = (quantizers, aaq_transforms)
    saved = [module.fake_quantize_for_training for module in modules]
    if detach_scale:
        for module in modules:
            module.fake_quantize_for_training = _detached_scale
    try:

        def direction(i: int) -> torch.Tensor:
            for p in transforms.parameters():
                p.grad = None
            student_loss(model, tokens[i : i + 1], teacher_targets(z_a[i : i + 1]), loss).total.backward()
            g, r = transforms.r1.grad.double(), transforms.r1.detach().double()
            return (g @ r.T - r @ g.T).flatten()

        grads = [direction(i) for i in range(n)]
        same = []
        for seed in range(3):
            with nudged(transforms.r1, seed):
                same.append(direction(0))
    finally:
        for module, function in zip(modules, saved, strict=True):
            module.fake_quantize_for_training = function

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(x @ y / x.norm() / y.norm())

    between = [cos(grads[i], grads[j]) for i, j in itertools.combinations(range(n), 2)]
    mean = sum(grads) / n
    return {
        "bits": bits, "scale_gradient": not detach_scale,
        "cos_same_window_nudged": [cos(grads[0], g) for g in same],
        "cos_between_windows_mean": sum(between) / len(between), "cos_between_windows": between,
        "mean_gradient_norm_over_mean_norm": float(mean.norm() / (sum(g.norm() for g in grads) / n)), "pure_noise_ratio": n**-0.5,
    }  # fmt: skip


def ppl_study(bits: str, seed: int) -> dict:
    model, tokenizer, transforms, _, _ = student(bits, 0, seed)
    config = PerplexityConfig(dataset="python-docs", n_samples=8, seq_len=512)
    start = evaluate_perplexity(model, tokenizer, config).ppl
    nudges = []
    for s in range(3):
        with nudged(transforms.r1, 100 + s):
            nudges.append(evaluate_perplexity(model, tokenizer, config).ppl)
    return {"bits": bits, "seed": seed, "ppl_start": start, "ppl_nudged": nudges}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "a4_sensitivity.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.process_time()
    body = {
        "nudge": [nudge_study(bits) for bits in ("w16a4kv4", "w16a4", "w16a16kv4")],
        "gradients": [gradient_study("w16a4kv4", detach) for detach in (False, True)] + [gradient_study("w16a16kv4", False)],
        "ppl": [ppl_study("w16a4kv4", 0)],
    }
    from aaq.runs.records import provenance

    body |= {"design": __doc__, "model": MODEL, "nudge_entry_scale": NUDGE, "cpu_s": time.process_time() - started, **provenance()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=1) + "\n")
    json.dump({k: body[k] for k in ("nudge", "gradients", "ppl")}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
