"""Exported sizes for every export format: the quantized linear weights and the whole folder, against fp16.

Targets: linear weights <= 0.28 of their fp16 bytes (int4 codes are 0.25; scales and zero points take
the rest); the whole folder <= 0.45 of the model's fp16 checkpoint (its parameters, a tied lm_head
counted once, at 2 bytes each). Exports a run folder (or, without --run, a QuaRot W4A4KV4 run with RTN
weights made here: the method does not change the sizes) as aaq (16-bit, and with int8 embeddings),
compressed-tensors W4A16 and compressed-tensors W4A4, and writes benchmarks/results/export_size.json.

    python benchmarks/export_size.py [--run runs/quarot] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from aaq.api import QuantizeConfig, quantize
from aaq.exporting import ExportConfig, export
from aaq.methods import QuaRotConfig
from aaq.models.loading import load_model
from aaq.runs.checkpoint import save_quantized
from aaq.runs.records import provenance, write_json

RESULTS = Path(__file__).parent / "results" / "export_size.json"
TARGET = 0.28
FOLDER_TARGET = 0.45
EXPORTS = {
    "aaq": ExportConfig(format="aaq"),
    "aaq int8 embeddings": ExportConfig(format="aaq", int8_embeddings=True),
    "compressed-tensors W4A16": ExportConfig(format="compressed-tensors", scheme="W4A16"),
    "compressed-tensors W4A4": ExportConfig(format="compressed-tensors", scheme="W4A4"),
}


def _make_run(model_name: str, folder: Path) -> Path:
    """A QuaRot W4A4KV4 run of `model_name` with RTN weights, saved in `folder`."""
    model, tokenizer = load_model(model_name)
    result = quantize(model, QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w4a4kv4"))
    return save_quantized(result, tokenizer, folder, source=model_name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="aaq run folder to export (default: make a QuaRot RTN run of --model)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    model, _ = load_model(args.model)
    fp16_checkpoint = 2 * sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    del model
    with tempfile.TemporaryDirectory(prefix="aaq-export-size-") as work:
        run = args.run or _make_run(args.model, Path(work) / "run")
        formats = {}
        for label, config in EXPORTS.items():
            report = export(run, Path(work) / label.replace(" ", "_"), config)
            formats[label] = {
                "linear_ratio": report.linear_ratio,
                "linear_bytes": report.linear_bytes,
                "linear_fp16_bytes": report.linear_fp16_bytes,
                "folder_bytes": report.folder_bytes,
                "folder_ratio": report.folder_bytes / fp16_checkpoint,
                "differences": report.differences,
            }
    result = {
        "ratio": max(entry["linear_ratio"] for entry in formats.values()),
        "target": TARGET,
        "fp16_checkpoint_bytes": fp16_checkpoint,
        "folder_target": FOLDER_TARGET,
        "formats": formats,
        "run": str(args.run) if args.run else f"quarot rtn w4a4kv4 of {args.model}",
        **provenance(),
    }
    write_json(args.out, result)
    print(json.dumps({label: {k: entry[k] for k in ("linear_ratio", "folder_bytes", "folder_ratio")} for label, entry in formats.items()}, indent=2))


if __name__ == "__main__":
    main()
