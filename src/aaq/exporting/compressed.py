"""compressed-tensors exports: W4A16 for plain transformers, W4A4 with online Hadamard transforms for vLLM.

The offline transforms (R1, R2, smoothing, the inverse of R4) are already fused into the run's
weights, so the folder only describes what must still happen at run time: the quantization of
weights and activations (`quantization_config`) and the online rotation R4 (`transform_config`,
an `input` transform of every R4 reader, the MLP's down projection). Each R4 matrix is stored per
layer as `<reader>.R4_input.weight`: vLLM loads one per layer and requires every one.

R3 (the Hadamard on queries and keys after RoPE) is not written. The format cannot carry an int4
KV cache to vLLM, and without KV quantization R3 cancels in q.k, so leaving it out changes nothing;
writing it would: vLLM 0.33 applies no `q_attn`/`k_cache` transforms, and compressed-tensors
0.20's `k_cache` hook never fires under transformers 5 attention (it renamed the cache argument
to `cache`), so that loader would rotate the queries alone.

The integer codes are the run's own (`aaq.quant.packing.WeightCodes`), written through
compressed-tensors' `ModelCompressor` (pack-quantized), so the weights are bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from aaq.errors import AaqError
from aaq.exporting import (
    HF_WEIGHTS,
    ExportConfig,
    ExportReport,
    Written,
    check_strict,
    linear_bytes,
    load_for_export,
    quantized_linears,
    run_scheme,
    start_folder,
)
from aaq.models import transform_plan
from aaq.models.plan import TransformConfig, TransformPlan
from aaq.quant.packing import WeightCodes, rtn_codes
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runs.checkpoint import model_state
from aaq.runs.records import write_atomic, write_staged
from aaq.transforms.hadamard import hadamard_matrix
from aaq.transforms.rotation import normalized_hadamard, rotate_reader

try:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.transform import TransformArgs, TransformScheme
    from compressed_tensors.transform import TransformConfig as CompressedTransformConfig
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix
except ImportError:  # an optional dependency: only this format needs it
    raise AaqError('the compressed-tensors format needs the `compressed-tensors` package; pip install "aaq[export]"') from None

R4_GROUP = "R4"
PRESET_GROUP_SIZE = 128
PACKED = "pack-quantized"
HadamardKind = Literal["hadamard", "random-hadamard"]


@dataclass(frozen=True)
class CompressedPlan:
    """How a run maps onto a compressed-tensors scheme, and what the mapping changes.

    `r4`: the transform type carrying the run's online R4 Hadamard, or None when the run has none or
    it cannot be expressed (then `unfuse_r4`: the R4 readers are rotated back and re-quantized).
    `r4_targets`: compressed-tensors targets of the R4 readers; `ignore`: the linears left unquantized.
    """

    weights: QuantSpec
    activations: QuantSpec | None
    r4: HadamardKind | None
    unfuse_r4: bool
    r4_targets: tuple[str, ...]
    ignore: tuple[str, ...]
    differences: tuple[str, ...]
    notes: tuple[str, ...]


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_kind(n: int) -> HadamardKind | None:
    """The compressed-tensors transform type that can carry aaq's Hadamard of order n, if any.

    Powers of two are Sylvester matrices in both libraries (`hadamard`, built by every loader and
    run by vLLM's Hadacore kernel). Other orders need `random-hadamard`, whose matrix is read from
    the checkpoint, and which compressed-tensors can only instantiate for orders 2^k * m with m
    in its table of known Hadamard matrices.
    """
    if _is_power_of_two(n):
        return "hadamard"
    try:
        # Its own generator: the random signs would otherwise advance the caller's global torch RNG.
        random_hadamard_matrix(n, dtype=torch.float32, gen=torch.Generator())
    except ValueError:
        return None
    return "random-hadamard"


def _weight_plan(spec: QuantSpec, target: str) -> list[str]:
    """Notes on how the run's weight spec is written (always exactly: the codes are the run's)."""
    if spec.bits != 4:
        raise AaqError(f"the run's weights are {spec.bits}-bit; W4A16/W4A4 exports need a run with 4-bit weights (bits w4...)")
    if target == "W4A16" and not spec.symmetric:
        # compressed-tensors 0.20 sizes the zero points of an empty (meta) model unpacked, so
        # transformers finds the packed ones mismatched and silently re-initialises them.
        raise AaqError(
            "transformers cannot load asymmetric int4 weights from compressed-tensors folders (their zero points are "
            "re-initialised); export this run in the aaq format, or quantize with symmetric weights"
        )
    granularity = "per output channel" if spec.group_size is None else f"in groups of {spec.group_size}"
    notes = [f"weights: the run's int4 codes, {'symmetric' if spec.symmetric else 'asymmetric'}, {granularity}"]
    if spec.group_size != PRESET_GROUP_SIZE:
        notes.append(f"the W4A16/W4A4 presets use groups of {PRESET_GROUP_SIZE}; vLLM's int4 schemes also accept channel and other group sizes")
    return notes


def _activation_plan(run: QuantSpec | None) -> tuple[QuantSpec, list[str]]:
    """The W4A4 activation spec (int4, symmetric, dynamic, compressed-tensors' scale) and how it differs from the run's."""
    group = None if run is None else run.group_size
    exported = QuantSpec(bits=4, symmetric=True, group_size=group, half_range_scale=True)
    if run is None:
        return exported, ["activations: full precision in the run, int4 per token in the export"]
    differences = []
    if run.bits != 4:
        differences.append(f"activations: {run.bits}-bit in the run, 4-bit in the export")
    if not run.symmetric:
        differences.append("activations: asymmetric in the run, symmetric in the export (vLLM's int4 activation kernels are symmetric only)")
    elif not run.half_range_scale:
        differences.append(
            "activations: symmetric scale amax/7 in the run, amax/7.5 in compressed-tensors and vLLM "
            "(QuantSpec(half_range_scale=True) quantizes as they do)"
        )
    if run.clip_ratio != 1.0:
        differences.append(f"activations: clip ratio {run.clip_ratio} in the run, no clipping in the format")
    return exported, differences


def r4_readers(plan: TransformPlan) -> list[str]:
    """The linears the online R4 feeds (one per layer)."""
    return [layer.mlp_hidden.reader for layer in plan.layers]


def _r4_targets(plan: TransformPlan) -> tuple[str, ...]:
    """compressed-tensors targets matching every R4 reader by its name inside its layer (e.g. `re:.*mlp\\.down_proj$`)."""
    inside = {layer.mlp_hidden.reader.removeprefix(f"{layer.block}.") for layer in plan.layers}
    return tuple(f"re:.*{re.escape(name)}$" for name in sorted(inside))


def _r4_plan(transforms: TransformConfig, plan: TransformPlan, target: str) -> tuple[HadamardKind | None, bool, list[str]]:
    """R4 transform type, whether the R4 readers must be unfused instead, and the difference that causes."""
    if not transforms.r4:
        return None, False, []
    n = plan.geometry.intermediate_size
    kind = hadamard_kind(n) if target == "W4A4" else None
    if kind is not None:
        return kind, False, []
    why = "transformers cannot apply online transforms" if target == "W4A16" else f"compressed-tensors cannot build a Hadamard of order {n}"
    readers = ", ".join(sorted({name.removeprefix(f"{layer.block}.") for layer, name in zip(plan.layers, r4_readers(plan), strict=True)}))
    return None, True, [
        (f"{readers}: the run applies an online R4 Hadamard ({why}); its weights were rotated back and re-quantized with RTN, "
        "so they differ from the run (quantize with r4 off for an exact export)")
    ]


def plan_export(scheme: QuantScheme, transforms: TransformConfig, plan: TransformPlan, target: str) -> CompressedPlan:
    """Map a run's scheme (with quantized weights) and transforms onto the compressed-tensors scheme `target`."""
    notes = _weight_plan(scheme.weights, target)
    differences: list[str] = []
    if target == "W4A16":
        activations = None
        dropped = [label for label, spec in (("activations", scheme.activations), ("KV cache", scheme.kv_cache)) if spec is not None]
        if dropped:
            notes.append(f"W4A16 keeps {' and '.join(dropped)} in full precision (quantized in the run)")
    else:
        activations, differences = _activation_plan(scheme.activations)
        if scheme.kv_cache is not None:
            differences.append(
                f"KV cache: {scheme.kv_cache.bits}-bit in the run, full precision in the export "
                "(vLLM's compressed-tensors loader takes only fp8 KV caches)"
            )
    if transforms.r3:
        notes.append("R3 (q/k Hadamard) not written: without KV-cache quantization it cancels in q.k, the output is unchanged")
    r4, unfuse, r4_differences = _r4_plan(transforms, plan, target)
    return CompressedPlan(
        weights=scheme.weights,
        activations=activations,
        r4=r4,
        unfuse_r4=unfuse,
        r4_targets=_r4_targets(plan),
        ignore=(plan.lm_head,),
        differences=tuple(differences + r4_differences),
        notes=tuple(notes),
    )


def _quantization_args(spec: QuantSpec, dynamic: bool) -> QuantizationArgs:
    """compressed-tensors arguments for an aaq spec: weights per channel/group, activations per token/group."""
    strategy = "group" if spec.group_size is not None else "token" if dynamic else "channel"
    return QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy, group_size=spec.group_size, dynamic=dynamic
    )


def quantization_config(plan: CompressedPlan) -> QuantizationConfig:
    """The quantization_config of the export: every decoder Linear but lm_head, pack-quantized."""
    activations = None if plan.activations is None else _quantization_args(plan.activations, dynamic=True)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=_quantization_args(plan.weights, dynamic=False), input_activations=activations, format=PACKED
    )
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(plan.ignore), format=PACKED)


def transform_config(plan: CompressedPlan) -> CompressedTransformConfig | None:
    """The online transforms of the export (R4 on the input of every R4 reader), or None."""
    if plan.r4 is None:
        return None
    r4 = TransformScheme(type=plan.r4, apply=[TransformArgs(targets=list(plan.r4_targets), location="input")])
    return CompressedTransformConfig(config_groups={R4_GROUP: r4})


def r4_weight(n: int, dtype: torch.dtype) -> torch.Tensor:
    """The +-1 matrix M with x -> x M / sqrt(n) equal to aaq's online R4 (x H^T / sqrt(n)), in `dtype` (exact in 16 bits)."""
    return hadamard_matrix(n).T.to(dtype).contiguous()


def r4_tensors(plan: TransformPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One R4 matrix per R4 reader (in `dtype`: the +-1 entries are exact), under the name compressed-tensors and vLLM load it from."""
    n = plan.geometry.intermediate_size
    return {f"{name}.{R4_GROUP}_input.weight": r4_weight(n, dtype) for name in r4_readers(plan)}


def _plain_model(run_dir: Path, fake_quant: PreTrainedModel) -> PreTrainedModel:
    """A transformers model of the run's architecture (nn.Linear layers) holding the run's weights, in the run model's dtype."""
    dtype = next(fake_quant.parameters()).dtype
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir), dtype=dtype)
    model.load_state_dict(fake_quant.state_dict())
    return model.eval()


def run_codes(fake_quant: PreTrainedModel, name: str) -> WeightCodes:
    """The integer codes of quantized linear `name`, or AaqError when compressed-tensors' grouped layout cannot hold them."""
    codes = fake_quant.get_submodule(name).codes
    if not codes.contiguous_groups:
        raise AaqError(
            f"{name}: GPTQ's act-order scattered the weight groups over the input columns, which this format cannot store; "
            "quantize with static groups ({setting}) or export in the aaq format",
            setting="static_groups",
        )
    return codes


@torch.no_grad()
def _unfuse_r4(model: PreTrainedModel, plan: TransformPlan, codes: dict[str, WeightCodes], spec: QuantSpec) -> None:
    """Rotate each R4 reader back to the plain basis (undoing its fused W H^T) and re-quantize it with RTN (new codes)."""
    for name in r4_readers(plan):
        linear = model.get_submodule(name)
        linear.weight.data = codes[name].dequantize(torch.float32)
        rotate_reader(linear, normalized_hadamard(linear.in_features))
        codes[name] = rtn_codes(linear.weight, spec)
        linear.weight.data = codes[name].dequantize(torch.float32)


@torch.no_grad()
def _compress(model: PreTrainedModel, plan: CompressedPlan, codes: dict[str, WeightCodes]) -> ModelCompressor:
    """Attach the quantization config with the run's codes' scales, then pack the weights in place.

    Scales stay float32 (loaders cast them to their own dtype); each weight is the dequantized value
    of its codes in the model dtype, from which the compressor recovers the same codes.
    """
    config = quantization_config(plan)
    apply_quantization_config(model, config, show_progress=False)
    spec = plan.weights
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        module.weight.data = codes[name].dequantize(module.weight.dtype, module.weight.device)
        module.weight_scale.data = codes[name].scale.clone()
        if codes[name].zero is not None:
            # aaq's asymmetric codes are 0..2^bits-1, compressed-tensors' are signed: both shift by 2^(bits-1).
            module.weight_zero_point.data.copy_(codes[name].zero.to(torch.int16) - 2 ** (spec.bits - 1))
    # Built from our own config: inferring it from the model would pick int-quantized (no packing)
    # for W4A4, with a warning per layer, and override it anyway.
    compressor = ModelCompressor(quantization_config=config, transform_config=transform_config(plan), force_compression_format=PACKED)
    compressor.compress_model(model)
    return compressor


def _write_config(out: Path, model: PreTrainedModel, compressor: ModelCompressor) -> None:
    """Write config.json with its quantization_config (the folder's completion marker), atomically."""

    def save(folder: Path) -> None:
        model.config.save_pretrained(folder)
        compressor.update_config(str(folder))

    write_staged(out, save)


def export_compressed(run_dir: Path, out: Path, config: ExportConfig, overwrite: bool = False) -> Written:
    """Write `run_dir` as a compressed-tensors folder with the `config.scheme` preset (marker: config.json)."""
    fake_quant, tokenizer, info = load_for_export(run_dir, config)
    scheme = run_scheme(info, run_dir)
    model_plan = transform_plan(fake_quant)
    plan = plan_export(scheme, TransformConfig(**info["transforms"]), model_plan, config.scheme)
    report = ExportReport(out_dir=out, format=config.format, scheme=config.scheme, differences=list(plan.differences), notes=list(plan.notes))
    check_strict(report, config.strict)
    linears = quantized_linears(fake_quant)
    codes = {name: run_codes(fake_quant, name) for name in linears}
    model = _plain_model(run_dir, fake_quant)
    del fake_quant
    if plan.unfuse_r4:
        _unfuse_r4(model, model_plan, codes, scheme.weights)
    compressor = _compress(model, plan, codes)
    tensors = model_state(model)
    if plan.r4 is not None:
        tensors.update(r4_tensors(model_plan, model.dtype))
    start_folder(out, overwrite)
    write_atomic(out / HF_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_staged(out, tokenizer.save_pretrained)
    report.linear_bytes, report.linear_fp16_bytes = linear_bytes(tensors, linears)
    return report, lambda: _write_config(out, model, compressor)
