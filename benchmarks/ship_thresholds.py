"""Compute the garbled-check thresholds aaq ships and write src/aaq/resources/coherence_thresholds.json.

One threshold per (scorer, answer length): the scorers of the demo's models — `smollm2-135m-safe`
(the demo's scorer), `smollm2-135m-safe-unanchored` and `smollm2-135m-instruct` (the scorer of runs
quantized from it) — each loaded as `aaq` loads it by default (float32 on the CPU), at the answer
lengths of the demo (48), `aaq eval` (64) and the safety study (32). Each is computed from scratch
(`CoherenceScorer.calibrate`: no cache read), with the evaluation's generation batch. A scorer whose
fingerprint or settings differ in anything computes its own threshold at run time instead. `--scorers` / `--answer-lengths` compute a subset; entries
of the existing file under the current calibration version are kept beside them.

    OMP_NUM_THREADS=1 python benchmarks/ship_thresholds.py [--scorers A,B] [--answer-lengths 32,48] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import resources
from pathlib import Path

from aaq.eval.coherence import CALIBRATION_VERSION, SHIPPED_THRESHOLDS, CoherenceConfig, CoherenceScorer, write_shipped_thresholds
from aaq.eval.generate import GenerationConfig
from aaq.eval.suite import EvalConfig
from aaq.models.loading import load_model

SCORERS = ("smollm2-135m-safe", "smollm2-135m-safe-unanchored", "smollm2-135m-instruct")
ANSWER_LENGTHS = (32, 48, 64)
log = logging.getLogger("ship_thresholds")


def _kept_thresholds(path: Path) -> dict[str, dict]:
    """The entries of an existing shipped-thresholds file of the current calibration version (none otherwise)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["thresholds"] if data.get("calibration_version") == CALIBRATION_VERSION else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(str(resources.files("aaq") / "resources" / SHIPPED_THRESHOLDS)))
    parser.add_argument("--scorers", type=lambda text: text.split(","), default=list(SCORERS))
    parser.add_argument("--answer-lengths", type=lambda text: [int(n) for n in text.split(",")], default=list(ANSWER_LENGTHS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    config, batch = CoherenceConfig(), EvalConfig().batch_size
    calibrations = []
    for name in args.scorers:
        model, tokenizer = load_model(name)
        scorer = CoherenceScorer(model, tokenizer, name, config)
        for tokens in args.answer_lengths:
            calibration = scorer.calibrate(GenerationConfig(tokens, batch))
            log.info("%s at %d tokens: threshold %.3f (%.0f s)", name, tokens, calibration.threshold, calibration.seconds)
            calibrations.append(calibration)
    write_shipped_thresholds(args.out, calibrations, config, kept=_kept_thresholds(args.out))


if __name__ == "__main__":
    main()
