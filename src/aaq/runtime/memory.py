"""Memory: each stage's peak estimated from a model config alone (`aaq plan`), and measured in a real run.

The estimates count the tensors a stage holds at its peak, from the shapes in the model config and
the run's settings; the constants below say what each term stands for and were checked against
peaks measured with `aaq.runtime.devices.StageMeter` (`benchmarks/memory_plan.py`: smollm2-135m and a random 1B Llama).
On a CPU the device is the host, so a stage's peak is one number.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from transformers import PretrainedConfig

from aaq.api import QuantizeConfig
from aaq.calibration.losses import ROWS_PER_CHUNK
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
# Float32 (hidden x hidden) matrices the activation form holds at a time: it builds R1 diag(1/s) and
# diag(s) R1^T per hook and again in the hook's backward (with the gradient of one), keeping none of
# them for the backward (`aaq.transforms.learnable`).
TRANSFORM_MATRICES = 4
# Copies of a chunk of (positions, vocab) logits alive at a calibration step's peak: the chunk's
# logits, their float32 log-softmax and the two gradients. The loss forms `ROWS_PER_CHUNK` positions
# at a time, in the forward and again in the backward (`aaq.calibration.losses.chunked_loss`).
LOGIT_COPIES = 4
# The float32 (rows, vocab) buffers that turning `ROWS_PER_CHUNK` rows of teacher logits into targets
# takes (aaq.calibration.losses.teacher_targets): both log-softmaxes and |z_a - z_b|, plus the float32
# copies of both teachers' logits when the model computes in 16 bits.
TARGET_COPIES_FP32 = 3
TARGET_COPIES_16BIT = 5
# The host budget the planner assumes when it offloads: the host holds what the device does not.
HOST_UNBOUNDED = "1TiB"
# What a transfer between host and device costs against the compute it delays, for the slowdown of
# offloading: weights stream over PCIe 4.0 x16 from pageable host memory (accelerate's CPU offload
# does not pin it) at about half the link's 32 GB/s, and a 24-48 GB card sustains ~100 TFLOP/s of
# dense bf16 matmuls (peaks: RTX 4090 165, L4 121, A5000 111, A6000 155). Transfers and compute do not overlap.
HOST_LINK_BYTES_PER_S = 16e9
DEVICE_FLOPS_PER_S = 100e12


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


def _step_sequences(quantize: QuantizeConfig) -> int:
    """Calibration sequences in one forward+backward: the micro-batch, else the step batch."""
    training = quantize.method.calibration_settings()
    return min(training.micro_batch or training.batch_size, training.batch_size)


def _calibration_bytes(s: Shapes, quantize: QuantizeConfig) -> tuple[int, str]:
    """The part of a calibration step on top of the resident model: activations, a chunk of logits, transforms, targets."""
    g, training = s.geometry, quantize.method.calibration_settings()
    tokens = _step_sequences(quantize) * quantize.calibration.seq_len
    per_layer = 4 * tokens * (SAVED_PER_HIDDEN * g.hidden_size + SAVED_PER_MLP * g.intermediate_size)
    matrices = 4 * TRANSFORM_MATRICES * g.hidden_size**2
    if training.activation_checkpointing:
        activations = g.num_layers * tokens * g.hidden_size * s.bytes_per_value + per_layer + matrices
    else:
        activations = g.num_layers * per_layer + matrices
    logits = min(tokens, ROWS_PER_CHUNK) * g.vocab_size * (s.bytes_per_value + (LOGIT_COPIES - 1) * 4)
    loss = training.loss
    push_width = 0 if not loss.needs_reference else g.vocab_size if loss.push_tokens == "vocab" else min(loss.resolved_push_k, g.vocab_size)
    targets = tokens * (min(loss.k, g.vocab_size) + push_width) * 12
    states = 2 if training.optimizer == "riemannian_adam" else 1
    weight_form = quantize.method.calibrates_quantized_weights(quantize.resolved_scheme())
    # The weight form rebuilds every weight each step and keeps it (and its quantizer's record) for the backward.
    weights = g.num_layers * s.layer_params * 9 if weight_form else 0
    total = activations + logits + targets + weights + _transform_bytes(g, quantize.method.learned_transforms().smoothing, states)
    notes = ["activation checkpointing" if training.activation_checkpointing else "all activations kept"]
    if training.micro_batch and training.micro_batch < training.batch_size:
        notes.append(f"micro-batch {training.micro_batch}")
    return total, ", ".join(notes)


def _sequential_teachers(quantize: QuantizeConfig) -> bool:
    """Whether the teacher targets are computed with one teacher model on the device at a time."""
    training = quantize.method.calibration_settings()
    return training.sequential_teachers and training.cache and quantize.method.needs_reference()


def _teacher_bytes(s: Shapes, quantize: QuantizeConfig, teacher_batch: int) -> int:
    """One teacher batch of full-vocabulary logits for each teacher, and the targets' temporaries."""
    teachers = 2 if quantize.method.needs_reference() else 1
    logits = teachers * teacher_batch * quantize.calibration.seq_len * s.geometry.vocab_size * s.bytes_per_value
    copies = TARGET_COPIES_FP32 if s.bytes_per_value == 4 else TARGET_COPIES_16BIT
    return logits + copies * ROWS_PER_CHUNK * s.geometry.vocab_size * 4


def _aligned_hidden_bytes(s: Shapes, quantize: QuantizeConfig) -> int:
    """The aligned model's final hidden states of every calibration sequence (sequential teachers keep them on the host)."""
    return quantize.calibration.n_samples * quantize.calibration.seq_len * s.geometry.hidden_size * s.bytes_per_value


def _gptq_bytes(s: Shapes, quantize: QuantizeConfig) -> int:
    """One layer's weights, its inputs and outputs for every calibration sequence, the float64 Hessians and their factorisation."""
    g = s.geometry
    positions = quantize.calibration.n_samples * quantize.calibration.seq_len
    hidden = 2 * positions * g.hidden_size * s.bytes_per_value
    heads = g.num_heads * g.head_dim
    hessians = 8 * (2 * g.hidden_size**2 + heads**2 + g.intermediate_size**2)
    solve = 3 * 8 * g.intermediate_size**2 + 3 * 4 * g.intermediate_size * g.hidden_size
    return s.layer_params * s.bytes_per_value + hidden + hessians + solve


def _generation_bytes(s: Shapes, evaluation: EvalConfig) -> int:
    """Greedy generation's KV cache and per-step buffers (logits of the last position only), or a batch's answer NLLs."""
    g = s.geometry
    length = 256 + evaluation.max_new_tokens  # prompts of HarmBench/benign sets fit in 256 tokens with the template
    kv = evaluation.batch_size * length * g.num_layers * 2 * g.num_kv_heads * g.head_dim * s.bytes_per_value
    generation = kv + evaluation.batch_size * length * g.hidden_size * s.bytes_per_value + evaluation.batch_size * g.vocab_size * 8
    # The garbled check's NLLs: the logits of each answer's positions and their float32 log-softmax.
    scoring = evaluation.batch_size * (evaluation.max_new_tokens + 1) * g.vocab_size * (s.bytes_per_value + 8)
    return max(generation, scoring)


def _eval_bytes(s: Shapes, evaluation: EvalConfig) -> int:
    """Perplexity's hidden states and one chunk of float32 logits, or generation's KV cache, whichever is larger."""
    g = s.geometry
    # Without gradients one decoder layer's temporaries are alive at a time: the residual stream,
    # q/k/v and attention output, and the MLP's gate, up and their product.
    layer = evaluation.ppl.batch_size * evaluation.ppl.seq_len * (4 * g.hidden_size + 3 * g.intermediate_size) * s.bytes_per_value
    ppl = layer + NLL_CHUNK * g.vocab_size * (s.bytes_per_value + 8)
    return max(ppl, _generation_bytes(s, evaluation))


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


@dataclass(frozen=True)
class _Demand:
    """What a stage holds: weights that rest on the device (dispatched there within a budget), and working memory beside them.

    `host_work`: bytes held on the host whatever the placement; `layerwise`: one decoder layer of the
    weights is on the device at a time while the rest waits on the host (GPTQ's sequential onloading).
    """

    stage: str
    resident: int
    work: int
    disk: int = 0
    note: str = ""
    host_work: int = 0
    layerwise: bool = False


def _demands(s: Shapes, quantize: QuantizeConfig, evaluation: EvalConfig | None, teacher_batch: int, on_cpu: bool, offloaded: bool) -> list[_Demand]:
    """Each stage's weights and working memory, before the placement decides where the weights are."""
    model, fused = s.model_bytes(untied=False), s.model_bytes(untied=True)
    method = quantize.method
    steps = method.stages(quantize.resolved_scheme())
    demands = [_Demand("load", model, 0)]
    if "teachers" in steps:
        work = _teacher_bytes(s, quantize, teacher_batch)
        cache = method.teacher_cache_bytes(quantize.calibration.n_samples, quantize.calibration.seq_len, s.geometry.vocab_size)
        note = f"teacher batch {teacher_batch}"
        if _sequential_teachers(quantize):
            # The reference and a copy of the aligned model's output head on the device; the aligned model
            # waits on the host (on a CPU, where everything is) beside its final hidden states.
            head = s.embedding_params * s.bytes_per_value
            waiting = 0 if on_cpu else model
            resident = model + head + (model if on_cpu else 0)
            demands.append(_Demand("teachers", resident, work, cache, f"{note}, one teacher on the device", waiting + _aligned_hidden_bytes(s, quantize)))
        else:
            demands.append(_Demand("teachers", model + (model if method.needs_reference() else 0), work, cache, note))
    if "calibration" in steps:
        work, note = _calibration_bytes(s, quantize)
        demands.append(_Demand("calibration", fused, work, note=note))
    if "gptq" in steps:
        # The solved layers' packed int4 codes, the source of truth of the weights, gather on the host.
        codes = s.geometry.num_layers * s.layer_params // 2
        onload = offloaded or (method.gptq_settings() is not None and method.gptq_settings().onload_layers)
        demands.append(_Demand("gptq", fused, _gptq_bytes(s, quantize), host_work=codes, layerwise=onload, note="one layer on the device" * onload))
    if evaluation is not None:
        # The garbled check's full-precision scorer is loaded once the quantized model's answers are in and the
        # quantized model is freed (`aaq.workflows.run.scorer_after_release`): it never takes memory beside it.
        work = _eval_bytes(s, evaluation)
        note = "then the full-precision scorer, after the quantized model is freed" if evaluation.checks_coherence else ""
        demands.append(_Demand("eval", fused, max(work, _generation_bytes(s, evaluation)) if evaluation.checks_coherence else work, note=note))
    return demands


def _placed(demand: _Demand, budget: int | None, on_cpu: bool, one_layer: int) -> StageMemory:
    """A stage's peak device and host bytes once its weights are placed.

    Without a budget the weights are on the device. With one they rest on the host, and accelerate
    dispatches as many of them to the device as the budget takes (the working memory comes on top of
    it) and streams the rest in for every forward; loading puts nothing on the device.
    """
    baseline = LOAD_BASELINE if demand.stage == "load" else HOST_BASELINE
    if budget is None and not demand.layerwise:
        device, host = demand.resident + demand.work, baseline
    else:
        kept = one_layer if demand.layerwise else 0 if demand.stage == "load" else min(demand.resident, max(budget, one_layer))
        device, host = kept + demand.work, baseline + demand.resident
    return StageMemory(demand.stage, 0 if on_cpu else device, host + demand.host_work + (device if on_cpu else 0), demand.disk, demand.note)


def estimate(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None = None, teacher_batch: int = 1
) -> list[StageMemory]:
    """Each stage's estimated peak device, host and disk bytes for quantizing the model `config` describes.

    With a device budget in `placement.max_memory` the model rests on the host: forward passes keep
    as much of it on the device as the budget takes (accelerate streams the rest; their working
    memory comes on top), and GPTQ holds one layer at a time.
    """
    s = shapes_of(config, placement)
    budget = device_budget(placement)
    on_cpu = placement.compute_device.type == "cpu"
    one_layer = s.layer_params * s.bytes_per_value
    stages = [_placed(demand, budget, on_cpu, one_layer) for demand in _demands(s, quantize, evaluation, teacher_batch, on_cpu, budget is not None)]
    run_folder = s.geometry.num_layers * s.layer_params // 2 + 2 * s.embedding_params * s.bytes_per_value
    stages.append(StageMemory("save", 0, HOST_BASELINE + s.model_bytes(untied=True), run_folder))
    return stages


@dataclass(frozen=True)
class TransferCost:
    """What moving weights between host and device costs a stage: bytes per pass, passes, and seconds against its compute.

    `passes`: forward passes (or, for a layer-by-layer stage, layers); `transfer_s` and `compute_s`:
    the stage's total at `HOST_LINK_BYTES_PER_S` and `DEVICE_FLOPS_PER_S`; `slowdown`: their sum
    over the compute alone. `per`: what one pass is (a teacher batch, a calibration step, a token).
    """

    stage: str
    bytes_per_pass: int
    passes: int
    per: str
    transfer_s: float
    compute_s: float

    @property
    def slowdown(self) -> float:
        """(compute + transfer) / compute."""
        return (self.compute_s + self.transfer_s) / self.compute_s


def transfer_costs(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None = None, teacher_batch: int = 1
) -> list[TransferCost]:
    """The host-device traffic of each stage that has some: weights streamed by an offloaded forward, layers onloaded one by one, a model waiting on the host.

    A forward pass streams the weights that the budget leaves on the host (accelerate moves them in
    and out for every pass, without overlapping the compute); its compute is 2 x parameters x tokens
    flops (a calibration step: forward, the recomputation when checkpointing, and a backward of twice
    the forward); decoding streams them for every generated token of a batch.
    """
    s = shapes_of(config, placement)
    if placement.compute_device.type == "cpu":
        return []
    budget = device_budget(placement)
    one_layer = s.layer_params * s.bytes_per_value
    demands = {demand.stage: demand for demand in _demands(s, quantize, evaluation, teacher_batch, False, budget is not None)}
    flops = 2 * (s.geometry.num_layers * s.layer_params + s.embedding_params)  # per token of a forward
    seq_len, n_samples = quantize.calibration.seq_len, quantize.calibration.n_samples
    costs = []

    def cost(stage: str, streamed: int, passes: int, per: str, tokens_per_pass: int, flop_factor: float = 1.0) -> None:
        if streamed > 0 and passes > 0:
            compute = passes * flop_factor * flops * tokens_per_pass / DEVICE_FLOPS_PER_S
            costs.append(TransferCost(stage, streamed, passes, per, passes * streamed / HOST_LINK_BYTES_PER_S, compute))

    def streamed(stage: str) -> int:
        demand = demands.get(stage)
        return 0 if demand is None or budget is None else max(0, demand.resident - max(budget, one_layer))

    if "teachers" in demands:
        teachers = 2 if quantize.method.needs_reference() else 1
        batches = -(-n_samples // teacher_batch)
        cost("teachers", streamed("teachers"), batches, "teacher batch", teacher_batch * seq_len, teachers)
        if _sequential_teachers(quantize) and budget is None:  # the aligned model to the host and back, once
            cost("teachers", 2 * s.model_bytes(untied=False), 1, "stage", n_samples * seq_len, teachers)
    if "calibration" in demands:
        training = quantize.method.calibration_settings()
        passes = 2 if training.activation_checkpointing else 1
        parts = -(-training.batch_size // _step_sequences(quantize))
        cost("calibration", passes * parts * streamed("calibration"), training.steps, "step", training.batch_size * seq_len, passes + 2)
    if "gptq" in demands and demands["gptq"].layerwise:
        # Each layer comes in and goes back once; GPTQ runs every layer twice over the calibration tokens.
        cost("gptq", 2 * one_layer, s.geometry.num_layers, "layer", n_samples * seq_len * 2 // s.geometry.num_layers)
    if evaluation is not None and "eval" in demands:
        cost("eval", streamed("eval"), 1, "generated token", evaluation.batch_size)
    return costs


@dataclass(frozen=True)
class Fit:
    """Settings under which every stage fits a device budget, and the stages' estimates with them.

    `changes`: the settings changed, by their config names (`teacher_batch`, `sequential_teachers`,
    `onload_layers`, `micro_batch`, `activation_checkpointing`, `batch_size`, `max_memory`,
    `eval_batch_size`), in the order they were needed; `fits`: False when even all of them are not
    enough. `costs`: the host-device traffic the changes bring (`transfer_costs`).
    """

    changes: dict[str, object]
    stages: list[StageMemory]
    fits: bool
    costs: list[TransferCost] = field(default_factory=list)


# What each change costs the user, so the search prefers free changes to slow ones and keeps the
# calibration batch (which changes the result) and offloading (many times slower) for last. One
# teacher at a time and GPTQ layer by layer move each weight over the host link once or twice
# (seconds); micro-batches run the same tokens in smaller matmuls.
CHANGE_COSTS = {
    "teacher_batch": 1, "eval_batch_size": 1, "sequential_teachers": 1, "onload_layers": 1, "micro_batch": 2,
    "activation_checkpointing": 3, "batch_size": 4, "max_memory": 10,
}  # fmt: skip
_CANDIDATES = (
    ("teacher_batch", 1), ("sequential_teachers", True), ("onload_layers", True), ("micro_batch", 1), ("activation_checkpointing", True),
    ("batch_size", 1), ("eval_batch_size", 1), ("max_memory", None),
)  # fmt: skip


def fit_to_budget(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None, budget: int, teacher_batch: int
) -> Fit:
    """The cheapest set of setting changes (by `CHANGE_COSTS`) under which every stage's device peak fits `budget` bytes.

    Offloading gives accelerate the budget less the largest working memory of a stage that runs
    forward passes, for the weights (`max_memory` in the changes is that weight budget).
    """
    inputs = (quantize, placement, evaluation, teacher_batch)
    candidates = [(name, budget if name == "max_memory" else value) for name, value in _CANDIDATES]
    candidates = [(name, value) for name, value in candidates if _with_change(config, name, value, *inputs) != inputs]
    subsets = [chosen for size in range(len(candidates) + 1) for chosen in itertools.combinations(candidates, size)]
    subsets.sort(key=lambda chosen: sum(CHANGE_COSTS[name] for name, _ in chosen))
    tried = None
    for chosen in subsets:
        changed = _with_changes(config, dict(chosen), inputs)
        stages = estimate(config, *changed)
        tried = Fit(_resolved(dict(chosen), changed), stages, all(stage.device <= budget for stage in stages), transfer_costs(config, *changed))
        if tried.fits:
            return _relaxed(config, _offloading_less(config, tried, candidates, inputs, budget), inputs, budget)
    return tried


def _original_size(name: str, inputs: tuple) -> int:
    """The value a batch-size setting had before the changes."""
    quantize, _, evaluation, teacher_batch = inputs
    training = quantize.method.calibration_settings()
    sizes = {"teacher_batch": teacher_batch, "eval_batch_size": None if evaluation is None else evaluation.batch_size}
    if training is not None:
        sizes |= {"micro_batch": training.micro_batch or training.batch_size, "batch_size": training.batch_size}
    return sizes[name]


def _relaxed(config: PretrainedConfig, fit: Fit, inputs: tuple, budget: int) -> Fit:
    """`fit` with each batch size it shrank to 1 doubled back towards its original value while every stage still fits.

    Not when it offloads: a larger batch there leaves fewer weights on the device, streamed at every pass.
    """
    if "max_memory" in fit.changes:
        return fit
    changes = dict(fit.changes)
    for name in ("teacher_batch", "micro_batch", "eval_batch_size", "batch_size"):
        while name in changes and changes[name] * 2 < _original_size(name, inputs):
            larger = {**changes, name: changes[name] * 2}
            if not all(stage.device <= budget for stage in estimate(config, *_with_changes(config, larger, inputs))):
                break
            changes = larger
    if changes == fit.changes:
        return fit
    changed = _with_changes(config, changes, inputs)
    return Fit(_resolved(changes, changed), estimate(config, *changed), True, transfer_costs(config, *changed))


def _resolved(changes: dict[str, object], changed: tuple) -> dict[str, object]:
    """`changes` with the weight budget of offloading as it was resolved."""
    if "max_memory" not in changes:
        return changes
    return {**changes, "max_memory": device_budget(changed[1])}


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
        return sum(max(0, stage.device - budget) for stage in estimate(config, *_with_changes(config, changes, inputs)))

    for name, value in sorted(candidates, key=lambda candidate: CHANGE_COSTS[candidate[0]]):
        if name not in changes and CHANGE_COSTS[name] < CHANGE_COSTS["batch_size"] and overflow({**changes, name: value}) <= overflow(changes) - one_layer:
            changes[name] = value
    changes.pop("onload_layers", None)  # with the model resting on the host, GPTQ onloads layer by layer anyway
    changes["max_memory"] = budget
    changed = _with_changes(config, changes, inputs)
    stages = estimate(config, *changed)
    return Fit(_resolved(changes, changed), stages, all(stage.device <= budget for stage in stages), transfer_costs(config, *changed))


def _with_changes(config: PretrainedConfig, changes: dict[str, object], inputs: tuple) -> tuple:
    """The planning inputs with each of `changes` made, in order (offloading, the last candidate, after the others)."""
    for name, value in sorted(changes.items(), key=lambda change: change[0] == "max_memory"):
        inputs = _with_change(config, name, value, *inputs)
    return inputs


def _with_change(config: PretrainedConfig, name: str, value, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None, teacher_batch: int):
    """The planning inputs (quantize config, placement, evaluation, teacher batch) with one setting changed.

    `max_memory`: `value` is the device budget, of which the weights get what the stages' largest
    working memory leaves.
    """
    method = quantize.method
    if name == "teacher_batch":
        teacher_batch = value
    elif name in ("activation_checkpointing", "batch_size", "micro_batch", "sequential_teachers") and method.calibration_settings() is not None:
        quantize = replace(quantize, method=method.with_calibration_settings(**{name: value}))
    elif name == "onload_layers" and method.gptq_settings() is not None:
        quantize = replace(quantize, method=method.with_gptq_settings(onload_layers=value))
    elif name == "eval_batch_size" and evaluation is not None:
        evaluation = replace(evaluation, batch_size=value, ppl=replace(evaluation.ppl, batch_size=value))
    elif name == "max_memory" and not placement.max_memory:
        s = shapes_of(config, placement)
        on_cpu = placement.compute_device.type == "cpu"
        work = max(demand.work for demand in _demands(s, quantize, evaluation, teacher_batch, on_cpu, True) if not demand.layerwise)
        weights = max(value - work, s.layer_params * s.bytes_per_value)
        placement = replace(placement, max_memory={str(placement.compute_device): weights, "cpu": HOST_UNBOUNDED})
    return quantize, placement, evaluation, teacher_batch


def fitted_settings(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None, fit: Fit, teacher_batch: int
) -> tuple[QuantizeConfig, Placement, EvalConfig | None]:
    """The run's settings with `fit`'s changes made (a changed teacher batch goes into the calibration settings)."""
    quantize, placement, evaluation, teacher_batch = _with_changes(config, fit.changes, (quantize, placement, evaluation, teacher_batch))
    if "teacher_batch" in fit.changes:
        quantize = replace(quantize, method=quantize.method.with_calibration_settings(teacher_batch=teacher_batch))
    return quantize, placement, evaluation


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
    # As the run sizes it: the setting, else at most the calibration data's batch (`aaq.methods.ostquant.teacher_batch_size`).
    teacher_batch = 1 if training is None else training.teacher_batch or quantize.calibration.batch_size
    stages = estimate(config, quantize, placement, evaluation, teacher_batch)
    fit = None if budget is None else fit_to_budget(config, quantize, placement, evaluation, budget, teacher_batch)
    return MemoryPlan(source, stages, teacher_batch, budget, fit)


def format_plan(plan: MemoryPlan, setting_name: Callable[[str], str] = str) -> str:
    """The plan as a table, with the settings that fit the budget named by `setting_name`, and what their host-device traffic costs."""

    def gib(value: int) -> str:
        return f"{value / GiB:.1f} GiB" if value else "-"

    fitted = plan.fit is not None and bool(plan.fit.changes)
    changed = {stage.stage: stage for stage in plan.fit.stages} if fitted else {}
    extra = f" {'fitted':>10} {'host':>10}" if fitted else ""
    lines = [f"{'stage':<12} {'device':>10} {'host':>10} {'disk':>10}{extra}  note"]
    for st in plan.stages:
        after = changed.get(st.stage)
        extra = f" {gib(after.device):>10} {gib(after.host):>10}" if after is not None else ""
        lines.append(f"{st.stage:<12} {gib(st.device):>10} {gib(st.host):>10} {gib(st.disk):>10}{extra}  {(after or st).note}")
    if plan.fit is not None:
        budget = f"device budget {plan.budget / GiB:.1f} GiB"
        if not plan.fit.changes:
            lines.append(f"{budget}: fits as configured")
        else:
            host = max(stage.host for stage in plan.fit.stages)
            settings = " ".join(f"{setting_name(name)} {_shown(name, value, host)}".rstrip() for name, value in plan.fit.changes.items())
            verdict = "fits with" if plan.fit.fits else "does not fit even with"
            peak = max(stage.device for stage in plan.fit.stages)
            lines.append(f"{budget}: {verdict} {settings} (device peak {peak / GiB:.1f} GiB, host peak {host / GiB:.1f} GiB)")
            over = [f"{stage.stage} by {(stage.device - plan.budget) / GiB:.1f} GiB" for stage in plan.fit.stages if stage.device > plan.budget]
            if over:
                lines.append(f"  over the budget: {', '.join(over)}")
            lines += _cost_lines(plan.fit.costs)
    return "\n".join(lines)


def _cost_lines(costs: list[TransferCost]) -> list[str]:
    """One line per stage that moves weights between host and device: how much, and its slowdown."""
    if not costs:
        return []
    head = f"  host-device traffic (at {HOST_LINK_BYTES_PER_S / 1e9:.0f} GB/s, against compute at {DEVICE_FLOPS_PER_S / 1e12:.0f} TFLOP/s):"
    return [head] + [
        f"    {cost.stage:<12} {cost.bytes_per_pass / GiB:6.2f} GiB per {cost.per} x {cost.passes}: +{cost.transfer_s:.3g} s "
        f"to ~{cost.compute_s:.3g} s of compute (x{cost.slowdown:.3g})"
        for cost in costs
    ]


def _shown(name: str, value: object, host: int) -> str:
    """A changed setting's value as a user writes it (switches as their bare flag)."""
    if isinstance(value, bool):
        return "" if name in ("sequential_teachers", "onload_layers") else "on" if value else "off"
    if name == "max_memory":
        return f"cuda={value // 2**20}MiB,cpu={-(-host // GiB)}GiB" if value < GiB else f"cuda={value / GiB:.1f}GiB,cpu={-(-host // GiB)}GiB"
    return str(value)
