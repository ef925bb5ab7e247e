"""The memory planner: stage estimates from a config alone, that react to the settings as the stages do, and a budget fit."""

from dataclasses import replace

import pytest

from aaq.api import CalibrationConfig, QuantizeConfig
from aaq.calibration.loop import CalibrationSettings
from aaq.calibration.losses import LossConfig
from aaq.eval.suite import EvalConfig
from aaq.methods import AAQConfig, QuaRotConfig
from aaq.runtime.devices import Placement
from aaq.runtime.memory import GiB, estimate, fit_to_budget, format_plan, plan_memory
from benchmarks.gpu_check import model_config

LLAMA_8B = model_config("llama-3.1-8b-instruct")
PAPER = QuantizeConfig(
    method=AAQConfig(training=CalibrationSettings(steps=150, batch_size=4, loss=LossConfig(name="apc", lam=0.1))),
    calibration=CalibrationConfig(n_samples=128, seq_len=2048),
)
GPU = Placement(device="cuda", dtype="bfloat16")


def _by_stage(stages):
    return {stage.stage: stage for stage in stages}


def test_an_8b_model_at_the_papers_settings_needs_what_its_shapes_say():
    stages = _by_stage(estimate(LLAMA_8B, PAPER, GPU, EvalConfig(), teacher_batch=4))
    assert 14 * GiB < stages["load"].device < 17 * GiB  # 8.0B parameters in bfloat16
    assert stages["teachers"].device > 2 * stages["load"].device  # the reference is resident too
    assert stages["teachers"].disk > 2 * GiB  # 128 x 2048 positions x top-1000 x 6 bytes, twice
    assert stages["calibration"].device > stages["load"].device and stages["gptq"].device > stages["load"].device
    assert list(stages) == ["load", "teachers", "calibration", "gptq", "eval", "save"]


def _training(**changes):
    return replace(PAPER, method=PAPER.method.with_calibration_settings(**changes))


def test_the_settings_that_save_memory_lower_their_stage():
    base = _by_stage(estimate(LLAMA_8B, PAPER, GPU, None, teacher_batch=4))
    model = base["load"].device
    checkpointed = _training(activation_checkpointing=True)
    assert _by_stage(estimate(LLAMA_8B, checkpointed, GPU, None, 4))["calibration"].device < base["calibration"].device / 2
    micro = _by_stage(estimate(LLAMA_8B, _training(activation_checkpointing=True, micro_batch=1), GPU, None, 4))["calibration"]
    assert micro.device < _by_stage(estimate(LLAMA_8B, checkpointed, GPU, None, 4))["calibration"].device - 4 * GiB
    assert _by_stage(estimate(LLAMA_8B, PAPER, GPU, None, 1))["teachers"].device < base["teachers"].device
    # One teacher on the device: the reference and the aligned model's output head (1 GiB); the aligned model and its
    # final hidden states (128 x 2048 x 4096 bf16 = 2 GiB) wait on the host.
    sequential = _by_stage(estimate(LLAMA_8B, _training(sequential_teachers=True), GPU, None, 4))["teachers"]
    assert sequential.device == base["teachers"].device - model + 128256 * 4096 * 2
    assert sequential.host == base["teachers"].host + model + 128 * 2048 * 4096 * 2
    onloaded = replace(PAPER, method=PAPER.method.with_gptq_settings(onload_layers=True))
    offloaded = _by_stage(estimate(LLAMA_8B, PAPER, replace(GPU, max_memory={"cuda": "10GiB", "cpu": "200GiB"}), None, 1))
    # One layer on the GPU (its inputs and float64 Hessians stay), the model at rest on the host.
    for gptq in (offloaded["gptq"], _by_stage(estimate(LLAMA_8B, onloaded, GPU, None, 4))["gptq"]):
        assert gptq.device < base["gptq"].device - 13 * GiB and gptq.host > 15 * GiB
    # Accelerate fills the budget with weights (10 of the 15 GiB); the working memory comes on top.
    assert offloaded["calibration"].device == base["calibration"].device - model + 10 * GiB


def test_methods_without_learned_transforms_have_no_teacher_or_calibration_stage():
    stages = _by_stage(estimate(LLAMA_8B, QuantizeConfig(method=QuaRotConfig()), GPU, None))
    assert "teachers" not in stages and "calibration" not in stages and "gptq" in stages


@pytest.mark.parametrize(("budget", "fits"), [(80 * GiB, True), (24 * GiB, True), (16 * GiB, True), (4 * GiB, False)])
def test_a_budget_is_met_or_reported_as_unreachable(budget, fits):
    fit = fit_to_budget(LLAMA_8B, PAPER, GPU, EvalConfig(), budget, teacher_batch=4)
    assert fit.fits is fits
    if fits:
        assert max(stage.device for stage in fit.stages) <= budget


def test_the_papers_8b_run_fits_24_gib_without_offloading():
    """One teacher on the GPU at a time, GPTQ layer by layer, recomputed layers in micro-batches of 2 sequences: no streaming."""
    fit = fit_to_budget(LLAMA_8B, PAPER, GPU, EvalConfig(), 24 * GiB, teacher_batch=4)
    assert fit.changes == {"sequential_teachers": True, "onload_layers": True, "micro_batch": 2, "activation_checkpointing": True}
    # Micro-batches of 4 would not fit: the relaxation stops at the largest that does.
    larger = replace(PAPER, method=PAPER.method.with_calibration_settings(sequential_teachers=True, micro_batch=4, activation_checkpointing=True))
    assert _by_stage(estimate(LLAMA_8B, larger, GPU, EvalConfig(), 4))["calibration"].device > 24 * GiB
    # What moves over the host link: the aligned model to the host and back, each layer (218M parameters) to the GPU and back.
    model = _by_stage(fit.stages)["load"].device
    assert [(cost.stage, cost.bytes_per_pass, cost.passes) for cost in fit.costs] == [("teachers", 2 * model, 1), ("gptq", 2 * 218_103_808 * 2, 32)]
    assert all(cost.slowdown < 1.05 for cost in fit.costs)


def test_offloading_leaves_the_working_memory_beside_the_weights_and_says_what_streaming_costs():
    fit = fit_to_budget(LLAMA_8B, PAPER, GPU, EvalConfig(), 16 * GiB, teacher_batch=4)
    weights = fit.changes["max_memory"]
    assert "onload_layers" not in fit.changes  # the model rests on the host anyway
    stages = _by_stage(fit.stages)
    assert max(stage.device for stage in fit.stages) == 16 * GiB == stages["calibration"].device
    costs = {cost.stage: cost for cost in fit.costs}
    # Each teacher batch streams what of the reference and the aligned head (1 GiB) the weight budget leaves on the host.
    model = estimate(LLAMA_8B, PAPER, GPU)[0].device
    assert costs["teachers"].bytes_per_pass == model + 128256 * 4096 * 2 - weights and costs["teachers"].passes == 128
    assert costs["teachers"].transfer_s == pytest.approx(128 * costs["teachers"].bytes_per_pass / 16e9)
    assert 1 < costs["calibration"].slowdown < costs["eval"].slowdown  # decoding streams the weights for every token


def test_plan_reads_a_config_without_weights_and_prints_the_fit(tmp_path, tiny_model_dir):
    (tiny_model_dir / "model.safetensors").unlink()  # only the config is needed
    plan = plan_memory(str(tiny_model_dir), QuantizeConfig(method=QuaRotConfig()), Placement(device="cpu"), None, budget=GiB)
    text = format_plan(plan, lambda name: f"--{name}")
    assert "load" in text and "gptq" in text and "fits as configured" in text


def test_two_free_changes_are_preferred_to_offloading():
    # Offloading alone would also fit 38.6 GiB, but it is many times slower than a smaller teacher batch plus recomputation;
    # the teacher batch shrinks only as far as it must (8 would not fit, 4 does).
    fit = fit_to_budget(LLAMA_8B, PAPER, GPU, EvalConfig(), int(38.6 * GiB), teacher_batch=8)
    assert fit.fits and fit.changes == {"teacher_batch": 4, "activation_checkpointing": True}
