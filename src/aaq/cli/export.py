"""Export a quantized run for shipping: packed int4 (aaq) or compressed-tensors for transformers/vLLM (`aaq export`).

--format aaq packs two int4 codes per byte with their scales (bit-exact: `aaq eval --model OUT` rebuilds the run). --format
compressed-tensors: --scheme W4A16 (loads in plain transformers) or W4A4 (dynamic int4 per-token activations, R4 online; for vLLM).
What a format cannot express is listed in OUT/aaq_export.json and printed; --strict refuses such exports instead.
"""

import argparse
import dataclasses
from pathlib import Path

from aaq.errors import AaqError
from aaq.exporting import EXPORT_DTYPES, FORMATS, SCHEMES, ExportConfig, export

NAME = "export"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The export command's flags."""
    p.add_argument("run", type=Path, help="aaq run folder (from `aaq quantize`) or packed aaq export")
    p.add_argument("--format", choices=FORMATS, default="aaq", help="output format")
    p.add_argument("--scheme", choices=SCHEMES, help="compressed-tensors preset (default: W4A16)")
    p.add_argument("--strict", action="store_true", help="refuse an export that would compute differently from the run")
    p.add_argument("--dtype", choices=EXPORT_DTYPES, help="dtype of everything but the integer codes (default: the run's if 16-bit, else float16)")
    p.add_argument("--int8-embeddings", action="store_true", help="store embeddings and lm_head as int8 rows (aaq format)")
    p.add_argument("--device", default="cpu", help="device the run is loaded on while exporting")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (removes only files aaq wrote there, unchanged; anything else is an error)")


def run(args: argparse.Namespace) -> int:
    """Export and print what the export differs in and how large it is."""
    if args.scheme is not None and args.format == "aaq":
        raise AaqError("--scheme applies to --format compressed-tensors; the aaq format keeps the run's own scheme")
    config = ExportConfig(format=args.format, strict=args.strict, dtype=args.dtype, int8_embeddings=args.int8_embeddings, device=args.device)
    report = export(args.run, args.out, config if args.scheme is None else dataclasses.replace(config, scheme=args.scheme), overwrite=args.overwrite)
    print("\n".join([f"differs: {d}" for d in report.differences] + [f"note: {n}" for n in report.notes] + [report.summary()]))
    return 0
