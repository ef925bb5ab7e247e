"""`aaq demo`: quantize the demo's aligned model with every method at the same bits and compare safety and utility.

The aligned model is `smollm2-135m-safe` (instruct + the shipped safety adapter, see
`aaq.demo_pair`), the unaligned reference of AAQ's push term is `smollm2-135m-instruct`. Every
variant starts from the same loaded weights and the same calibration windows, so the differences in
the table come from the methods alone.
"""

from __future__ import annotations

import copy
import gc
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from aaq.api import CalibrationConfig, QuantizeConfig, calibration_tokens, load_reference, quantize
from aaq.calibrate import CalibrationSettings
from aaq.eval.coherence import CoherenceScorer
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.report import comparison_table, plot_safety_vs_ppl
from aaq.eval.suite import EvalConfig, evaluate
from aaq.loading import load_model
from aaq.losses import LossConfig
from aaq.methods import AAQConfig, MethodConfig, OSTQuantConfig, QuaRotConfig, RTNConfig
from aaq.runs import provenance, write_atomic, write_json

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """What the demo compares: aligned model, reference, bits, calibration and evaluation budgets.

    Defaults are sized for <= 15 minutes on a 2-core CPU (10.4 min measured): 16 x 128 calibration
    tokens, `steps` = 16 transform steps of batch 1 for OSTQuant and AAQ at learning rates `rotation_lr`/`scale_lr`,
    perplexity on 8 x 512 held-out tokens, all 41 HarmBench val prompts and an evenly spaced 80 of
    the 159 benign prompts (`max_prompts`), 48 new tokens per answer (the refusal detector reads the
    first 200 characters) in batches of 16. `paper_sized()` gives the paper's settings (`aaq demo --full`).
    """

    model: str = "smollm2-135m-safe"
    reference: str = "smollm2-135m-instruct"
    bits: str = "w4a4kv4"
    out: Path = Path("runs/demo")
    tasks: str = "ppl,refusal,benign,safetybench"
    seed: int = 0
    steps: int = 16
    # Chosen on the tuning split and held-out PPL (README, "Does the push term help?"): at batch 1 the
    # paper's rates (0.017 / 0.0018) raise W4A4KV4 perplexity from 31 to 42-74 within 16 steps, and
    # lambda 1.0 had the highest tuning-split refusal of 0.1 / 0.3 / 1.0 at these rates.
    lam: float = 1.0
    rotation_lr: float = 0.0017
    scale_lr: float = 0.00018
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(n_samples=16, seq_len=128))
    calibration_batch: int = 1
    activation_checkpointing: bool = False
    ppl: PerplexityConfig = field(default_factory=lambda: PerplexityConfig(n_samples=8, seq_len=512))
    max_new_tokens: int = 48
    max_prompts: int | None = 80
    eval_batch_size: int = 16

    def paper_sized(self) -> "DemoConfig":
        """This config with the paper's calibration (128 x 2048 tokens, 150 steps of batch 4, lambda 0.1) and full
        evaluation budgets."""
        return replace(
            self,
            steps=150,
            lam=0.1,
            calibration=CalibrationConfig(n_samples=128, seq_len=2048),
            calibration_batch=4,
            # Without recomputing each layer a 4 x 2048-token step would keep ~20 GB of activations on
            # smollm2 (7.1 GB peak measured at 1 x 2048); with it: 11.4 GB and 75 s per step measured.
            activation_checkpointing=True,
            rotation_lr=0.017,
            scale_lr=0.0018,
            ppl=PerplexityConfig(),
            max_new_tokens=64,
            max_prompts=None,
        )

    def methods(self) -> list[MethodConfig]:
        """The compared methods: RTN, QuaRot (Hadamard + GPTQ), OSTQuant (kl_top) and AAQ (apc, `lam`)."""

        def training(loss: LossConfig) -> CalibrationSettings:
            return CalibrationSettings(
                steps=self.steps, batch_size=self.calibration_batch, rotation_lr=self.rotation_lr, scale_lr=self.scale_lr,
                loss=loss, checkpoint_every=4, activation_checkpointing=self.activation_checkpointing,
            )  # fmt: skip

        return [
            RTNConfig(),
            QuaRotConfig(),
            OSTQuantConfig(training=training(LossConfig(name="kl_top"))),
            AAQConfig(training=training(LossConfig(name="apc", lam=self.lam))),
        ]


def run_demo(config: DemoConfig) -> str:
    """Evaluate the FP aligned model and each quantized variant; write report.md/json and the safety-vs-PPL plot.

    Returns the markdown comparison table.
    """
    aligned, tokenizer = load_model(config.model)
    eval_config = EvalConfig(
        tasks=config.tasks, ppl=config.ppl, seed=config.seed, max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size, max_prompts=config.max_prompts,
    )  # fmt: skip
    methods = config.methods()
    calibration = calibration_tokens(tokenizer, QuantizeConfig(bits=config.bits, calibration=config.calibration, seed=config.seed))
    logger.info("[1/%d] evaluating the full-precision aligned model %s", len(methods) + 1, config.model)
    meta = {"model": config.model, "reference": config.reference}
    # The FP aligned model stays in memory for the whole demo: it scores every variant's answers.
    scorer = CoherenceScorer(aligned, tokenizer, config.model)
    reports = [
        evaluate(aligned, tokenizer, eval_config, config.out / "fp", meta=meta | {"method": "fp", "bits": "fp"}, scorer=scorer)
        | {"run_dir": str(config.out / "fp")}
    ]
    for number, method in enumerate(methods, start=2):
        logger.info("[%d/%d] quantizing with %s at %s", number, len(methods) + 1, method.name, config.bits)
        model = copy.deepcopy(aligned)
        reference = load_reference(config.reference, model, tokenizer) if method.needs_reference() else None
        quantize_config = QuantizeConfig(method=method, bits=config.bits, calibration=config.calibration, seed=config.seed)
        start = time.perf_counter()
        quantize(model, quantize_config, calibration=calibration, reference=reference)
        seconds = time.perf_counter() - start
        del reference
        gc.collect()
        run_dir = config.out / method.name
        run_meta = meta | {"method": method.name, "bits": config.bits, "quantize_s": round(seconds, 1)}
        reports.append(evaluate(model, tokenizer, eval_config, run_dir, meta=run_meta, scorer=scorer) | {"run_dir": str(run_dir)})
        logger.info("%s done: %s", method.name, reports[-1]["metrics"])
        del model
        gc.collect()
    table = comparison_table(reports)
    summary = {"runs": reports, "config": asdict(config)}  # write_json turns the Path into text
    write_json(config.out / "report.json", summary | provenance())
    title = f"# aaq demo: {config.model} (reference {config.reference}), {config.bits}, seed {config.seed}"
    write_atomic(config.out / "report.md", lambda tmp: tmp.write_text(f"{title}\n\n{table}\n"))
    if any(r["metrics"].get("refusal_rate") is not None for r in reports):
        plot_safety_vs_ppl(reports, config.out / "safety_vs_ppl.png")
    return table
