"""The models an audit compares: what kind of quantized checkpoint a path is, and loading it for evaluation on the CPU.

Kinds (`SourceInfo.kind`), told apart before any weight is read (`describe_source`):

- `gguf`: a `.gguf` file (or a folder holding exactly one), dequantized by transformers with the `gguf` library;
  the report names the file type (`general.file_type`) and counts the block type of every tensor.
- `aaq`: an aaq run folder or packed aaq export, rebuilt as aaq's fake-quantized model (`aaq.runs.checkpoint`).
- `compressed-tensors`: a folder whose `config.json` has a compressed-tensors `quantization_config` (aaq's own
  compressed-tensors exports included). Weight-only folders load through transformers; folders that quantize
  activations or carry online transforms (aaq's W4A4 exports, vLLM's formats) are simulated by compressed-tensors'
  own quantization and transform code, as vLLM would compute them.
- `transformers`: a folder with any other `quantization_config` transformers knows (bitsandbytes, GPTQ, AWQ,
  FP8, HQQ, quanto, torchao, ...), loaded by transformers; a method whose package is missing or that needs a GPU
  is a one-line error saying what to install. An unknown method is refused (transformers would silently load the
  packed weights as garbage).
- `full-precision`: any other model folder, hub id or alias (`aaq.models.loading`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from aaq.errors import AaqError
from aaq.models.loading import ModelSource, load_model
from aaq.runs.checkpoint import is_run_folder, load_quantized
from aaq.runs.folders import folder_kind
from aaq.runtime.devices import Placement

GGUF, AAQ, COMPRESSED, TRANSFORMERS, FULL_PRECISION = "gguf", "aaq", "compressed-tensors", "transformers", "full-precision"
CONVERT_HINT = "or convert the model to GGUF or compressed-tensors"


@dataclass(frozen=True)
class SourceInfo:
    """What an audited model is, read before its weights: its path or name, kind, format (for the report) and details."""

    source: str
    kind: str
    format: str
    details: dict[str, Any] = field(default_factory=dict)


def _gguf_file(path: Path) -> Path | None:
    """The GGUF file a path names: itself, or the single `.gguf` of a folder without config.json."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def _describe_gguf(source: str, file: Path) -> SourceInfo:
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(file)
    except (ValueError, OSError) as error:
        raise AaqError(f"{file} is not a readable GGUF file ({error}); pass a complete .gguf file") from None
    blocks = Counter(tensor.tensor_type.name for tensor in reader.tensors)
    field_ = reader.fields.get("general.file_type")
    file_type = LlamaFileType(int(field_.contents())).name.removeprefix("MOSTLY_") if field_ is not None else blocks.most_common(1)[0][0]
    architecture = reader.fields["general.architecture"].contents() if "general.architecture" in reader.fields else "?"
    details = {"file": str(file), "file_type": file_type, "tensor_types": dict(blocks.most_common()), "architecture": architecture}
    return SourceInfo(source, GGUF, f"GGUF {file_type}", details)


def _quantization_config(path: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a model folder's config.json (None when it has none)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise AaqError(f"{path / 'config.json'} is not valid JSON ({error}); repair it or pass another model folder") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    return quantization if isinstance(quantization, dict) else None


def _compressed_scheme(quantization: dict[str, Any]) -> tuple[str, bool]:
    """A short name of a compressed-tensors scheme (W4A16, W4A4, W8A8-fp8, ...) and whether it needs compressed-tensors' simulation.

    Simulation: activations are quantized or transforms run online, which transformers' loader does not compute.
    """
    groups = list((quantization.get("config_groups") or {}).values())
    names, simulate = [], bool(quantization.get("transform_config"))
    for group in groups:
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        simulate |= inputs is not None
        kind = "" if weights.get("type", "int") == "int" else f"-{weights['type']}"
        names.append(f"W{weights.get('num_bits', 16)}A{(inputs or {}).get('num_bits', 16)}{kind}")
    return "+".join(sorted(set(names))) or "?", simulate


def _describe_folder(source: str, path: Path) -> SourceInfo:
    quantization = _quantization_config(path)
    if quantization is None:
        return SourceInfo(source, FULL_PRECISION, "full precision")
    method = str(quantization.get("quant_method", "?"))
    if method == COMPRESSED:
        scheme, simulate = _compressed_scheme(quantization)
        transforms = sorted((quantization.get("transform_config") or {}).get("config_groups", {}))
        details = {"scheme": scheme, "format": quantization.get("format"), "transforms": transforms, "simulated": simulate}
        return SourceInfo(source, COMPRESSED, f"compressed-tensors {scheme} ({quantization.get('format')})", details)
    from transformers.quantizers.auto import AutoQuantizationConfig

    try:  # transformers' own reading of the config (it names bitsandbytes configs by their load_in_4bit/8bit flags)
        AutoQuantizationConfig.from_dict(dict(quantization))
    except ImportError:
        pass  # a known method whose package is missing: loading says which one
    except ValueError as error:
        known = "Unknown quantization type" not in str(error)
        raise AaqError(
            f"{path} is quantized with {method!r}, which transformers {transformers.__version__} cannot load "
            + (f"({_reason(error)}); repair its quantization_config, {CONVERT_HINT}" if known else f"(it would load the packed weights as garbage); {CONVERT_HINT}")
        ) from None
    bits = quantization.get("bits") or quantization.get("weight_bits") or (4 if quantization.get("load_in_4bit") else 8 if quantization.get("load_in_8bit") else None)
    return SourceInfo(source, TRANSFORMERS, f"{method}" + (f" {bits}-bit" if bits else ""), {"quant_method": method, "quantization_config": quantization})


def describe_source(source: str) -> SourceInfo:
    """What `source` (a path, hub id or alias) holds, from its metadata alone; AaqError for a path that does not exist."""
    path = Path(source).expanduser()
    gguf_file = _gguf_file(path)
    if gguf_file is not None:
        return _describe_gguf(source, gguf_file)
    if path.is_dir() and is_run_folder(path):
        kind = folder_kind(path) or "run"
        try:
            info = json.loads((path / "aaq_config.json").read_text())
            name = f"{info['quantize']['method']['name']} {info['quantize']['bits']}"
        except (OSError, ValueError, KeyError, TypeError):
            name = "(unfinished)"
        return SourceInfo(source, AAQ, f"aaq {kind} {name}", {"folder_kind": kind})
    if path.is_dir() and (path / "config.json").is_file():
        return _describe_folder(source, path)
    if path.exists():
        raise AaqError(f"{source} is neither a .gguf file nor a model folder (config.json, or exactly one .gguf); pass one of those, an aaq run or export folder, a hub id or an alias")
    return SourceInfo(source, FULL_PRECISION, "full precision")


def _reason(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def simulated_compressed_model(folder: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of a compressed-tensors folder computed by compressed-tensors itself: its online transforms, its
    weight codes decompressed, and its activation quantization simulated in every forward pass."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file
    from transformers.utils.quantization_config import CompressedTensorsConfig

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    compressor = ModelCompressor.from_compression_config(CompressedTensorsConfig.from_dict(config.quantization_config))
    transforms = config.quantization_config.get("transform_config")
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    if transforms:
        apply_transform_config(model, TransformConfig.model_validate(transforms))
    apply_quantization_config(model, compressor.quantization_config)
    compressor.compress_model(model)
    state = {name: tensor for file in sorted(folder.glob("*.safetensors")) for name, tensor in load_file(str(file)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # R3-style transforms (Sylvester Hadamards) are built by every loader and not stored; a tied lm_head is not stored either.
    missing = [name for name in missing if ".R3_" not in name and not (name == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AaqError(f"the weights in {folder} do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]}); pass a complete folder")
    compressor.decompress_model(model)
    return model.eval()


def _load_with_transformers(folder: Path, info: SourceInfo, dtype: torch.dtype) -> PreTrainedModel:
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except ImportError as error:
        raise AaqError(f"loading {folder} ({info.format}) needs a package that is not installed: {_reason(error)}; install it, {CONVERT_HINT}") from None
    except (RuntimeError, ValueError, OSError, NotImplementedError) as error:
        raise AaqError(f"transformers cannot load {folder} ({info.format}) here: {_reason(error)}; {CONVERT_HINT}") from None
    missing = [name for name in loading.get("missing_keys", []) if not (name.endswith("lm_head.weight") and model.config.tie_word_embeddings)]
    if missing or loading.get("mismatched_keys"):
        raise AaqError(f"transformers loaded {folder} ({info.format}) with weights missing or misshapen ({(missing or loading['mismatched_keys'])[:3]}); {CONVERT_HINT}")
    return model.eval()


def _folder_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise AaqError(f"{folder} holds no tokenizer transformers can read ({_reason(error)}); copy the original's tokenizer files into it") from None


def load_source(info: SourceInfo, placement: Placement | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model `info` describes, ready to evaluate on the placement's device, and its tokenizer."""
    placement = placement or Placement()
    path = Path(info.source).expanduser()
    if info.kind == AAQ:
        model, tokenizer, _ = load_quantized(path)
        return model, tokenizer
    if info.kind in (COMPRESSED, TRANSFORMERS):
        if info.details.get("simulated"):
            try:
                model = simulated_compressed_model(path, placement.torch_dtype)
            except (ValueError, KeyError, NotImplementedError) as error:
                raise AaqError(f"compressed-tensors cannot simulate {path} ({info.format}): {_reason(error)}; {CONVERT_HINT}") from None
        else:
            model = _load_with_transformers(path, info, placement.torch_dtype)
        return model.to(placement.rest_device), _folder_tokenizer(path)
    try:
        return load_model(ModelSource(str(info.source)), placement)
    except (ValueError, KeyError, NotImplementedError, ImportError) as error:  # transformers' GGUF reader raises these for types and architectures it lacks
        raise AaqError(f"transformers cannot dequantize {info.source} ({info.format}): {_reason(error)}; convert it to another GGUF type or to compressed-tensors") from None


def check_same_vocabulary(original: PreTrainedTokenizerBase, tokenizer: PreTrainedTokenizerBase, source: str) -> None:
    """Raise AaqError unless `tokenizer` maps every token to the id the original's tokenizer does."""
    ours, theirs = original.get_vocab(), tokenizer.get_vocab()
    if ours == theirs:
        return
    differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
    raise AaqError(
        f"the tokenizer of {source} differs from the original's ({len(ours)} vs {len(theirs)} tokens, {len(differ)} token-id pairs differ, "
        f"e.g. {differ[:2]}); audit a model quantized from this original, or pass the original it was made from"
    )
