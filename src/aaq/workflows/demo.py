"""`aaq demo`: quantize the demo's aligned model with every method at the same bits and compare safety and utility.

The aligned model is `smollm2-135m-safe-unanchored` (instruct + the shipped safety adapter trained without a KL
anchor on plain text, see `aaq.workflows.demo_pair`), the unaligned reference of AAQ's push term is
`smollm2-135m-instruct`; the default bits W4A5KV5 and the learned methods' settings are the safety study's
(benchmarks/safety_study.py, design 2). Every
variant starts from the same loaded weights and the same calibration windows, so the differences in
the table come from the methods alone.
"""

from __future__ import annotations

import copy
import gc
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from aaq.api import CalibrationConfig, QuantizeConfig, calibration_tokens, check_reference_source
from aaq.calibration.loop import CalibrationSettings, OptimizerName
from aaq.calibration.losses import LossConfig
from aaq.errors import AaqError
from aaq.eval.coherence import CoherenceScorer
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.report import write_comparison
from aaq.eval.suite import EvalConfig, evaluate, prepare_inputs
from aaq.methods import AAQConfig, MethodConfig, OSTQuantConfig, QuaRotConfig, RTNConfig
from aaq.models.loading import load_model
from aaq.quant.quantizers import QuantScheme
from aaq.runs.folders import check_output_folder, prepare_output_folder
from aaq.runtime.devices import Placement, dispatched
from aaq.workflows.run import RunConfig, run_quantization

logger = logging.getLogger(__name__)

DEMO_METHODS = ("rtn", "quarot", "ostquant", "aaq")


@dataclass
class DemoConfig:
    """What the demo compares: aligned model, reference, bits, calibration and evaluation budgets.

    Defaults are the safety study's regime and settings (design 2), sized for at most 15 minutes on a 2-core CPU
    (benchmarks/demo_time.py): 16 x 128 calibration tokens (`heldout_windows` of them held out and their loss
    logged, none by default), `steps` = 16 transform steps of batch 1 for OSTQuant and AAQ with `optimizer` at learning rates
    `rotation_lr`/`scale_lr`, perplexity on 8 x 512 held-out tokens, all 41 HarmBench val prompts and an evenly
    spaced 48 of the 159 benign prompts (`max_prompts`), 32 new tokens per answer (the refusal detector reads the
    first 200 characters) in batches of 64. `paper_sized()` gives the paper's settings (`aaq demo --full`).
    `save_models`: also save every quantized variant's weights in its run folder, so that `aaq export`
    can ship it. `placement`: device, dtype and memory budgets of every stage.
    """

    model: str = "smollm2-135m-safe-unanchored"
    # RTN is left out by default (its W4A5KV5 answers are all garbled, PPL 136; 1.9 of the 17.6 minutes the demo
    # took with it here); `methods=("rtn", "quarot", "ostquant", "aaq")` adds it back.
    methods: tuple[str, ...] = ("quarot", "ostquant", "aaq")
    reference: str = "smollm2-135m-instruct"
    # The regime scan's rule named W4A5KV5 (benchmarks/results/regime_scan.json): there QuaRot costs the model
    # refusals while it stays coherent; at W4A4KV4 a third to a half of its answers are garbled.
    bits: str = "w4a5kv5"
    out: Path = Path("runs/demo")
    # SafetyBench is left out by default: its 35 dev questions sit near chance at 135M (12/35 for the FP model) and
    # cost 4.6 of the demo's 16.6 minutes; `tasks="ppl,refusal,benign,safetybench"` adds it back.
    tasks: str = "ppl,refusal,benign"
    seed: int = 0
    steps: int = 16
    # The safety study's tuning (three runs per method on the tuning split, benign training prompts and PPL;
    # benchmarks/results/safety_study_v2.json) chose half the paper's rates for OSTQuant (the paper's complied
    # more, twice them lost benign compliance) and lambda 1.0 for AAQ (0.1 lost benign compliance), with
    # Riemannian Adam, whose normalised steps stay near the Hadamard start where Cayley SGD walks away from it
    # (README, "The engine check").
    optimizer: OptimizerName = "riemannian_adam"
    lam: float = 1.0
    rotation_lr: float = 0.0085
    scale_lr: float = 0.0009
    # 16 windows, none held out: the study's 32 (4 held out) double GPTQ's and the teachers' time and cost the
    # held-out passes, 19.4 minutes in all on 2 cores (benchmarks/demo_time.py), over the demo's 15.
    calibration: CalibrationConfig = field(default_factory=lambda: CalibrationConfig(n_samples=16, seq_len=128))
    heldout_windows: int = 0
    calibration_batch: int = 1
    activation_checkpointing: bool = False
    ppl: PerplexityConfig = field(default_factory=lambda: PerplexityConfig(n_samples=8, seq_len=512))
    max_new_tokens: int = 32
    max_prompts: int | None = 48
    eval_batch_size: int = 64
    save_models: bool = False
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.methods = tuple(self.methods)
        QuantScheme.from_string(self.bits)
        unknown = [name for name in self.methods if name not in DEMO_METHODS]
        if unknown or not self.methods:
            raise AaqError(f"the demo compares some of {', '.join(DEMO_METHODS)}, not {', '.join(unknown) or 'none'}; list them in --methods")

    def paper_sized(self) -> DemoConfig:
        """This config with the paper's calibration (128 x 2048 tokens, 150 Cayley SGD steps of batch 4, lambda 0.1) and full
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
            optimizer="cayley_sgd",
            heldout_windows=0,
            rotation_lr=0.017,
            scale_lr=0.0018,
            ppl=PerplexityConfig(),
            max_new_tokens=64,
            max_prompts=None,
        )

    def method_configs(self) -> list[MethodConfig]:
        """The compared methods of `methods`, in the order RTN, QuaRot (Hadamard + GPTQ), OSTQuant (kl_top), AAQ (apc, `lam`)."""

        def training(loss: LossConfig) -> CalibrationSettings:
            return CalibrationSettings(
                steps=self.steps, batch_size=self.calibration_batch, optimizer=self.optimizer, rotation_lr=self.rotation_lr,
                scale_lr=self.scale_lr, loss=loss, checkpoint_every=4, activation_checkpointing=self.activation_checkpointing,
                heldout_windows=self.heldout_windows, heldout_every=2,
            )  # fmt: skip

        configs = [
            RTNConfig(),
            QuaRotConfig(),
            OSTQuantConfig(training=training(LossConfig(name="kl_top"))),
            AAQConfig(training=training(LossConfig(name="apc", lam=self.lam))),
        ]
        return [config for config in configs if config.name in self.methods]


def run_demo(config: DemoConfig) -> str:
    """Evaluate the FP aligned model and each quantized variant; write report.md/json and the safety-vs-PPL plot.

    Each variant is a run folder `out/<method>` (run.json, its evaluation), replaced when it holds
    an earlier demo's run. Returns the markdown comparison table. The output folders, the
    evaluation's inputs and the reference's vocabulary are checked before the first evaluation.
    """
    eval_config = EvalConfig(
        tasks=config.tasks, ppl=config.ppl, seed=config.seed, max_new_tokens=config.max_new_tokens,
        batch_size=config.eval_batch_size, max_prompts=config.max_prompts,
    )  # fmt: skip
    methods = config.method_configs()
    check_output_folder(config.out, "report")
    check_output_folder(config.out / "fp", "eval")
    for method in methods:
        check_output_folder(config.out / method.name, "run", overwrite=True)
    inputs = prepare_inputs(eval_config)
    aligned, tokenizer = load_model(config.model, config.placement)
    check_reference_source(config.reference, aligned, tokenizer)
    prepare_output_folder(config.out, "report")
    calibration = calibration_tokens(tokenizer, QuantizeConfig(bits=config.bits, calibration=config.calibration, seed=config.seed))
    logger.info("[1/%d] evaluating the full-precision aligned model %s", len(methods) + 1, config.model)
    meta = {"model": config.model, "reference": config.reference, "method": "fp", "bits": "fp"}
    # The FP aligned model stays in memory for the whole demo: it scores every variant's answers.
    scorer = CoherenceScorer(aligned, tokenizer, config.model) if eval_config.checks_coherence else None
    with dispatched(aligned, config.placement):
        report = evaluate(aligned, tokenizer, eval_config, config.out / "fp", meta=meta, scorer=scorer, inputs=inputs)
    reports = [report | {"run_dir": str(config.out / "fp")}]
    for number, method in enumerate(methods, start=2):
        logger.info("[%d/%d] quantizing with %s at %s", number, len(methods) + 1, method.name, config.bits)
        run = RunConfig(
            model=config.model,
            out=config.out / method.name,
            quantize=QuantizeConfig(method=method, bits=config.bits, calibration=config.calibration, seed=config.seed),
            reference=config.reference if method.needs_reference() else None,
            evaluation=eval_config,
            save_model=config.save_models,
            overwrite=True,
            placement=config.placement,
        )
        result = run_quantization(run, model=copy.deepcopy(aligned), tokenizer=tokenizer, calibration=calibration, scorer=scorer)
        reports.append(result.report | {"run_dir": str(run.out)})
        logger.info("%s done: %s", method.name, result.record["metrics"])
        gc.collect()
    title = f"aaq demo: {config.model} (reference {config.reference}), {config.bits}, seed {config.seed}"
    return write_comparison(reports, config.out, title, extra={"config": asdict(config)})
