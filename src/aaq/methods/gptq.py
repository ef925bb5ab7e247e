"""GPTQ: error-compensating weight quantization from second-order input statistics.

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". Columns of a weight are quantized one at a time; the rounding error of each column
is spread over the not-yet-quantized columns through the inverse Hessian of the layer's
reconstruction loss ||X W^T - X Wq^T||^2, whose Hessian is H = 2 X^T X / N.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from aaq.calibration.layerwise import capture_first_layer_inputs, run_layer
from aaq.calibration.teachers import tokens_fingerprint
from aaq.errors import AaqError
from aaq.methods.registry import MethodContext, Options, register_method, take_options
from aaq.methods.weight_only import WeightOnlyConfig, apply_weight_only
from aaq.models.plan import LayerPlan
from aaq.quant.fake_quant import QuantLinear
from aaq.quant.packing import WeightCodes
from aaq.quant.quantizers import QuantScheme, QuantSpec, weight_quant_params
from aaq.runs.records import write_atomic
from aaq.runtime import distributed
from aaq.runtime.devices import model_device, release_freed_host_memory, resting_on_host

logger = logging.getLogger(__name__)

GPTQ_OPTIONS = ("damp", "act_order", "static_groups", "onload_layers")
# Each failed Cholesky multiplies the damping by this factor, at most this many times.
_DAMP_GROWTH = 10.0
_DAMP_RETRIES = 3


@dataclass
class GPTQConfig(WeightOnlyConfig):
    """Settings of the GPTQ solver; as a method, GPTQ weights without rotations.

    `damp`: fraction of the mean Hessian diagonal added to the diagonal (numerical stability).
    `act_order`: quantize columns by decreasing Hessian diagonal, so the most salient inputs are
    rounded first while many columns remain to absorb their error.
    `block_size`: columns per lazy-update block (speed only; the result does not depend on it).
    `static_groups`: compute every group's scale up front from the original weight instead of
    when the group starts. With `act_order` and groups, dynamic groups are contiguous in the
    *processing* order, i.e. scattered in the original column order (the "g_idx" layout); static
    groups keep each group contiguous in the original order, which formats with plain contiguous
    groups (GGUF, most kernels) require, at the cost of scales that ignore the error updates.
    `onload_layers`: the model rests on the host while GPTQ runs and each decoder layer is onloaded
    to the compute device for its turn (as always with memory budgets): the device holds one layer
    instead of the model, and each layer's weights cross to the device and back once.
    """

    name: ClassVar[str] = "gptq"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    static_groups: bool = False
    onload_layers: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.damp <= 1.0:
            raise AaqError(f"GPTQ damp must be in (0, 1] (a fraction of the mean Hessian diagonal), got {self.damp}")
        if self.block_size < 1:
            raise AaqError(f"GPTQ block_size must be a positive number of columns, got {self.block_size}")

    def apply_options(self, options: Options) -> tuple[GPTQConfig, Options]:
        """This config with the solver options (damp, act_order, static_groups, onload_layers) applied."""
        taken, rest = take_options(options, GPTQ_OPTIONS)
        return replace(self, **taken), rest

    def needs_calibration(self) -> bool:
        """GPTQ reads the Hessians of calibration inputs."""
        return True

    def gptq_settings(self) -> GPTQConfig:
        """Its own settings."""
        return self

    def with_gptq_settings(self, **changes: Any) -> GPTQConfig:
        """This config with settings changed."""
        return replace(self, **changes)

    def quantize_weights(self, context: MethodContext) -> None:
        """GPTQ every projection weight, layer by layer."""
        quantize_weights_gptq(context, self)

    def work_folders(self) -> tuple[str, ...]:
        """The finished layers, kept for a resume."""
        return (PROGRESS_DIR,)

    def export_blocker(self, scheme: QuantScheme) -> AaqError | None:
        """With act_order and weight groups, dynamic groups are scattered in the original column order: no export format stores that."""
        weights = scheme.weights
        if weights is None or weights.group_size is None or not self.act_order or self.static_groups:
            return None
        return AaqError(
            "GPTQ with act_order and weight groups orders each group's scale by processing order, which no export format can "
            "store, so the run cannot be exported; quantize with {setting} (or without act_order) for an exportable run",
            setting="static_groups",
        )


class HessianAccumulator:
    """Running GPTQ Hessian H = 2/N * sum_n x_n x_n^T of a linear layer's inputs.

    Each batch's product is computed in float32 (at least) and added to a float64 sum: a float32
    running sum over hundreds of thousands of tokens loses several digits, while float64 for the
    product itself would double the dominant cost for no measurable gain.
    """

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self._sum: torch.Tensor | None = None
        self._n = 0

    @property
    def n_samples(self) -> int:
        """Number of input vectors (tokens) added so far."""
        return self._n

    @property
    def hessian(self) -> torch.Tensor:
        """The Hessian (in_features, in_features) in float64."""
        if self._sum is None:
            raise AaqError("no calibration inputs reached this layer; run calibration batches through the model before GPTQ")
        return self._sum * (2.0 / self._n)

    @torch.no_grad()
    def sum_over_processes(self, device: torch.device, n_samples: int, what: str) -> None:
        """Replace the sum by its sum over the processes (on `device`), which added `n_samples` input vectors in all."""
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        distributed.sum_([self._sum], what)
        self._n = n_samples

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs shaped (..., in_features)."""
        if x.shape[-1] != self.in_features:
            raise AaqError(f"input has {x.shape[-1]} features but the accumulator expects {self.in_features}; hook the right layer")
        rows = x.detach().reshape(-1, self.in_features)
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        product = (rows.T @ rows).double()
        self._sum = product if self._sum is None else self._sum + product
        self._n += rows.shape[0]


@dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ takes from a Hessian, shared by every linear that reads the same input.

    `dead`: input columns that never saw a non-zero value; `perm`: the processing order of the
    columns; `u`: the upper Cholesky factor of the damped inverse Hessian in that order (float64).
    """

    dead: torch.Tensor
    perm: torch.Tensor
    u: torch.Tensor


@torch.no_grad()
def prepare_hessian(hessian: torch.Tensor, config: GPTQConfig) -> PreparedHessian:
    """Dead columns, processing order and the inverse-Hessian factor of a Hessian (computed once per input)."""
    if not torch.isfinite(hessian).all():
        raise AaqError("Hessian has non-finite entries; check the calibration activations for inf/NaN (e.g. run in float32)")
    h = hessian.detach().to(torch.float64).clone()
    # A column whose input is always zero carries no information; it is quantized to exactly 0.
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    perm = _processing_order(h, config.act_order)
    return PreparedHessian(dead=dead, perm=perm, u=_inverse_hessian_cholesky(h[perm][:, perm], config.damp))


@dataclass(frozen=True)
class GPTQResult:
    """A GPTQ-quantized weight (in the input's dtype) and its integer codes."""

    weight: torch.Tensor
    codes: WeightCodes


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, spec: QuantSpec, config: GPTQConfig) -> GPTQResult:
    """GPTQ-quantized weight together with the codes, scales and zero points it was quantized to.

    `hessian`: the raw Hessian of the weight's inputs, or one prepared once for all linears sharing them.
    """
    if not isinstance(hessian, PreparedHessian):
        _check_shapes(weight, hessian, spec)
        hessian = prepare_hessian(hessian, config)
    _check_shapes(weight, hessian.u, spec)
    work_dtype = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(work_dtype).clone()
    w[:, hessian.dead.to(w.device)] = 0.0
    perm = hessian.perm.to(w.device)

    static_scale, static_zero = _static_column_params(w, spec, config)
    w = w[:, perm]
    if static_scale is not None:
        static_scale, static_zero = static_scale[:, perm], static_zero[:, perm]

    u = hessian.u.to(device=w.device, dtype=work_dtype)
    block_size = _aligned_block_size(config.block_size, spec.group_size)
    quantized, levels, scale, zero = _quantize_columns(w, u, spec, block_size, static_scale, static_zero)

    inverse = torch.argsort(perm)
    return GPTQResult(weight=quantized[:, inverse].to(weight.dtype), codes=_codes(levels, scale, zero, perm, inverse, spec, config))


def _codes(
    levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor, spec: QuantSpec, config: GPTQConfig
) -> WeightCodes:
    """The codes of GPTQ's per-column levels, scales and zero points (given in processing order).

    Dynamic groups are runs of `group_size` columns in processing order: with act-order they are
    scattered in the original order, which `g_idx` records. Static groups (and per-channel scales)
    are contiguous in the original order.
    """
    n = levels.shape[1]
    size = n if spec.group_size is None else spec.group_size
    starts = torch.arange(0, n, size, device=levels.device)
    scattered = spec.group_size is not None and config.act_order and not config.static_groups
    firsts = starts if scattered else inverse[starts]
    g_idx = inverse // size if scattered else None
    return WeightCodes.from_levels(levels[:, inverse], scale[:, firsts], zero[:, firsts], spec, g_idx)


def _check_shapes(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec) -> None:
    if weight.dim() != 2:
        raise AaqError(f"GPTQ expects a 2-D weight (out, in), got shape {tuple(weight.shape)}; reshape conv/fused weights first")
    n_in = weight.shape[1]
    if hessian.shape != (n_in, n_in):
        raise AaqError(
            f"Hessian shape {tuple(hessian.shape)} does not match the weight's {n_in} input features; collect it from this layer's inputs"
        )
    if spec.group_size is not None and n_in % spec.group_size:
        raise AaqError(f"in_features {n_in} is not divisible by group_size {spec.group_size}; pick a divisor")


def _processing_order(h: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Column permutation: by decreasing Hessian diagonal with `act_order`, else the identity."""
    if not act_order:
        return torch.arange(h.shape[0], device=h.device)
    # Stable, so equal diagonals keep their original order (H = I then reproduces RTN exactly).
    return torch.argsort(torch.diagonal(h), descending=True, stable=True)


def _static_column_params(w: torch.Tensor, spec: QuantSpec, config: GPTQConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-column (out, in) scale and zero fixed before any error update, or None when groups are set dynamically.

    Per-channel scales are always static: every column of a row shares them, so they can only
    come from the whole (original) row.
    """
    if spec.group_size is not None and not config.static_groups:
        return None, None
    scale, zero = weight_quant_params(w, spec)
    width = w.shape[1] // scale.shape[1]
    return scale.squeeze(-1).repeat_interleave(width, dim=1), zero.squeeze(-1).repeat_interleave(width, dim=1)


def _aligned_block_size(block_size: int, group_size: int | None) -> int:
    """Block size rounded to a multiple of the group size.

    Dynamic group scales are computed from the weights when the group starts; a group that began
    mid-block and ran past the block's end would see columns still missing this block's lazy
    updates. Blocks made of whole groups avoid that without changing the (block-independent) result.
    """
    if group_size is None:
        return block_size
    return group_size * max(1, block_size // group_size)


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, retrying with more damping if H is not positive definite."""
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    current = damp
    for attempt in range(_DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + current * mean_diag * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0:
                return upper
        if attempt < _DAMP_RETRIES:
            logger.warning("GPTQ Hessian not positive definite with damp=%g; retrying with damp=%g", current, current * _DAMP_GROWTH)
            current *= _DAMP_GROWTH
    raise AaqError(
        f"GPTQ Hessian is not positive definite even with damp={current:g}; calibrate with more tokens or raise GPTQConfig.damp"
    )


def _quantize_columns(
    w: torch.Tensor,
    u: torch.Tensor,
    spec: QuantSpec,
    block_size: int,
    static_scale: torch.Tensor | None,
    static_zero: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantized weight, its integer levels and per-column scale/zero, columns in the given (processing) order.

    `u` is the upper Cholesky factor of H^-1 in the same order. Row i of `u` divided by u[i, i]
    gives the optimal update of the remaining columns for the error of column i (GPTQ eq. 3 in
    Cholesky form); updates to columns beyond the current block are applied once per block.
    """
    n_in = w.shape[1]
    quantized = torch.empty_like(w)
    levels = torch.empty_like(w)
    scale = torch.empty_like(w) if static_scale is None else static_scale
    zero = torch.empty_like(w) if static_zero is None else static_zero
    group_spec = replace(spec, group_size=None)
    for start in range(0, n_in, block_size):
        end = min(start + block_size, n_in)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        for i in range(end - start):
            col = start + i
            if static_scale is None and col % spec.group_size == 0:
                group_scale, group_zero = weight_quant_params(block[:, i : i + spec.group_size], group_spec)
                scale[:, col : col + spec.group_size] = group_scale.view(-1, 1)
                zero[:, col : col + spec.group_size] = group_zero.view(-1, 1)
            column, s, z = block[:, i : i + 1], scale[:, col : col + 1], zero[:, col : col + 1]
            level = torch.clamp(torch.round(column / s) + z, spec.qmin, spec.qmax)
            q = (level - z) * s
            quantized[:, col : col + 1] = q
            levels[:, col : col + 1] = level
            err = (column - q) / u[col, col]
            block[:, i:] -= err * u[col : col + 1, col:end]
            errors[:, i : i + 1] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return quantized, levels, scale, zero


def _hessian_hook(accumulator: HessianAccumulator):
    # Forward hooks see the input after any online rotation (a pre-hook); the quantizer runs inside forward.
    def hook(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        x = args[0]
        accumulator.add(module.quantized_input(x) if isinstance(module, QuantLinear) else x)

    return hook


PROGRESS_DIR = "gptq_progress"


def _progress_key(context: MethodContext, config: GPTQConfig) -> str:
    """Fingerprint of everything that determines the quantized layers: config, scheme, seed, tokens."""
    settings = {"method": context.method.to_dict(), "gptq": asdict(config), "scheme": context.scheme.to_dict(), "seed": context.seed}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(tokens_fingerprint(context.calibration_tokens).encode())
    return digest.hexdigest()


def _finished_layer(path: Path, key: str) -> dict[str, torch.Tensor] | None:
    """The saved quantized weights of one layer, or None if that layer was not finished."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata().get("key") != key:
                raise AaqError(f"{path.parent} holds GPTQ progress of another configuration; drop --resume or delete it")
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError):
        return None


@torch.no_grad()
def quantize_weights_gptq(context: MethodContext, config: GPTQConfig) -> None:
    """GPTQ every projection of the plan, layer by layer, on the inputs the quantized prefix produces.

    Each layer sees the outputs of the already-quantized layers before it (weights, activations
    and KV cache fake-quantized), so later layers compensate for earlier layers' error. Each layer
    is onloaded to the compute device for its turn and put back where it rests (sequential
    onloading: a model resting on the CPU, with memory budgets or `onload_layers`, needs one layer
    of device memory). With a `run_dir`, each
    finished layer is saved, and `resume` reuses them: the finished layers only rerun their forward,
    so the result equals an uninterrupted run.

    Split over processes (`aaq.runtime.distributed`), each process runs its share of the calibration batches
    through the layers, the Hessians are summed over the processes before each layer's solve, each
    process solves its share of the layer's weights, and all take every weight's codes from the
    process that solved it: all hold the weights of a one-process run. Process 0 writes the finished
    layers.
    """
    if context.calibration_tokens is None:
        raise AaqError("GPTQ needs calibration tokens; pass a tokenizer or calibration token ids")
    if not context.resume:
        context.drop_work_folder(PROGRESS_DIR)
    progress = context.work_folder(PROGRESS_DIR)
    key = _progress_key(context, config)
    with resting_on_host(context.model, context.placement, config.onload_layers):
        _quantize_layers(context, config, progress, key)
    context.drop_work_folder(PROGRESS_DIR)


def _quantize_layers(context: MethodContext, config: GPTQConfig, progress: Path | None, key: str) -> None:
    """The layer loop of `quantize_weights_gptq`: each layer onloaded to the compute device for its turn."""
    model, plan, spec = context.model, context.plan, context.scheme.weights
    device = context.placement.compute_device
    main = distributed.is_main_process()
    first_block = model.get_submodule(plan.layers[0].block)
    tokens = context.calibration_tokens[distributed.share_of_batches(context.calibration_tokens.shape[0], context.batch_size)]
    with distributed.agreed("GPTQ's first layer inputs"):
        inputs = capture_first_layer_inputs(model, first_block, tokens, context.batch_size).to(device)
    for index, layer in enumerate(tqdm(plan.layers, desc="GPTQ", unit="layer", disable=not main)):
        what = f"GPTQ layer {index}"
        block = model.get_submodule(layer.block)
        rest = model_device(block)
        block.to(device)
        linears = {name: model.get_submodule(name) for name in layer.linears}
        layer_file = None if progress is None else progress / f"layer_{index:04d}.safetensors"
        with distributed.agreed(what):
            saved = None if layer_file is None or not context.resume else _finished_layer(layer_file, key)
            hessians = None if saved is not None else _layer_hessians(layer, linears, block, inputs)
        if saved is not None:
            codes = {name: WeightCodes.from_tensors(saved, name, linear.weight.shape, spec) for name, linear in linears.items()}
        else:
            _sum_over_processes(hessians, device, what)
            with distributed.agreed(what):
                solved = _quantize_share(layer, linears, hessians, spec, config)
            codes = {name: weight_codes for share in distributed.gather(solved, what) for name, weight_codes in share.items()}
        with distributed.agreed(what):
            for name, weight_codes in codes.items():
                linears[name].set_codes(weight_codes)
            if saved is None and layer_file is not None and main:
                state = {tensor: t for name, weight_codes in codes.items() for tensor, t in weight_codes.tensors(name).items()}
                write_atomic(layer_file, lambda tmp, state=state: save_file(state, str(tmp), metadata={"key": key}))
            inputs = run_layer(block, inputs)
        block.to(rest)
        # The layer's replaced weights go back to glibc's heap, which keeps them mapped: without
        # this the host peak grows by a copy of the linear weights (1.7 GiB for a 1B model in bf16).
        release_freed_host_memory()


def _layer_hessians(layer: LayerPlan, linears: dict[str, nn.Linear], block: nn.Module, inputs) -> dict[str, HessianAccumulator]:
    """The Hessian of each distinct input of the layer's linears (by the first linear reading it), over one pass of the layer."""
    groups = {group[0]: group for group in layer.input_groups}
    accumulators = {first: HessianAccumulator(linears[first].in_features) for first in groups}
    handles = [linears[first].register_forward_hook(_hessian_hook(accumulators[first])) for first in groups]
    try:
        run_layer(block, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def _sum_over_processes(accumulators: dict[str, HessianAccumulator], device: torch.device, what: str) -> None:
    """Each Hessian summed over the processes (each ran its share of the calibration batches); nothing in one process."""
    if not distributed.active():
        return
    counts = torch.tensor([float(a.n_samples) for a in accumulators.values()], dtype=torch.float64, device=device)
    distributed.sum_([counts], what)
    for accumulator, count in zip(accumulators.values(), counts.tolist(), strict=True):
        accumulator.sum_over_processes(device, int(count), what)


def _quantize_share(
    layer: LayerPlan, linears: dict[str, nn.Linear], hessians: dict[str, HessianAccumulator], spec: QuantSpec, config: GPTQConfig
) -> dict[str, WeightCodes]:
    """The GPTQ codes of this process's share of the layer's weights (all of them in one process), by linear.

    Linears that read the same input (q/k/v, gate/up) share one Hessian and one factorisation. The
    processes share the weights balanced by size.
    """
    mine = set(distributed.balanced_share({name: linear.weight.numel() for name, linear in linears.items()}))
    solved = {}
    for group in layer.input_groups:
        hessian = hessians.pop(group[0])
        names = [name for name in group if name in mine]
        if names:
            prepared = prepare_hessian(hessian.hessian, config)
            for name in names:
                solved[name] = gptq_quantize(linears[name].weight.data, prepared, spec, config).codes
    return solved


register_method(GPTQConfig)(apply_weight_only)
