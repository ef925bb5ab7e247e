"""Memory: each stage's peak estimated from a model config alone (`aaq plan`), and measured in a real run.

The estimates count the tensors a stage holds at its peak, from the shapes in the model config and
the run's settings; the constants below say what each term stands for and were checked against
peaks measured with `aaq.devices.StageMeter` (`benchmarks/memory_plan.py`: smollm2-135m and a random 1B Llama).
On a CPU the device is the host, so a stage's peak is one number.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig

from aaq.api import QuantizeConfig
from aaq.devices import Placement
from aaq.eval.suite import EvalConfig
from aaq.models.base import ModelAdapter
from aaq.plan import Geometry

GiB = 2**30
# Resident after importing torch, transformers and aaq and loading a tokenizer (measured: 0.4-0.7 GB).
HOST_BASELINE = int(0.7 * GiB)
# Float32 values one token keeps per decoder layer for the backward of a calibration step, in units
# of the hidden size and of the MLP width: the norms (float32 upcasts), the transform hooks around
# each quantizer (input, quantized value, d(out)/d(scale) and its int8 code), RoPE'd q/k, attention
# output and log-sum-exp, SiLU(gate) * up. Measured 2 x 256 tokens on smollm2 (d 576, MLP 1536):
# ~1.2 GB of saved activations.
SAVED_PER_HIDDEN = 14
SAVED_PER_MLP = 8
# Copies of the (tokens, vocab) logits alive at a calibration step's peak: the logits, their float32
# log-softmax kept for the backward, and the two gradients.
LOGIT_COPIES = 4
# Rows of teacher logits turned into targets at once (aaq.teachers), and the float32 (rows, vocab)
# temporaries that takes (softmax, log-softmax, |z_a - z_b|, top-k).
TARGET_ROWS = 512
TARGET_COPIES = 6


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
    g, training = s.geometry, quantize.method.training
    tokens = training.batch_size * quantize.calibration.seq_len
    per_layer = 4 * tokens * (SAVED_PER_HIDDEN * g.hidden_size + SAVED_PER_MLP * g.intermediate_size)
    if training.activation_checkpointing:
        activations = g.num_layers * tokens * g.hidden_size * s.bytes_per_value + per_layer
    else:
        activations = g.num_layers * per_layer
    logits = tokens * g.vocab_size * (s.bytes_per_value + (LOGIT_COPIES - 1) * 4)
    pushes = 2 if training.loss.needs_reference else 1
    targets = tokens * min(training.loss.k, g.vocab_size) * 12 * pushes
    states = 2 if training.optimizer == "riemannian_adam" else 1
    weight_form = quantize.method.calibrates_quantized_weights(quantize.resolved_scheme())
    # The weight form rebuilds every weight each step and keeps it (and its quantizer's record) for the backward.
    weights = g.num_layers * s.layer_params * 9 if weight_form else 0
    total = activations + logits + targets + weights + _transform_bytes(g, quantize.method.transforms.smoothing, states)
    return total, "activation checkpointing" if training.activation_checkpointing else "all activations kept"


def _teacher_bytes(s: Shapes, quantize: QuantizeConfig, teacher_batch: int) -> int:
    """One teacher batch of full-vocabulary logits for each teacher, and the targets' temporaries."""
    teachers = 2 if quantize.method.needs_reference() else 1
    logits = teachers * teacher_batch * quantize.calibration.seq_len * s.geometry.vocab_size * s.bytes_per_value
    return logits + TARGET_COPIES * TARGET_ROWS * s.geometry.vocab_size * 4


def _cache_disk(s: Shapes, quantize: QuantizeConfig) -> int:
    """The teacher cache: top-k indices (int32) and probabilities per position, for each teacher."""
    training = quantize.method.training
    positions = quantize.calibration.n_samples * quantize.calibration.seq_len
    per_entry = 4 + (2 if training.cache_dtype == "float16" else 4)
    teachers = 2 if training.loss.needs_reference else 1
    return positions * min(training.loss.k, s.geometry.vocab_size) * per_entry * teachers + positions * 4 * (teachers - 1)


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
    """Perplexity logits (float32 twice over) or generation's KV cache and logits, whichever is larger."""
    g = s.geometry
    ppl = evaluation.ppl.batch_size * evaluation.ppl.seq_len * g.vocab_size * (s.bytes_per_value + 8)
    length = 256 + evaluation.max_new_tokens  # prompts of HarmBench/benign sets fit in 256 tokens with the template
    kv = evaluation.batch_size * length * g.num_layers * 2 * g.num_kv_heads * g.head_dim * s.bytes_per_value
    return max(ppl, kv + evaluation.batch_size * length * g.vocab_size * s.bytes_per_value)


def estimate(
    config: PretrainedConfig, quantize: QuantizeConfig, placement: Placement, evaluation: EvalConfig | None = None, teacher_batch: int = 1
) -> list[StageMemory]:
    """Each stage's estimated peak device, host and disk bytes for quantizing the model `config` describes.

    With `placement.max_memory` the model rests on the host: GPTQ holds one layer on the device and
    forward passes hold what the budgets allow (the estimate then shows the device part as the
    budget's share).
    """
    s = shapes_of(config, placement)
    offload = bool(placement.max_memory)
    on_cpu = placement.compute_device.type == "cpu"
    model, fused = s.model_bytes(untied=False), s.model_bytes(untied=True)

    def stage(name: str, resident: int, work: int, disk: int = 0, note: str = "") -> StageMemory:
        device = (0 if offload else resident) + work
        host = HOST_BASELINE + (resident if offload else 0)
        return StageMemory(name, device if not on_cpu else 0, host + (device if on_cpu else 0), disk, note)

    stages = [stage("load", model, 0)]
    method = quantize.method
    if hasattr(method, "training"):
        reference = model if method.needs_reference() else 0
        stages.append(stage("teachers", model + reference, _teacher_bytes(s, quantize, teacher_batch), _cache_disk(s, quantize), f"teacher batch {teacher_batch}"))
        work, note = _calibration_bytes(s, quantize)
        stages.append(stage("calibration", fused, work, note=note))
    if quantize.resolved_scheme().weights is not None and getattr(method, "weight_quantizer", "gptq") == "gptq" and method.needs_calibration():
        stages.append(stage("gptq", fused, _gptq_bytes(s, quantize)))
    if evaluation is not None:
        stages.append(stage("eval", fused, _eval_bytes(s, evaluation)))
    run_folder = s.geometry.num_layers * s.layer_params // 2 + 2 * s.embedding_params * s.bytes_per_value
    stages.append(StageMemory("save", 0, HOST_BASELINE + fused, run_folder))
    return stages


def advice(stages: list[StageMemory], device_budget: int, quantize: QuantizeConfig) -> list[str]:
    """Settings that bring the stages over `device_budget` bytes under it, one line per stage."""
    lines = []
    for stage in stages:
        if stage.device <= device_budget:
            continue
        fixes = {
            "teachers": "--teacher-batch 1 and --max-memory (the reference is dispatched within the budget)",
            "calibration": "--activation-checkpointing on, a smaller calibration batch, or --max-memory (activation form)",
            "gptq": "--max-memory (GPTQ then onloads one layer at a time) or fewer --calib-samples",
            "eval": "--eval-batch-size 1 or --max-memory",
            "load": "--max-memory (the model rests on the CPU)",
        }
        lines.append(f"{stage.stage}: needs {stage.device / GiB:.1f} GiB, over the {device_budget / GiB:.1f} GiB budget; use {fixes.get(stage.stage, '--max-memory')}")
    return lines
