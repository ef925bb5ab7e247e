"""Export a quantized run folder for shipping: packed int4 aaq folders and compressed-tensors folders.

- `aaq`: the run's weights as int4 codes two per byte with their scales (and zero points), the
  fused transforms and the quantization config; `aaq.load` / `aaq eval --model` rebuild the same
  fake-quantized model.
- `compressed-tensors`: W4A16 (R1/R2/smoothing fused, packed int4 weights; loads in plain
  `transformers`) or W4A4 (int4 weights, dynamic int4 per-token activations, R4 as an online
  Hadamard transform in `transform_config`, the way vLLM applies it; R3 is not written, see
  `aaq.exporting.compressed`). What the format cannot express is listed in the report, or refused
  with `strict`.

(The package is `exporting`, not `export`, so that `aaq.export(...)` stays a function.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase

from aaq.errors import AaqError
from aaq.models import transform_plan
from aaq.quant.fake_quant import quantized_linears
from aaq.quant.packing import SUFFIXES
from aaq.quant.quantizers import QuantScheme
from aaq.runs.checkpoint import (
    EXPORT_BLOCKER,
    TRANSFORMS,
    WEIGHTS,
    load_checked_tensors,
    load_quantized,
    read_aaq_config,
    saved_export_blocker,
    saved_run_scheme,
    write_marker,
    write_model_files,
    write_tensors,
)
from aaq.runs.folders import check_free_space, check_output_folder, folder_bytes, prepare_output_folder
from aaq.runs.records import provenance, write_json
from aaq.runtime.devices import DTYPES, Placement

logger = logging.getLogger(__name__)

FORMATS = ("aaq", "compressed-tensors")
HALF_DTYPES = ("float16", "bfloat16")
EXPORT_DTYPES = (*HALF_DTYPES, "float32")
SCHEMES = ("W4A16", "W4A4")
EXPORT_REPORT = "aaq_export.json"
EXPORTED_FROM = "exported_from"
# The transformers weights file of a compressed-tensors export.
HF_WEIGHTS = "model.safetensors"
# Files of a run folder an aaq export carries over unchanged (the fused transforms, for the record).
_CARRIED_FILES = (TRANSFORMS,)
# Bytes per value of the safetensors dtypes a quantized folder stores its codes, scales and zero points in.
_SAFETENSORS_ITEMSIZE = {"U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


@dataclass(frozen=True)
class ExportConfig:
    """Which format to write and how.

    `scheme` picks the compressed-tensors preset; `strict` refuses lossy exports. `dtype`: the dtype
    of everything that is not integer codes (embeddings, lm_head, norms, biases, R4 matrices); None:
    the run's dtype when it is 16-bit, else float16 (float32 keeps a float32 run bit for bit).
    `int8_embeddings`: store the embeddings and the lm_head as int8 rows with a scale each (aaq
    format only). `device`: where the run is loaded while it is exported.
    """

    format: Literal["aaq", "compressed-tensors"] = "aaq"
    scheme: Literal["W4A16", "W4A4"] = "W4A16"
    strict: bool = False
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    int8_embeddings: bool = False
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise AaqError(f"unknown export format {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.scheme not in SCHEMES:
            raise AaqError(f"unknown compressed-tensors scheme {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.dtype not in (None, *EXPORT_DTYPES):
            raise AaqError(f"unknown export dtype {self.dtype!r}; use one of {', '.join(EXPORT_DTYPES)}", setting="dtype")
        if self.int8_embeddings and self.format != "aaq":
            raise AaqError("int8 embeddings are stored only by the aaq format; compressed-tensors exports keep them 16-bit", setting="int8_embeddings")

    def tensor_dtype(self, info: dict[str, Any]) -> str:
        """The dtype of the exported non-code tensors for a run saved with `info` (its aaq_config.json)."""
        if self.dtype is not None:
            return self.dtype
        return info["dtype"] if info["dtype"] in HALF_DTYPES else "float16"


@dataclass
class ExportReport:
    """What an export wrote and how it differs from the run it came from.

    `differences`: where the exported model computes something other than aaq's simulation of the
    run under the exported scheme (empty for a faithful export). `notes`: facts a user should know
    that change nothing. `linear_bytes` / `linear_fp16_bytes`: stored bytes of the quantized linear
    weights (codes, scales, zero points) and the bytes the same weights take in fp16.
    """

    out_dir: Path
    format: str
    scheme: str | None
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    linear_bytes: int = 0
    linear_fp16_bytes: int = 0
    folder_bytes: int = 0

    @property
    def linear_ratio(self) -> float:
        """Exported linear weight bytes over their fp16 bytes."""
        return self.linear_bytes / self.linear_fp16_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {**asdict(self), "out_dir": str(self.out_dir), "linear_ratio": self.linear_ratio}

    def summary(self) -> str:
        """One line: the format and where it went, the linear weights' size against fp16 and the folder's size."""
        scheme = f" {self.scheme}" if self.scheme and self.format != "aaq" else ""
        return (f"exported as {self.format}{scheme} to {self.out_dir}: linear weights {self.linear_bytes / 1e6:.1f} MB "
                f"({self.linear_ratio:.3f} of fp16), folder {self.folder_bytes / 1e6:.1f} MB")  # fmt: skip


def linear_bytes(tensors: dict[str, torch.Tensor], linears: dict[str, torch.Size]) -> tuple[int, int]:
    """Stored bytes of the quantized linears' weight tensors in `tensors` (biases excluded), and their fp16 bytes."""
    stored = sum(t.numel() * t.element_size() for key, t in tensors.items() if _weight_part_of(key, linears))
    fp16 = sum(2 * shape.numel() for shape in linears.values())
    return stored, fp16


def _weight_part_of(key: str, linears: dict[str, torch.Size]) -> bool:
    prefix, _, suffix = key.rpartition(".")
    return prefix in linears and suffix != "bias"


def check_export_folder(out: Path, overwrite: bool) -> None:
    """Raise AaqError unless `out` can take an export: new, empty, an unfinished export, or with `overwrite` a finished one; changes nothing.

    The rules of `aaq quantize`'s run folders (`aaq.runs.folders`): never a folder with foreign files,
    and an earlier export (of either format) is replaced only when asked.
    """
    check_output_folder(out, "export", overwrite=overwrite)
    if (out / EXPORT_REPORT).exists() and not overwrite:
        raise AaqError(f"{out} already holds an aaq export; choose another folder or replace it ({{setting}})", setting="overwrite")


def start_folder(out: Path, overwrite: bool) -> None:
    """Make `out` an empty aaq export folder after `check_export_folder`: remove every file an earlier export wrote there.

    Each of them is removed only while unchanged (`aaq.runs.folders.removable`), so a re-export in
    the other format (or from another run) holds no stale weights or transforms of the first, and a
    crash mid-export leaves no folder that looks complete.
    """
    check_export_folder(out, overwrite)
    removed = prepare_output_folder(out, "export", overwrite=True)
    if removed:
        logger.info("replacing the aaq output in %s: removed %s", out, ", ".join(removed))


def check_strict(report: ExportReport, strict: bool) -> None:
    """Raise when `strict` and the export would differ from the run."""
    if strict and report.differences:
        raise AaqError(f"the export would differ from the run: {'; '.join(report.differences)}; export anyway without {{setting}}", setting="strict")


# A writer fills the folder and returns its report and the function that writes the completion marker.
Written = tuple[ExportReport, Callable[[], None]]


def exported_bytes(run_dir: Path, info: dict[str, Any], config: ExportConfig) -> int:
    """An estimate of the size of an export, from the shapes in the run's weight file (its header only).

    Integer codes, scales and zero points keep their size; every other tensor takes the export's
    dtype (the embeddings and lm_head int8 rows with `int8_embeddings`); a W4A4 export with R4 adds
    one R4 matrix per layer; the run's other files (tokenizer, config, transforms) are copied at most.
    """
    remedy = "write the folder again (`aaq quantize`)"
    try:
        text = AutoConfig.from_pretrained(run_dir).get_text_config()
    except (OSError, ValueError) as err:
        raise AaqError(f"{run_dir / 'config.json'} cannot be read ({str(err).strip().splitlines()[0]}); {remedy}") from None
    size = DTYPES[config.tensor_dtype(info)].itemsize
    total = sum(entry.stat().st_size for entry in run_dir.iterdir() if entry.is_file() and entry.name != WEIGHTS)
    try:
        with safe_open(str(run_dir / WEIGHTS), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                part = handle.get_slice(name)
                shape, numel = part.get_shape(), math.prod(part.get_shape())
                if name.rpartition(".")[2] in SUFFIXES:
                    total += numel * _SAFETENSORS_ITEMSIZE.get(part.get_dtype(), 4)
                elif config.int8_embeddings and len(shape) == 2 and shape[0] == text.vocab_size:
                    total += numel + 4 * shape[0]
                else:
                    total += numel * size
    except (SafetensorError, OSError) as err:
        raise AaqError(f"{run_dir / WEIGHTS} is corrupt or truncated ({str(err).strip().splitlines()[0]}); {remedy}") from None
    if config.format == "compressed-tensors" and config.scheme == "W4A4" and info["transforms"].get("r4"):
        total += text.num_hidden_layers * text.intermediate_size**2 * size
    return total


def run_scheme(info: dict[str, Any], run_dir: Path) -> QuantScheme:
    """The quantization scheme of a loaded run, or AaqError when its weights are not quantized."""
    scheme = saved_run_scheme(info)
    if scheme.weights is None:
        raise AaqError(f"{run_dir} keeps its weights in full precision; there is nothing to export, quantize with 4-bit weights (bits w4...) first")
    return scheme


def load_for_export(run_dir: Path, config: ExportConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """The run's fake-quantized model on the export's device in its tensor dtype, its tokenizer and aaq config."""
    info = read_aaq_config(run_dir)
    model, tokenizer, info = load_quantized(run_dir, placement=Placement(device=config.device, dtype=config.tensor_dtype(info)))
    run_scheme(info, run_dir)
    return model, tokenizer, info


def _export_packed(run_dir: Path, out: Path, config: ExportConfig, overwrite: bool) -> Written:
    """Write the run as an aaq folder: integer codes, 16-bit (or int8) other tensors, the transforms (marker: aaq_config.json)."""
    model, tokenizer, info = load_for_export(run_dir, config)
    plan = transform_plan(model)
    int8_rows = (plan.embeddings, plan.lm_head) if config.int8_embeddings else ()
    carried = {name: load_checked_tensors(run_dir / name, info) for name in _CARRIED_FILES if (run_dir / name).is_file()}
    start_folder(out, overwrite)
    checksums: dict[str, str] = {}
    tensors = write_model_files(model, tokenizer, out, checksums, int8_rows)
    for name, stored in carried.items():
        write_tensors(out / name, stored, checksums)
    stored, fp16 = linear_bytes(tensors, quantized_linears(model))
    report = ExportReport(out_dir=out, format=config.format, scheme=None, linear_bytes=stored, linear_fp16_bytes=fp16)
    record = {key: info.get(key) for key in ("source_model", "quantize", "transforms", EXPORT_BLOCKER)} | {EXPORTED_FROM: str(run_dir), **provenance()}
    return report, lambda: write_marker(out, model, record, checksums, int8_rows)


def export(run_dir: str | Path, out_dir: str | Path, config: ExportConfig | None = None, overwrite: bool = False) -> ExportReport:
    """Export the quantized run (or packed export) in `run_dir` to `out_dir` in `config.format`; returns the report.

    The report (differences, notes, sizes) is also written to `out_dir/aaq_export.json`. `out_dir`
    must be new, empty, an unfinished aaq export, or with `overwrite` a finished one (replaced, its
    files removed only while unchanged); everything that can be checked (the run's exportability, the
    folder, the free disk space) is checked before the run is loaded, and the run's weights against
    their checksums when they are read.
    """
    config = config or ExportConfig()
    run_dir, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run_dir.resolve():
        raise AaqError(f"export would overwrite its source {run_dir}; export to another folder ({{setting}})", setting="out")
    info = read_aaq_config(run_dir)
    run_scheme(info, run_dir)
    blocker = saved_export_blocker(info)
    if blocker is not None:
        raise blocker
    Placement(device=config.device).check_available()
    check_export_folder(out, overwrite)
    check_free_space(out, {"export": exported_bytes(run_dir, info, config)}, already=folder_bytes(out))
    if config.format == "aaq":
        report, write_marker = _export_packed(run_dir, out, config, overwrite)
    else:
        from aaq.exporting.compressed import export_compressed

        report, write_marker = export_compressed(run_dir, out, config, overwrite)
    report.folder_bytes = folder_bytes(out)
    write_json(out / EXPORT_REPORT, {**report.to_dict(), "source": str(run_dir), "config": asdict(config)})
    write_marker()
    return report
