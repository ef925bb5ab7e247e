"""Saving a quantized model to a folder and loading it back as the same fake-quantized model.

A quantized folder holds `aaq_config.json` (written last: its presence means the folder is
complete), `aaq_folder.json` with every file's checksum (`aaq.folders`; the weights are checked
when read), the transformers `config.json` of the transformed architecture, the weights in
`aaq_model.safetensors` (named so that plain `from_pretrained` does not load them without the
online transforms they need), the fused rotations in `transforms.safetensors`, and the tokenizer.
`aaq export --format aaq` writes the same folder with the weights packed as int4 codes
(`aaq_packed.safetensors`, format `aaq-packed`, see `aaq.packing`); `load_quantized` reads both.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from aaq.api import QuantizeConfig, QuantizeResult
from aaq.errors import AaqError
from aaq.fake_quant import install_quantizers, quantized_linears
from aaq.folders import folder_kind, prepare_output_folder, verify_file
from aaq.loading import ModelSource, load_model
from aaq.models import transform_plan
from aaq.online import install_online_rotations
from aaq.packing import PACKED_FORMAT, PACKED_WEIGHTS, unpack_state
from aaq.plan import TransformConfig
from aaq.quantizers import QuantScheme
from aaq.rotation import ties_embeddings
from aaq.runs import provenance, write_atomic, write_json, write_staged

AAQ_CONFIG = "aaq_config.json"
# What a run that stopped on an error leaves in its folder: the error and the stage it happened in.
FAILED_RECORD = "failed.json"
WEIGHTS = "aaq_model.safetensors"
TRANSFORMS = "transforms.safetensors"
FORMAT = "aaq-fakequant"
# 2: `transforms` (the applied TransformConfig) replaced `online_transforms`; scales live in TRANSFORMS.
FORMAT_VERSION = 2
_READABLE_FORMATS = (FORMAT, PACKED_FORMAT)


def is_quantized_folder(path: str | Path) -> bool:
    """True when `path` is a folder written by `save_quantized`."""
    return (Path(path) / AAQ_CONFIG).is_file()


def is_run_folder(path: str | Path) -> bool:
    """True for a quantized folder, finished or not (a killed or failed run, a deleted `aaq_config.json`)."""
    path = Path(path)
    return is_quantized_folder(path) or (path / WEIGHTS).is_file() or folder_kind(path) == "run"


def model_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors a quantized folder stores: the state dict without a tied lm_head."""
    plan = transform_plan(model)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if ties_embeddings(model, plan):
        state.pop(f"{plan.lm_head}.weight", None)
    return state


def save_quantized(
    result: QuantizeResult,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    source: str | None = None,
) -> Path:
    """Write the quantized model of `result` to `out_dir`; returns the folder."""
    out = Path(out_dir)
    prepare_output_folder(out, "run")
    (out / AAQ_CONFIG).unlink(missing_ok=True)
    model = result.model
    write_staged(out, model.config.save_pretrained)
    write_atomic(out / WEIGHTS, lambda tmp: save_file(model_state(model), str(tmp), metadata={"format": FORMAT}))
    if result.transforms.tensors():
        write_atomic(out / TRANSFORMS, lambda tmp: save_file(result.transforms.tensors(), str(tmp)))
    else:
        (out / TRANSFORMS).unlink(missing_ok=True)
    if tokenizer is not None:
        write_staged(out, tokenizer.save_pretrained)
    write_json(
        out / AAQ_CONFIG,
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source_model": source,
            "quantize": result.config.to_dict(),
            "transforms": asdict(result.transforms.config),
            **provenance(),
        },
    )
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
    if data.get("format") not in _READABLE_FORMATS or data.get("format_version") != FORMAT_VERSION:
        raise AaqError(
            f"{file} has format {data.get('format')} v{data.get('format_version')}, this aaq reads "
            f"{' and '.join(_READABLE_FORMATS)} v{FORMAT_VERSION}; re-run `aaq quantize` (or `aaq export`)"
        )
    missing = [key for key in ("quantize", "transforms") if key not in data]
    if missing:
        raise AaqError(f"{file} lacks {', '.join(missing)}; the folder is corrupt, re-run `aaq quantize`")
    return data


def _failure(path: Path) -> str:
    """How the run in `path` failed, from its `failed.json` (empty when it has none)."""
    try:
        failed = json.loads((path / FAILED_RECORD).read_text())
        return f" (it failed in stage {failed['stage']}: {failed['error']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _load_weights(file: Path, remedy: str = "re-run `aaq quantize`") -> dict[str, torch.Tensor]:
    try:
        verify_file(file, remedy)
        return load_file(str(file))
    except FileNotFoundError:
        raise AaqError(f"{file} is missing; the folder is incomplete, {remedy}") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise AaqError(f"{file} is corrupt or truncated ({err}); {remedy}") from None


def _read_state(path: Path, info: dict[str, Any], model: PreTrainedModel, config: QuantizeConfig) -> dict[str, torch.Tensor]:
    """The state dict stored in a quantized folder, unpacking int4 codes for the packed format."""
    if info["format"] != PACKED_FORMAT:
        return _load_weights(path / WEIGHTS)
    spec = config.resolved_scheme().weights
    if spec is None:
        raise AaqError(f"{path / AAQ_CONFIG} says the weights are not quantized, but the folder holds packed codes; re-run `aaq export`")
    tensors = _load_weights(path / PACKED_WEIGHTS, remedy="re-run `aaq export`")
    return unpack_state(tensors, quantized_linears(model), spec)


def load_quantized(
    path: str | Path, scheme: QuantScheme | None = None, transforms: TransformConfig | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Rebuild the fake-quantized model saved in `path`: model, tokenizer and its aaq config.

    `scheme` / `transforms` replace the saved activation/KV quantization and online rotations, to
    simulate the same weights under other settings (an export's); weights keep the saved spec.
    """
    path = Path(path)
    info = read_aaq_config(path)
    config = QuantizeConfig.from_dict(info["quantize"])
    hf_config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    plan = transform_plan(model)
    transforms = TransformConfig(**info["transforms"]) if transforms is None else transforms
    install_quantizers(model, plan, config.resolved_scheme() if scheme is None else scheme)
    install_online_rotations(model, plan, r3=transforms.r3, r4=transforms.r4)
    state = _read_state(path, info, model, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {f"{plan.lm_head}.weight"} if ties_embeddings(model, plan) else set()
    if unexpected or set(missing) - allowed_missing:
        raise AaqError(
            f"the weights in {path} do not match its config (missing {sorted(set(missing) - allowed_missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); re-run `aaq {'export' if info['format'] == PACKED_FORMAT else 'quantize'}`"
        )
    model.eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        raise AaqError(f"{path} holds no tokenizer; save the run with its tokenizer (save_quantized(result, tokenizer, ...))") from None
    return model, tokenizer, info


def load(path_or_name: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a quantized aaq folder, or any model `aaq.loading.load_model` accepts."""
    if is_run_folder(path_or_name):
        model, tokenizer, _ = load_quantized(path_or_name)
        return model, tokenizer
    return load_model(ModelSource(str(path_or_name)))
