"""Saving a quantized model to a folder and loading it back as the same fake-quantized model.

A quantized folder holds `aaq_config.json` (written last: its presence means the folder is
complete), `aaq_folder.json` with every file's checksum (`aaq.runs.folders`), the transformers
`config.json` of the transformed architecture, the weights in
`aaq_model.safetensors`, the fused rotations and smoothing scales in `transforms.safetensors`,
and the tokenizer. The weights file holds each quantized linear as its integer codes (packed two
int4 per byte, with scales and zero points: `aaq.quant.packing.WeightCodes`), every other tensor in the
model's dtype, and, in exports that ask for it, the embeddings and lm_head as int8 rows. It is named
so that plain `from_pretrained` does not load it without the online transforms it needs.
`aaq export --format aaq` writes the same format without the run's working files.

`aaq_config.json` also records the checksum of the tensors of both safetensors files
(`aaq.runs.records.tensors_digest`), so a copy of the folder without its marker is checked too:
reading a weight file verifies it, and one without a recorded checksum (a folder of an older aaq)
is read only when the marker vouches for it. (Not in the safetensors metadata: safetensors writes
a metadata mapping of two keys in a random order, which would make equal folders differ in bytes.)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from aaq.errors import AaqError
from aaq.models import transform_plan
from aaq.models.loading import ModelSource, load_model
from aaq.models.plan import TransformConfig
from aaq.quant.fake_quant import QuantLinear, install_quantizers
from aaq.quant.packing import SUFFIXES, WeightCodes, packed_bytes, rtn_codes
from aaq.quant.quantizers import QuantScheme, QuantSpec
from aaq.runs.folders import MARKER, folder_kind, prepare_output_folder, remove_file, verify_file
from aaq.runs.records import provenance, tensors_digest, write_atomic, write_json, write_staged
from aaq.runtime.devices import Placement, default_device, dtype_name
from aaq.transforms.online import install_online_rotations
from aaq.transforms.rotation import ties_embeddings

if TYPE_CHECKING:
    from aaq.api import QuantizeResult

AAQ_CONFIG = "aaq_config.json"
# What a run that stopped on an error leaves in its folder: the error and the stage it happened in.
FAILED_RECORD = "failed.json"
# The record's reason why the run cannot be exported (null when it can), as its method gave it.
EXPORT_BLOCKER = "export_blocker"
# The record's sha256 of the tensors of each safetensors file (`tensors_digest`), by file name.
CHECKSUMS = "checksums"
WEIGHTS = "aaq_model.safetensors"
TRANSFORMS = "transforms.safetensors"
FORMAT = "aaq"
# 2: integer codes as the weights' source of truth; `transforms` (the applied TransformConfig);
# tensors in the model's dtype; optional int8 embeddings and lm_head.
FORMAT_VERSION = 2
# Embeddings and lm_head stored as int8 rows (`aaq export --int8-embeddings`): symmetric per row.
INT8_ROWS = QuantSpec(bits=8, symmetric=True)


def is_quantized_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by `save_quantized` or `aaq export --format aaq`."""
    return (Path(path) / AAQ_CONFIG).is_file()


def is_run_folder(path: str | Path) -> bool:
    """True for a quantized folder, finished or not (a killed or failed run, a deleted `aaq_config.json`)."""
    path = Path(path)
    return is_quantized_folder(path) or (path / WEIGHTS).is_file() or folder_kind(path) == "run"


def model_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict without a tied lm_head (safetensors refuses tensors that share memory; loading re-ties it)."""
    plan = transform_plan(model)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if ties_embeddings(model, plan):
        state.pop(f"{plan.lm_head}.weight", None)
    return state


def saved_weight_bytes(model: PreTrainedModel, scheme: QuantScheme, fuses_norms: bool) -> tuple[int, int]:
    """Estimated bytes a run folder of the still unquantized `model` stores: its quantized linears' codes, and everything else.

    Everything else: the other tensors in the model's dtype, a copy of the embeddings for the lm_head
    when norm fusion (`fuses_norms`) unties them, and the fused rotations and scales (float64 at most).
    """
    plan = transform_plan(model)
    quantized = set(plan.linears) if scheme.weights is not None else set()
    codes, rest = 0, 0
    for name, tensor in model_state(model).items():
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            codes += packed_bytes(*tensor.shape, scheme.weights)
        else:
            rest += tensor.numel() * tensor.element_size()
    if fuses_norms:
        embeddings = model.get_submodule(plan.embeddings).weight
        rest += embeddings.numel() * embeddings.element_size() if ties_embeddings(model, plan) else 0
        g = plan.geometry
        rest += 8 * (g.hidden_size**2 + g.num_layers * (g.head_dim**2 + 4 * g.hidden_size + g.intermediate_size))
    return codes, rest


def model_tensors(model: PreTrainedModel, int8_rows: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors a quantized folder stores: quantized linears as codes, `int8_rows` modules as int8 rows, the rest as is."""
    state = model_state(model)
    for name, module in model.named_modules():
        codes = module.codes if isinstance(module, QuantLinear) else None
        if name in int8_rows and f"{name}.weight" in state:
            codes = rtn_codes(module.weight.detach(), INT8_ROWS)
        if codes is not None:
            del state[f"{name}.weight"]
            state |= codes.tensors(name)
    return state


def write_model_files(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: Path, checksums: dict[str, str], int8_rows: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Write the model files of a quantized folder (not its marker) into a prepared output folder; returns the stored tensors.

    The weights' checksum goes into `checksums` (for `write_marker`).
    """
    remove_file(out / AAQ_CONFIG)
    write_staged(out, model.config.save_pretrained)
    tensors = model_tensors(model, int8_rows)
    write_tensors(out / WEIGHTS, tensors, checksums)
    if tokenizer is not None:
        write_staged(out, tokenizer.save_pretrained)
    return tensors


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], checksums: dict[str, str]) -> None:
    """Write a safetensors file of a quantized folder atomically, and note its tensors' checksum in `checksums` (for `write_marker`)."""
    metadata = {"format": FORMAT} if path.name == WEIGHTS else None
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    checksums[path.name] = tensors_digest(tensors)


def write_marker(out: Path, model: PreTrainedModel, record: dict[str, Any], checksums: dict[str, str], int8_rows: tuple[str, ...] = ()) -> None:
    """Write `aaq_config.json`, the marker that makes a folder a complete quantized folder (last, atomically), with its weights' `checksums`."""
    dtype = dtype_name(next(model.parameters()).dtype)
    fixed = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype, "int8_rows": list(int8_rows), CHECKSUMS: checksums}
    write_json(out / AAQ_CONFIG, fixed | record)


def save_quantized(
    result: QuantizeResult,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    source: str | None = None,
) -> Path:
    """Write the quantized model of `result` to `out_dir`; returns the folder."""
    out = Path(out_dir)
    prepare_output_folder(out, "run")
    remove_file(out / AAQ_CONFIG)
    checksums: dict[str, str] = {}
    if result.transforms.tensors():
        write_tensors(out / TRANSFORMS, result.transforms.tensors(), checksums)
    else:
        remove_file(out / TRANSFORMS)
    write_model_files(result.model, tokenizer, out, checksums)
    scheme = result.config.resolved_scheme()
    blocker = result.config.method.export_blocker(scheme)
    record = {
        "source_model": source,
        "quantize": result.config.to_dict(),
        "transforms": asdict(result.transforms.config),
        EXPORT_BLOCKER: None if blocker is None else {"message": blocker.template, "setting": blocker.setting},
        **provenance(),
    }
    write_marker(out, result.model, record, checksums)
    return out


def read_aaq_config(path: str | Path) -> dict[str, Any]:
    """The `aaq_config.json` of a quantized folder, validated."""
    file = Path(path) / AAQ_CONFIG
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise AaqError(
            f"{path} has no {AAQ_CONFIG}: it is not a finished aaq run{_failure(Path(path))}; "
            "finish it with `aaq quantize` into that folder with {setting}, or re-run it",
            setting="resume",
        ) from None
    except json.JSONDecodeError as err:
        raise AaqError(f"{file} is not valid JSON ({err.msg}); the folder is corrupt, re-run `aaq quantize`") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise AaqError(
            f"{file} has format {data.get('format')} v{data.get('format_version')}, this aaq reads {FORMAT} v{FORMAT_VERSION}; "
            "re-run `aaq quantize` (or `aaq export`) with this aaq"
        )
    missing = [key for key in ("quantize", "transforms", "dtype", "int8_rows") if key not in data]
    if missing:
        raise AaqError(f"{file} lacks {', '.join(missing)}; the folder is corrupt, re-run `aaq quantize`")
    checksums = data.get(CHECKSUMS, {})
    if not isinstance(checksums, dict) or not all(isinstance(value, str) for value in checksums.values()):
        raise AaqError(f"{file} has damaged {CHECKSUMS}; the folder is corrupt, re-run `aaq quantize`")
    return data


def saved_run_scheme(info: dict[str, Any]) -> QuantScheme:
    """The quantization scheme a quantized folder was made with, from its `aaq_config.json`."""
    return QuantScheme.from_dict(info["quantize"]["scheme"])


def saved_export_blocker(info: dict[str, Any]) -> AaqError | None:
    """Why the run a quantized folder holds cannot be exported, as its method said when it was saved (None when it can)."""
    blocker = info.get(EXPORT_BLOCKER)
    return None if blocker is None else AaqError(blocker["message"], setting=blocker["setting"])


def _failure(path: Path) -> str:
    """How the run in `path` failed, from its `failed.json` (empty when it has none)."""
    try:
        failed = json.loads((path / FAILED_RECORD).read_text())
        return f" (it failed in stage {failed['stage']}: {failed['error']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def load_checked_tensors(file: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of a quantized folder, checked against the checksum its `info` (aaq_config.json) records and its folder's marker.

    AaqError when either does not match, when no checksum is recorded and no marker vouches for the
    file (a folder of an older aaq copied without its marker), or when it is missing or unreadable.
    """
    remedy = "write the folder again (`aaq quantize` or `aaq export`)"
    try:
        verify_file(file, remedy)
        tensors = load_file(str(file))
    except FileNotFoundError:
        raise AaqError(f"{file} is missing; the folder is incomplete, {remedy}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise AaqError(f"{file} is corrupt or truncated ({str(err).strip().splitlines()[0]}); {remedy}") from None
    recorded = info.get(CHECKSUMS, {}).get(file.name)
    if recorded is None and folder_kind(file.parent) is None:
        raise AaqError(f"{AAQ_CONFIG} records no checksum of {file} and its folder has no {MARKER}, so aaq cannot tell whether it changed; {remedy}")
    if recorded is not None and tensors_digest(tensors) != recorded:
        raise AaqError(f"{file} does not match the checksum in {AAQ_CONFIG}: it changed after aaq wrote it and is corrupt; {remedy}")
    return tensors


def _take_codes(tensors: dict[str, torch.Tensor], name: str, shape: torch.Size, spec: QuantSpec | None) -> WeightCodes | None:
    """The codes stored for module `name` (removed from `tensors`), or None when it is stored as a plain weight."""
    if f"{name}.qweight" not in tensors:
        return None
    if spec is None:
        raise AaqError(f"{name} is stored as integer codes but its config says it is not quantized; write the folder again")
    codes = WeightCodes.from_tensors(tensors, name, shape, spec)
    for suffix in SUFFIXES:
        tensors.pop(f"{name}.{suffix}", None)
    return codes


def _set_stored_weights(model: PreTrainedModel, tensors: dict[str, torch.Tensor], weight_spec: QuantSpec | None, int8_rows: list[str]) -> None:
    """Put the stored codes into the quantized linears and the int8 rows into their modules (consuming them from `tensors`)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            codes = _take_codes(tensors, name, module.weight.shape, weight_spec)
            if codes is not None:
                module.set_codes(codes)
        elif name in int8_rows:
            codes = _take_codes(tensors, name, module.weight.shape, INT8_ROWS)
            if codes is not None:
                module.weight.data = codes.dequantize(module.weight.dtype, module.weight.device)


def load_quantized(
    path: str | Path, scheme: QuantScheme | None = None, transforms: TransformConfig | None = None, placement: Placement | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Rebuild the fake-quantized model saved in `path`: model, tokenizer and its aaq config.

    `scheme` / `transforms` replace the saved activation/KV quantization and online rotations, to
    simulate the same weights under other settings (an export's); weights keep the saved codes.
    `placement` (default: the saved dtype on the default device) says where the model goes.
    """
    path = Path(path)
    info = read_aaq_config(path)
    saved_scheme = saved_run_scheme(info)
    placement = placement or Placement(device=default_device(), dtype=info["dtype"])
    placement.check_available()
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=placement.torch_dtype)
    plan = transform_plan(model)
    transforms = TransformConfig(**info["transforms"]) if transforms is None else transforms
    install_quantizers(model, plan, saved_scheme if scheme is None else scheme)
    install_online_rotations(model, plan, transforms, "reload")
    tensors = load_checked_tensors(path / WEIGHTS, info)
    _set_stored_weights(model, tensors, saved_scheme.weights, info["int8_rows"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    stored = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, QuantLinear) and m.codes is not None}
    stored |= {f"{name}.weight" for name in info["int8_rows"]}
    allowed_missing = stored | ({f"{plan.lm_head}.weight"} if ties_embeddings(model, plan) else set())
    if unexpected or set(missing) - allowed_missing:
        raise AaqError(
            f"the weights in {path} do not match its config (missing {sorted(set(missing) - allowed_missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); write the folder again (`aaq quantize` or `aaq export`)"
        )
    model.to(placement.rest_device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise AaqError(f"{path} holds no tokenizer; save the run with its tokenizer (save_quantized(result, tokenizer, ...))") from None
    return model, tokenizer, info


def load(path_or_name: str | Path, placement: Placement | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a quantized aaq folder, or any model `aaq.models.loading.load_model` accepts."""
    if is_run_folder(path_or_name):
        model, tokenizer, _ = load_quantized(path_or_name, placement=placement)
        return model, tokenizer
    return load_model(ModelSource(str(path_or_name)), placement)
