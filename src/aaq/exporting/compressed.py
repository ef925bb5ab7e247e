"""compressed-tensors exports: W4A16 for plain transformers, W4A4 with online Hadamard transforms for vLLM.

The offline transforms (R1, R2, smoothing, the inverse of R4) are already fused into the run's
weights, so the folder only describes what must still happen at run time: the quantization of
weights and activations (`quantization_config`) and the online rotation R4 (`transform_config`,
an `input` transform of every `down_proj`). Each R4 matrix is stored per layer as
`<down_proj>.R4_input.weight`: vLLM loads one per layer and requires every one.

R3 (the Hadamard on queries and keys after RoPE) is not written. The format cannot carry an int4
KV cache to vLLM, and without KV quantization R3 cancels in q.k, so leaving it out changes nothing;
writing it would: vLLM 0.33 applies no `q_attn`/`k_cache` transforms, and compressed-tensors
0.20's `k_cache` hook never fires under transformers 5 attention (it renamed the cache argument
to `cache`), so that loader would rotate the queries alone.

The integer codes are the run's own (`aaq.packing.recover_codes`), written through
compressed-tensors' `ModelCompressor` (pack-quantized), so the weights are bit-identical.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from aaq.checkpoint import load_quantized
from aaq.errors import AaqError
from aaq.exporting import (
    HF_CONFIG,
    HF_WEIGHTS,
    ExportConfig,
    ExportReport,
    Written,
    check_strict,
    linear_bytes,
    quantized_linears,
    run_scheme,
    start_folder,
)
from aaq.fake_quant import OnlineTransforms
from aaq.hadamard import hadamard_matrix
from aaq.models import Geometry, get_adapter
from aaq.packing import recover_codes
from aaq.quantizers import QuantScheme, QuantSpec, quantize_weight_rtn
from aaq.rotation import normalized_hadamard, rotate_reader
from aaq.runs import write_atomic

try:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.transform import TransformArgs, TransformConfig, TransformScheme
    from compressed_tensors.transform.utils.hadamard import random_hadamard_matrix
except ImportError:  # an optional dependency: only this format needs it
    raise AaqError('the compressed-tensors format needs the `compressed-tensors` package; pip install "aaq[export]"') from None

R4_GROUP = "R4"
DOWN_PROJ_TARGET = r"re:.*mlp\.down_proj$"
# Hadamard entries are +-1, exact in fp16; half the bytes of the per-layer copies vLLM needs.
TRANSFORM_DTYPE = torch.float16
PRESET_GROUP_SIZE = 128
PACKED = "pack-quantized"
HadamardKind = Literal["hadamard", "random-hadamard"]


@dataclass(frozen=True)
class CompressedPlan:
    """How a run maps onto a compressed-tensors scheme, and what the mapping changes.

    `r4`: the transform type carrying the run's online down_proj Hadamard, or None when the run
    has none or it cannot be expressed (then `unfuse_r4`: down_proj is rotated back and re-quantized).
    """

    weights: QuantSpec
    activations: QuantSpec | None
    r4: HadamardKind | None
    unfuse_r4: bool
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
        raise AaqError(f"the run's weights are {spec.bits}-bit; W4A16/W4A4 exports need a 4-bit run, quantize with --bits w4...")
    if target == "W4A16" and not spec.symmetric:
        # compressed-tensors 0.20 sizes the zero points of an empty (meta) model unpacked, so
        # transformers finds the packed ones mismatched and silently re-initialises them.
        raise AaqError(
            "transformers cannot load asymmetric int4 weights from compressed-tensors folders (their zero points are "
            "re-initialised); export this run with --format aaq, or quantize with symmetric weights"
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


def _r4_plan(online: OnlineTransforms, geometry: Geometry, target: str) -> tuple[HadamardKind | None, bool, list[str]]:
    """R4 transform type, whether down_proj must be unfused instead, and the difference that causes."""
    if not online.down_proj_hadamard:
        return None, False, []
    n = geometry.intermediate_size
    kind = hadamard_kind(n) if target == "W4A4" else None
    if kind is not None:
        return kind, False, []
    why = "transformers cannot apply online transforms" if target == "W4A16" else f"compressed-tensors cannot build a Hadamard of order {n}"
    return None, True, [
        f"down_proj: the run applies an online R4 Hadamard ({why}); its weights were rotated back and re-quantized with RTN, "
        "so down_proj differs from the run (quantize with --no-r4 for an exact export)"
    ]


def plan_export(scheme: QuantScheme, online: OnlineTransforms, geometry: Geometry, target: str) -> CompressedPlan:
    """Map a run's scheme (with quantized weights) and online transforms onto the compressed-tensors scheme `target`."""
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
    if online.qk_hadamard:
        notes.append("R3 (q/k Hadamard) not written: without KV-cache quantization it cancels in q.k, the output is unchanged")
    r4, unfuse, r4_differences = _r4_plan(online, geometry, target)
    return CompressedPlan(
        weights=scheme.weights,
        activations=activations,
        r4=r4,
        unfuse_r4=unfuse,
        differences=tuple(differences + r4_differences),
        notes=tuple(notes),
    )


def _quantization_args(spec: QuantSpec, dynamic: bool) -> QuantizationArgs:
    """compressed-tensors arguments for an aaq spec: weights per channel/group, activations per token/group."""
    if spec.group_size is not None:
        strategy = "group"
    else:
        strategy = "token" if dynamic else "channel"
    return QuantizationArgs(
        num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=strategy, group_size=spec.group_size, dynamic=dynamic
    )


def quantization_config(plan: CompressedPlan) -> QuantizationConfig:
    """The quantization_config of the export: every decoder Linear but lm_head, pack-quantized."""
    activations = None if plan.activations is None else _quantization_args(plan.activations, dynamic=True)
    scheme = QuantizationScheme(
        targets=["Linear"], weights=_quantization_args(plan.weights, dynamic=False), input_activations=activations, format=PACKED
    )
    return QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], format=PACKED)


def transform_config(plan: CompressedPlan) -> TransformConfig | None:
    """The online transforms of the export (R4 on every down_proj input), or None."""
    if plan.r4 is None:
        return None
    r4 = TransformScheme(type=plan.r4, apply=[TransformArgs(targets=[DOWN_PROJ_TARGET], location="input")])
    return TransformConfig(config_groups={R4_GROUP: r4})


def r4_weight(n: int) -> torch.Tensor:
    """The +-1 matrix M with x -> x M / sqrt(n) equal to aaq's online R4 (x H^T / sqrt(n))."""
    return hadamard_matrix(n).T.to(TRANSFORM_DTYPE).contiguous()


def r4_tensors(model: PreTrainedModel, n: int) -> dict[str, torch.Tensor]:
    """One R4 matrix per down_proj, under the name compressed-tensors and vLLM load it from."""
    down_projs = {id(parts.down_proj) for parts in get_adapter(model).layers()}
    names = [name for name, module in model.named_modules() if id(module) in down_projs]
    return {f"{name}.{R4_GROUP}_input.weight": r4_weight(n) for name in names}


def _plain_model(run_dir: Path, fake_quant: PreTrainedModel) -> PreTrainedModel:
    """A transformers model of the run's architecture (nn.Linear layers) holding the run's weights."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir), dtype=torch.float32)
    model.load_state_dict(fake_quant.state_dict())
    return model.eval()


@torch.no_grad()
def _unfuse_down_proj(model: PreTrainedModel, spec: QuantSpec) -> None:
    """Rotate each down_proj back to the plain basis (the inverse of `fuse_online_hadamard`) and re-quantize it with RTN."""
    for parts in get_adapter(model).layers():
        rotate_reader(parts.down_proj, normalized_hadamard(parts.down_proj.in_features))
        parts.down_proj.weight.data = quantize_weight_rtn(parts.down_proj.weight, spec)


@torch.no_grad()
def _compress(model: PreTrainedModel, plan: CompressedPlan) -> ModelCompressor:
    """Attach the quantization config with the run's scales, then pack the weights in place."""
    config = quantization_config(plan)
    apply_quantization_config(model, config, show_progress=False)
    spec = plan.weights
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        codes = recover_codes(module.weight, spec, name)
        module.weight_scale.data.copy_(codes.scale)
        if codes.zero is not None:
            # aaq's asymmetric codes are 0..2^bits-1, compressed-tensors' are signed: both shift by 2^(bits-1).
            module.weight_zero_point.data.copy_(codes.zero.to(torch.int16) - 2 ** (spec.bits - 1))
    # Built from our own config: inferring it from the model would pick int-quantized (no packing)
    # for W4A4, with a warning per layer, and override it anyway.
    compressor = ModelCompressor(quantization_config=config, transform_config=transform_config(plan), force_compression_format=PACKED)
    compressor.compress_model(model)
    return compressor


def _write_config(out: Path, model: PreTrainedModel, compressor: ModelCompressor) -> None:
    """Write config.json with its quantization_config (the folder's completion marker), atomically."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".config-") as tmp:
        model.config.save_pretrained(tmp)
        compressor.update_config(tmp)
        os.replace(Path(tmp) / HF_CONFIG, out / HF_CONFIG)


def export_compressed(run_dir: Path, out: Path, config: ExportConfig) -> Written:
    """Write `run_dir` as a compressed-tensors folder with the `config.scheme` preset (marker: config.json)."""
    fake_quant, tokenizer, info = load_quantized(run_dir)
    scheme = run_scheme(info, run_dir)
    geometry = get_adapter(fake_quant).geometry
    plan = plan_export(scheme, OnlineTransforms(**info["online_transforms"]), geometry, config.scheme)
    report = ExportReport(out_dir=out, format=config.format, scheme=config.scheme, differences=list(plan.differences), notes=list(plan.notes))
    check_strict(report, config.strict)
    linears = quantized_linears(fake_quant)
    model = _plain_model(run_dir, fake_quant)
    del fake_quant
    if plan.unfuse_r4:
        _unfuse_down_proj(model, scheme.weights)
    compressor = _compress(model, plan)
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if plan.r4 is not None:
        tensors.update(r4_tensors(model, geometry.intermediate_size))
    start_folder(out)
    write_atomic(out / HF_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    tokenizer.save_pretrained(out)
    report.linear_bytes, report.linear_fp16_bytes = linear_bytes(tensors, linears)
    return report, lambda: _write_config(out, model, compressor)
