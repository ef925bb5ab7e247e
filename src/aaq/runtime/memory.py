"""Memory: each stage's peak estimated from a model config alone (`aaq plan`), and measured in a real run.

The estimates count the tensors a stage holds at its peak, from the shapes in the model config and
the run's settings; the constants below say what each term stands for and were checked against
peaks measured with `aaq.runtime.devices.StageMeter` (`benchmarks/memory_plan.py`: smollm2-135m and a random 1B Llama).
On a CPU the device is the host, so a stage's peak is one number.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from aaq.api import QuantizeConfig
from aaq.errors import AaqError
from aaq.eval.perplexity import NLL_CHUNK
from aaq.eval.suite import EvalConfig
from aaq.models.base import ModelAdapter
from aaq.models.plan import Geometry
from aaq.runtime.devices import Placement

GiB = 2**30
# Resident after importing torch, transformers and aaq and loading a tokenizer (measured 0.3-0.4 GiB
# beside the weights at the end of loading), and once the run's calibration text, token cache and
# torch's own pools have grown (0.5-0.7 GiB beside the tensors counted in the later stages).
LOAD_BASELINE = int(0.4 * GiB)
HOST_BASELINE = int(0.7 * GiB)
# Float32 values one token keeps per decoder layer for the backward of a calibration step, and the
# backward's temporaries, in units of the hidden size and of the MLP width: the norms (float32
# upcasts), the transform hooks around each quantizer (input, quantized value, d(out)/d(scale) and
# its int8 code), RoPE'd q/k, attention output and log-sum-exp, SiLU(gate) * up. Fitted to one
# forward+backward at 128 and 512 tokens on smollm2 (d 576, MLP 1536, 30 layers; 4.1 MB per token)
# and at 128 and 384 tokens on a random 1B Llama (d 2048, MLP 6144, 16 layers; 7.2 MB per token).
SAVED_PER_HIDDEN = 19
SAVED_PER_MLP = 11
# Float32 (hidden x hidden) matrices per decoder layer that the activation form builds from R1 and
# the smoothing scales (the transform and its inverse, for the attention and the MLP inputs) and keeps
# for the backward: independent of the tokens (measured: 0.17 GB on smollm2, 1.1 GB at 1B).
TRANSFORM_MATRICES_PER_LAYER = 4
# Copies of the (tokens, vocab) logits alive at a calibration step's peak: the logits, their float32
# log-softmax kept for the backward, and the two gradients.
LOGIT_COPIES = 4
# Rows of teacher logits turned into targets at once (aaq.calibration.teachers), and the float32 (rows, vocab)
# buffers that takes (aaq.calibration.losses.teacher_targets): both log-softmaxes and |z_a - z_b|, plus the
# float32 copies of both teachers' logits when the model computes in 16 bits.
TARGET_ROWS = 512
TARGET_COPIES_FP32 = 3
TARGET_COPIES_16BIT = 5
# The host budget the planner assumes when it offloads: the host holds what the device does not.
HOST_UNBOUNDED = "1TiB"


@dataclass(frozen=True)
class StageMemory:
    """A stage's peak: bytes on the compute device, on the host, and written to disk."""

    stage: str
    device: int
    host: int
    disk: int = 0
    note: str = ""


@dataclass(frozen=True)
class Shapes:
    """The sizes the estimates are built from."""

    geometry: Geometry
    tied: bool
    bytes_per_value: int

    @property
    def layer_params(self) -> int:
        """Projection weights of one decoder layer."""
        g = self.geometry
        attention = g.hidden_size * g.head_dim * (2 * g.num_heads + 2 * g.num_kv_heads)
        return attention + 3 * g.hidden_size * g.intermediate_size

    @property
    def embedding_params(self) -> int:
        """The embedding table (the lm_head is as large)."""
        return self.geometry.vocab_size * self.geometry.hidden_size

    def model_bytes(self, untied: bool) -> int:
        """Every weight of the model in its dtype; `untied`: the lm_head has its own copy (after norm fusion)."""
        heads = 1 if self.tied and not untied else 2
        return (self.geometry.num_layers * self.layer_params + heads * self.embedding_params) * self.bytes_per_value


def shapes_of(config: PretrainedConfig, placement: Placement) -> Shapes:
    """The sizes of a model described by its transformers config."""
    return Shapes(ModelAdapter.geometry(config), bool(getattr(config, "tie_word_embeddings", False)), placement.torch_dtype.itemsize)


def _transform_bytes(g: Geometry, smoothing: bool, optimizer_states: int) -> int:
    """The learnable transforms with their gradients and optimiser states (float32)."""
    values = g.hidden_size**2 + g.num_layers * g.head_dim**2
    if smoothing:
        values += g.num_layers * (2 * g.hidden_size + g.num_kv_heads * g.head_dim + g.intermediate_size)
    return 4 * values * (2 + optimizer_states)


def _calibration_bytes(s: Shapes, quantize: QuantizeConfig) -> tuple[int, str]:
    """The part of a calibration step on top of the resident model: activations, logits, transforms, targets."""
    g, training = s.geometry, quantize.method.calibration_settings()
    tokens = training.batch_size * quantize.calibration.seq_len
    per_layer = 4 * tokens * (SAVED_PER_HIDDEN * g.hidden_size + SAVED_PER_MLP * g.intermediate_size)
    matrices = 4 * TRANSFORM_MATRICES_PER_LAYER * g.hidden_size**2
    if training.activation_checkpointing:
        activations = g.num_layers * tokens * g.hidden_size * s.bytes_per_value + per_layer + matrices
    else:
        activations = g.num_layers * (per_layer + matrices)
    logits = tokens * g.vocab_size * (s.bytes_per_value + (LOGIT_COPIES - 1) * 4)
    loss = training.loss
    push_width = 0 if not loss.needs_reference else g.vocab_size if loss.push_tokens == "vocab" else min(loss.resolved_push_k, g.vocab_size)
    targets = tokens * (min(loss.k, g.vocab_size) + push_width) * 12
    states = 2 if training.optimizer == "riemannian_adam" else 1
    weight_form = quantize.method.calibrates_quantized_weights(quantize.resolved_scheme())
    # The weight form rebuilds every weight each step and keeps it (and its quantizer's record) for the backward.
    weights = g.num_layers * s.layer_params * 9 if weight_form else 0
    total = activations + logits + targets + weights + _transform_bytes(g, quantize.method.learned_transforms().smoothing, states)
    return total, "activation checkpointing" if training.activation_checkpointing else "all activations kept"


def _teacher_bytes(s: Shapes, quantize: QuantizeConfig, teacher_batch: int) -> int:
    """One teacher batch of full-vocabulary logits for each teacher, and the targets' temporaries."""
    teachers = 2 if quantize.method.needs_reference() else 1
    logits = teachers * teacher_batch * quantize.calibration.seq_len * s.geometry.vocab_size * s.bytes_per_value
    copies = TARGET_COPIES_FP32 if s.bytes_per_value == 4 else TARGET_COPIES_16BIT
    return logits + copies * TARGET_ROWS * s.geometry.vocab_size * 4


def _gptq_bytes(s: Shapes, quantize: QuantizeConfig) -> int:
    """One layer's weights, its inputs and outputs for every calibration sequence, the float64 Hessians and their factorisation."""
    g = s.geometry
    positions = quantize.calibration.n_samples * quantize.calibration.seq_len
    hidden = 2 * positions * g.hidden_size * s.bytes_per_value
    heads = g.num_heads * g.head_dim
    hessians = 8 * (2 * g.hidden_size**2 + heads**2 + g.intermediate_size**2)
    solve = 3 * 8 * g.intermediate_size**2 + 3 * 4 * g.intermediate_size * g.hidden_size
    return s.layer_params * s.bytes_per_value + hidden + hessians + solve


def _eval_bytes(s: Shapes, evaluation: EvalConfig) -> int:
    """Perplexity's hidden states and one chunk of float32 logits, or generation's KV cache, whichever is larger."""
    g = s.geometry
    # Without gradients one decoder layer's temporaries are alive at a time: the residual stream,
    # q/k/v and attention output, and the MLP's gate, up and their product.
    layer = evaluation.ppl.batch_size * evaluation.ppl.seq_len * (4 * g.hidden_size + 3 * g.intermediate_size) * s.bytes_per_value
    ppl = layer + NLL_CHUNK * g.vocab_size * (s.bytes_per_value + 8)
    length = 256 + evaluation.max_new_tokens  # prompts of HarmBench/benign sets fit in 256 tokens with the template
    kv = evaluation.batch_size * length * g.num_layers * 2 * g.num_kv_heads * g.head_dim * s.bytes_per_value
    # Generation forms logits for the last position only.
    return max(ppl, kv + evaluation.batch_size * length * g.hidden_size * s.bytes_per_value + evaluation.batch_size * g.vocab_size * 8)


def device_budget(placement: Placement) -> int | None:
    """The compute device's budget in `placement.max_memory`, in bytes (None without one)."""
    if not placement.max_memory:
        return None
    from accelerate.utils import convert_file_size_to_int

    device = placement.compute_device
    for key in (str(device), f"{device.type}:{device.index or 0}", device.type, str(device.index or 0)):
        if key in placement.max_memory:
            return convert_file_size_to_int(placement.max_memory[key])
    return None


def estimate(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None = None, teacher_batch: int = 1
) -> list[StageMemory]:
    """Each stage's estimated peak device, host and disk bytes for quantizing the model `config` describes.

    With a device budget in `placement.max_memory` the model rests on the host: forward passes keep
    as much of it on the device as the budget leaves beside their working memory (accelerate
    streams the rest), and GPTQ holds one layer at a time.
    """
    s = shapes_of(config, placement)
    budget = device_budget(placement)
    on_cpu = placement.compute_device.type == "cpu"
    model, fused = s.model_bytes(untied=False), s.model_bytes(untied=True)
    one_layer = s.layer_params * s.bytes_per_value

    def stage(name: str, resident: int, work: int, disk: int = 0, note: str = "", host_work: int = 0) -> StageMemory:
        baseline = LOAD_BASELINE if name == "load" else HOST_BASELINE
        if budget is None:
            device, host = resident + work, baseline
        else:
            kept = one_layer if name == "gptq" else min(resident, max(budget - work, one_layer))
            device, host = kept + work, baseline + resident
        return StageMemory(name, 0 if on_cpu else device, host + host_work + (device if on_cpu else 0), disk, note)

    stages = [stage("load", model, 0)]
    method = quantize.method
    steps = method.stages(quantize.resolved_scheme())
    if "teachers" in steps:
        reference = model if method.needs_reference() else 0
        cache = method.teacher_cache_bytes(quantize.calibration.n_samples, quantize.calibration.seq_len, s.geometry.vocab_size)
        stages.append(stage("teachers", model + reference, _teacher_bytes(s, quantize, teacher_batch), cache, f"teacher batch {teacher_batch}"))
    if "calibration" in steps:
        work, note = _calibration_bytes(s, quantize)
        stages.append(stage("calibration", fused, work, note=note))
    if "gptq" in steps:
        # The solved layers' packed int4 codes, the source of truth of the weights, gather on the host.
        codes = s.geometry.num_layers * s.layer_params // 2
        stages.append(stage("gptq", fused, _gptq_bytes(s, quantize), host_work=codes))
    if evaluation is not None:
        # The garbled check scores the answers with the full-precision model, loaded again beside the quantized one.
        scorer = model if evaluation.checks_coherence else 0
        stages.append(stage("eval", fused + scorer, _eval_bytes(s, evaluation), note="with the full-precision scorer" if scorer else ""))
    run_folder = s.geometry.num_layers * s.layer_params // 2 + 2 * s.embedding_params * s.bytes_per_value
    stages.append(StageMemory("save", 0, HOST_BASELINE + fused, run_folder))
    return stages


@dataclass(frozen=True)
class Fit:
    """Settings under which every stage fits a device budget, and the stages' estimates with them.

    `changes`: the settings changed, by their config names (`teacher_batch`, `activation_checkpointing`,
    `batch_size`, `max_memory`, `eval_batch_size`), in the order they were needed; `fits`: False when
    even all of them are not enough.
    """

    changes: dict[str, object]
    stages: list[StageMemory]
    fits: bool


# What each change costs the user, so the search prefers free changes to slow ones and keeps the
# calibration batch (which changes the result) and offloading (many times slower) for last.
CHANGE_COSTS = {"teacher_batch": 1, "eval_batch_size": 1, "activation_checkpointing": 3, "batch_size": 4, "max_memory": 10}


def fit_to_budget(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None, budget: int, teacher_batch: int
) -> Fit:
    """The cheapest set of setting changes (by `CHANGE_COSTS`) under which every stage's device peak fits `budget` bytes."""
    candidates = [
        (name, value)
        for name, value in (("teacher_batch", 1), ("activation_checkpointing", True), ("batch_size", 1), ("eval_batch_size", 1), ("max_memory", budget))
        if _with_change(name, value, quantize, placement, evaluation, teacher_batch) != (quantize, placement, evaluation, teacher_batch)
    ]
    subsets = [chosen for size in range(len(candidates) + 1) for chosen in itertools.combinations(candidates, size)]
    subsets.sort(key=lambda chosen: sum(CHANGE_COSTS[name] for name, _ in chosen))
    tried = None
    inputs = (quantize, placement, evaluation, teacher_batch)
    for chosen in subsets:
        stages = estimate(config, *_with_changes(dict(chosen), inputs))
        tried = Fit(dict(chosen), stages, all(stage.device <= budget for stage in stages))
        if tried.fits:
            return _offloading_less(config, tried, candidates, inputs, budget)
    return tried


def _offloading_less(config: PretrainedConfig, fit: Fit, candidates: list[tuple[str, object]], inputs: tuple, budget: int) -> Fit:
    """`fit`, plus, when it offloads, each change that keeps the result (cheaper than a smaller calibration batch) and offloads less.

    Offloading moves off the device what the stages need beyond the budget, and every byte of a
    stage's working memory pushes a byte of weights off it, to be streamed in at every forward; a
    change is worth making when it keeps at least one more decoder layer on the device.
    """
    if "max_memory" not in fit.changes:
        return fit
    s = shapes_of(config, inputs[1])
    one_layer = s.layer_params * s.bytes_per_value
    changes = {name: value for name, value in fit.changes.items() if name != "max_memory"}

    def overflow(changes: dict[str, object]) -> int:
        return sum(max(0, stage.device - budget) for stage in estimate(config, *_with_changes(changes, inputs)))

    for name, value in sorted(candidates, key=lambda candidate: CHANGE_COSTS[candidate[0]]):
        if name not in changes and CHANGE_COSTS[name] < CHANGE_COSTS["batch_size"] and overflow({**changes, name: value}) <= overflow(changes) - one_layer:
            changes[name] = value
    changes["max_memory"] = fit.changes["max_memory"]
    return Fit(changes, estimate(config, *_with_changes(changes, inputs)), True)


def _with_changes(changes: dict[str, object], inputs: tuple) -> tuple:
    """The planning inputs with each of `changes` made, in order."""
    for name, value in changes.items():
        inputs = _with_change(name, value, *inputs)
    return inputs


def _with_change(name: str, value, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None, teacher_batch: int):
    """The planning inputs (quantize config, placement, evaluation, teacher batch) with one setting changed."""
    method = quantize.method
    if name == "teacher_batch":
        teacher_batch = value
    elif name in ("activation_checkpointing", "batch_size") and method.calibration_settings() is not None:
        quantize = replace(quantize, method=method.with_calibration_settings(**{name: value}))
    elif name == "eval_batch_size" and evaluation is not None:
        evaluation = replace(evaluation, batch_size=value, ppl=replace(evaluation.ppl, batch_size=value))
    elif name == "max_memory" and not placement.max_memory:
        placement = replace(placement, max_memory={str(placement.compute_device): value, "cpu": HOST_UNBOUNDED})
    return quantize, placement, evaluation, teacher_batch


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated stages of a run as configured, and, with a device budget, the settings that make it fit."""

    model: str
    stages: list[StageMemory]
    teacher_batch: int
    budget: int | None = None
    fit: Fit | None = None


def parse_budget(budget: int | str) -> int:
    """A device budget in bytes, from bytes or an amount such as `24GiB` or `80GB`."""
    if isinstance(budget, int):
        return budget
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(budget)
    except ValueError:
        raise AaqError(f"bad device budget {budget!r}; write an amount such as 24GiB or 80GB ({{setting}})", setting="budget") from None


def plan_memory(
    source: str,
    quantize: QuantizeConfig,
    placement: Placement,
    evaluation: EvalConfig | None = None,
    budget: int | str | None = None,
    reference: str | None = None,
) -> MemoryPlan:
    """Estimate each stage of quantizing `source` (reading its config only, no weights); with `budget` of device memory, find the settings that fit.

    `reference`: the unaligned model a method with a push term needs (only whether it is given matters).
    """
    from aaq.models.loading import load_model_config

    if quantize.method.needs_reference() and not reference:
        raise AaqError(f"method {quantize.method.name} needs the unaligned reference model; pass one ({{setting}})", setting="reference")
    budget = None if budget is None else parse_budget(budget)
    config = load_model_config(source)
    training = quantize.method.calibration_settings()
    teacher_batch = 1
    if training is not None:
        teacher_batch = training.teacher_batch or (training.batch_size if budget is None else quantize.calibration.batch_size)
    stages = estimate(config, quantize, placement, evaluation, teacher_batch)
    fit = None if budget is None else fit_to_budget(config, quantize, placement, evaluation, budget, teacher_batch)
    return MemoryPlan(source, stages, teacher_batch, budget, fit)


def format_plan(plan: MemoryPlan, setting_name: Callable[[str], str] = str) -> str:
    """The plan as a table, with the settings that fit the budget named by `setting_name`."""

    def gib(value: int) -> str:
        return f"{value / GiB:.1f} GiB" if value else "-"

    lines = [f"{'stage':<12} {'device':>10} {'host':>10} {'disk':>10}  note"]
    lines += [f"{st.stage:<12} {gib(st.device):>10} {gib(st.host):>10} {gib(st.disk):>10}  {st.note}" for st in plan.stages]
    if plan.fit is not None:
        budget = f"device budget {plan.budget / GiB:.1f} GiB"
        if not plan.fit.changes:
            lines.append(f"{budget}: fits as configured")
        else:
            host = max(stage.host for stage in plan.fit.stages)
            settings = " ".join(f"{setting_name(name)} {_shown(name, value, host)}" for name, value in plan.fit.changes.items())
            verdict = "fits with" if plan.fit.fits else "does not fit even with"
            peak = max(stage.device for stage in plan.fit.stages)
            lines.append(f"{budget}: {verdict} {settings} (device peak {peak / GiB:.1f} GiB, host peak {host / GiB:.1f} GiB)")
    return "\n".join(lines)


def _shown(name: str, value: object, host: int) -> str:
    """A changed setting's value as a user writes it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if name == "max_memory":
        return f"cuda={value // 2**20}MiB,cpu={-(-host // GiB)}GiB" if value < GiB else f"cuda={value / GiB:.0f}GiB,cpu={-(-host // GiB)}GiB"
    return str(value)
