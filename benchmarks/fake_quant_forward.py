"""W4A4KV4 fake-quant forward time divided by the FP forward time on the same batch.

Target: ratio <= 1.5. Both models are timed alternately in one process on the same tokens, so
machine noise hits both; the median of several repeats is reported. Writes
benchmarks/results/fake_quant_forward.json.

    python benchmarks/fake_quant_forward.py [--model smollm2-135m-instruct] [--tokens 2x256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from aaq.api import QuantizeConfig, quantize
from aaq.methods import QuaRotConfig
from aaq.models.loading import load_model
from aaq.runs.records import provenance, write_json

RESULTS = Path(__file__).parent / "results" / "fake_quant_forward.json"


def _forward_seconds(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(tokens, use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    fp_model, _ = load_model(args.model)
    quant_model = copy.deepcopy(fp_model)
    # RTN weights: the weight values do not change the forward cost, and RTN needs no calibration.
    quantize(quant_model, QuantizeConfig(method=QuaRotConfig(weight_quantizer="rtn"), bits="w4a4kv4"))
    tokens = torch.randint(0, fp_model.config.vocab_size, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    _forward_seconds(fp_model, tokens), _forward_seconds(quant_model, tokens)  # warm-up
    fp_times, quant_times = [], []
    for _ in range(args.repeats):
        fp_times.append(_forward_seconds(fp_model, tokens))
        quant_times.append(_forward_seconds(quant_model, tokens))
    fp_median, quant_median = statistics.median(fp_times), statistics.median(quant_times)
    result = {
        "ratio": quant_median / fp_median,
        "target": 1.5,
        "fp_forward_s": fp_median,
        "w4a4kv4_forward_s": quant_median,
        "tokens": args.batch * args.seq_len,
        "fp_tokens_per_s": args.batch * args.seq_len / fp_median,
        "model": args.model,
        "repeats": args.repeats,
        **provenance(),
    }
    write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("ratio", "target", "fp_forward_s", "w4a4kv4_forward_s", "fp_tokens_per_s")}, indent=2))


if __name__ == "__main__":
    main()
