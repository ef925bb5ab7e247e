"""Generation throughput of aaq's evaluation path against plain `transformers` `generate` at batch 8.

Prompts: the ones the evaluation answers (HarmBench val `standard` + the shipped benign evaluation
prompts, 200), chat-formatted, greedy, `--max-new-tokens` each. Models: the demo's aligned model
(FP) and its QuaRot W4A4KV4 quantization (Hadamard R1-R4 + GPTQ, default calibration, seed 0).
Variants, each timed on the same prompts:

- `transformers_b8`: `model.generate(do_sample=False)` on consecutive batches of 8 left-padded
  prompts, the evaluation path before issue 24 (the baseline, on the FP model and, for reference,
  on the quantized one);
- `aaq_b<size>`: `aaq.eval.generate.greedy_token_ids` at each `--batch-size` (length-sorted
  batches, rows that stop leave the batch, the KV cache transformed on write, the shared system
  prompt computed once), what `aaq eval` runs;
- `transformers_b1`: `model.generate` one prompt at a time: the reference answers. For the quantized
  model it runs about 6x slower than on the FP one (transformers' cache stores raw keys and values, so
  every step re-rotates and re-quantizes the whole cache), so
  `--quantized-reference aaq` takes `aaq_b1` (aaq's decoder, one prompt at a time) as its reference
  instead.

New tokens = answer tokens up to and including the first stop token, counted on each variant's own
answers. Speeds are new tokens per CPU-second of this process (one torch thread: its CPU time is
what an idle core's wall time would be; the time the scheduler gives to other processes on a
shared machine is left out), with wall-clock seconds beside them. To spread a drifting machine load over all variants alike, the prompts are cut into chunks
(the harmful set, then the benign set in `--benign-chunks` parts; each is one `generate` call of
the evaluation) and every chunk runs all variants, in reversed order on every second chunk. Answers are compared with the batch-1 reference of the same model: how many differ, at which
answer token, and the reference's top-1 minus top-2 logit there (a near-tie when tiny). The weight
bound: a decoding step reads every weight once, so tokens/s <= (new tokens per step) x read
bandwidth / weight bytes, with the bandwidth measured here (one thread, a streaming sum).
Writes benchmarks/results/generation_speed.json.

    OMP_NUM_THREADS=1 python benchmarks/generation_speed.py [--model smollm2-135m-safe] [--max-new-tokens 48]
        [--batch-size 64[,128...]] [--benign-chunks 1] [--max-prompts N] [--weights gptq|rtn] [--no-reference]
        [--quantized-reference transformers|aaq]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from aaq.api import QuantizeConfig, quantize
from aaq.eval.generate import chat_texts, greedy_token_ids, left_padding, length_sorted_batches, prompt_token_ids, stop_token_ids
from aaq.eval.prompts import benign_records, evenly_spaced, harmful_records
from aaq.methods import QuaRotConfig
from aaq.models.loading import load_model
from aaq.runs.records import provenance, write_json

RESULTS = Path(__file__).parent / "results" / "generation_speed.json"
TARGET_RATIO = 3.0
BASELINE_BATCH = 8


def _trimmed(row: list[int], stops: set[int]) -> list[int]:
    """The answer up to and including its first stop token."""
    end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
    return row[:end]


@torch.no_grad()
def _transformers_generate(model, tokenizer, texts: list[str], batch: int, max_new_tokens: int, stops: set[int]) -> list[list[int]]:
    """`model.generate` on consecutive left-padded batches, as aaq's evaluation did before issue 24."""
    answers = []
    with left_padding(tokenizer):
        for start in range(0, len(texts), batch):
            # The chat template carries its own BOS.
            encoded = tokenizer(texts[start : start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(
                input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True,
            )  # fmt: skip
            answers += [_trimmed(row, stops) for row in output[:, encoded["input_ids"].shape[1] :].tolist()]
    return answers


def _decode_steps(variant: str, answers: list[list[int]], prompt_ids: list[list[int]]) -> int:
    """Forward passes the variant (`<path>_b<batch>_<model>`) made: one per token of the longest answer of each of its batches."""
    path, batch, _ = variant.split("_")
    size = int(batch[1:])
    if path == "aaq":
        batches = length_sorted_batches([len(p) for p in prompt_ids], size)
    else:
        batches = [list(range(start, min(start + size, len(answers)))) for start in range(0, len(answers), size)]
    return sum(max(len(answers[i]) for i in rows) for rows in batches)


@torch.no_grad()
def _margin_at(model, prompt: list[int], prefix: list[int]) -> float:
    """Top-1 minus top-2 next-token logit after `prompt + prefix`, at batch 1."""
    logits = model(input_ids=torch.tensor([prompt + prefix]), use_cache=False, logits_to_keep=1).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return (top[0] - top[1]).item()


def _differences(model, prompt_ids: list[list[int]], answers: list[list[int]], reference: list[list[int]]) -> dict:
    """How `answers` differ from the batch-1 reference: count, first differing answer token, margin there."""
    rows = []
    for index, (answer, expected) in enumerate(zip(answers, reference, strict=True)):
        if answer == expected:
            continue
        at = next((i for i, (a, b) in enumerate(zip(answer, expected, strict=False)) if a != b), min(len(answer), len(expected)))
        rows.append({"prompt": index, "first_differing_token": at, "reference_margin": _margin_at(model, prompt_ids[index], expected[:at])})
    return {"identical": len(answers) - len(rows), "differing": len(rows), "rows": rows}


def read_bandwidth_bytes_per_s(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Single-thread streaming read bandwidth: the best of `repeats` sums over a `size_bytes` float32 tensor."""
    data = torch.ones(size_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best


def decode_weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every parameter once (a tied embedding counts as the output head's
    weight), minus an untied input embedding, of which a step reads one row per token."""
    params = {p.data_ptr(): p for p in model.parameters()}
    total = sum(p.numel() * p.element_size() for p in params.values())
    embedding = model.get_input_embeddings().weight
    if embedding.data_ptr() != model.get_output_embeddings().weight.data_ptr():
        total -= embedding.numel() * embedding.element_size()
    return total


def _reference_name(model_name: str, args) -> str:
    """The variant whose answers are the batch-1 reference of `model_name`."""
    path = "aaq" if model_name != "fp" and args.quantized_reference == "aaq" else "transformers"
    return f"{path}_b1_{model_name}"


def _variants(models: dict, tokenizer, args, stops: set[int], reference: bool) -> dict[str, Callable]:
    runs = {}
    for name, model in models.items():
        runs[f"transformers_b8_{name}"] = lambda ids, texts, m=model: _transformers_generate(
            m, tokenizer, texts, BASELINE_BATCH, args.max_new_tokens, stops
        )
        for size in args.batch_size:
            runs[f"aaq_b{size}_{name}"] = lambda ids, texts, m=model, size=size: greedy_token_ids(
                m, ids, args.max_new_tokens, size, stops, tokenizer.pad_token_id
            )
        if reference and _reference_name(name, args).startswith("aaq"):
            runs[_reference_name(name, args)] = lambda ids, texts, m=model: greedy_token_ids(m, ids, args.max_new_tokens, 1, stops, tokenizer.pad_token_id)
        elif reference:
            runs[_reference_name(name, args)] = lambda ids, texts, m=model: _transformers_generate(m, tokenizer, texts, 1, args.max_new_tokens, stops)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-safe")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=lambda text: [int(size) for size in text.split(",")], default=[64],
                        help="aaq's generation batch sizes, comma-separated (default: the evaluation's, 64)")  # fmt: skip
    parser.add_argument("--benign-chunks", type=int, default=1)
    parser.add_argument("--max-prompts", type=int, default=None, help="evenly spaced subset of each prompt set")
    parser.add_argument("--weights", choices=("gptq", "rtn"), default="gptq", help="QuaRot's weight quantizer")
    parser.add_argument("--no-reference", action="store_true", help="skip the batch-1 reference answers")
    parser.add_argument("--quantized-reference", choices=("transformers", "aaq"), default="transformers",
                        help="whose batch-1 greedy answers are the quantized model's reference")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    origin = provenance()  # taken before the run: the code that ran
    fp_model, tokenizer = load_model(args.model)
    quantized = copy.deepcopy(fp_model)
    start = time.perf_counter()
    quantize(quantized, QuantizeConfig(method=QuaRotConfig(weight_quantizer=args.weights), bits="w4a4kv4", seed=0), tokenizer=tokenizer)
    quantize_seconds = time.perf_counter() - start
    models = {"fp": fp_model.eval(), "w4a4kv4": quantized.eval()}
    harmful = [p.text for p in evenly_spaced(harmful_records("harmbench-val"), args.max_prompts)]
    benign = [p.text for p in evenly_spaced(benign_records(), args.max_prompts)]
    prompts = harmful + benign
    texts, prompt_ids = chat_texts(tokenizer, prompts), prompt_token_ids(tokenizer, prompts)
    stops = stop_token_ids(fp_model, tokenizer)
    runs = _variants(models, tokenizer, args, stops, not args.no_reference)
    seconds, cpu_seconds = dict.fromkeys(runs, 0.0), dict.fromkeys(runs, 0.0)
    answers: dict[str, list[list[int]]] = {name: [] for name in runs}
    bounds = [0] + [len(harmful) + len(benign) * k // args.benign_chunks for k in range(args.benign_chunks + 1)]
    for chunk, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        order = list(runs) if chunk % 2 == 0 else list(reversed(runs))
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            answers[name] += runs[name](prompt_ids[lo:hi], texts[lo:hi])
            seconds[name] += time.perf_counter() - start
            cpu_seconds[name] += time.process_time() - cpu_start
        print(f"chunk {chunk + 1}/{len(bounds) - 1}: " + ", ".join(f"{n} {cpu_seconds[n]:.0f} CPU-s" for n in runs), flush=True)

    bandwidth = read_bandwidth_bytes_per_s()
    weight_bytes = decode_weight_bytes(fp_model)
    baseline = "transformers_b8_fp"
    results = {}
    for name in runs:
        tokens = sum(map(len, answers[name]))
        steps = sum(
            _decode_steps(name, answers[name][lo:hi], prompt_ids[lo:hi]) for lo, hi in itertools.pairwise(bounds)
        )
        model_name = name.rsplit("_", 1)[-1]
        results[name] = {
            "cpu_seconds": round(cpu_seconds[name], 2),
            "wall_seconds": round(seconds[name], 2),
            "new_tokens": tokens,
            "new_tokens_per_s": tokens / cpu_seconds[name],
            "new_tokens_per_wall_s": tokens / seconds[name],
            "decode_steps": steps,
            "new_tokens_per_step": tokens / steps,
            "weight_bound_new_tokens_per_s": tokens / steps * bandwidth / weight_bytes,
        }
        if not args.no_reference:
            results[name]["vs_batch1"] = _differences(models[model_name], prompt_ids, answers[name], answers[_reference_name(model_name, args)])
    for name in runs:
        results[name]["ratio_to_baseline"] = results[name]["new_tokens_per_s"] / results[baseline]["new_tokens_per_s"]
    record = {
        "model": args.model,
        "quantized": f"QuaRot W4A4KV4 ({args.weights} weights), quantized in {quantize_seconds:.0f}s",
        "prompts": {"harmbench-val": len(harmful), "benign": len(benign)},
        "max_new_tokens": args.max_new_tokens,
        "aaq_batch_sizes": args.batch_size,
        "baseline": baseline,
        "references": {name: _reference_name(name, args) for name in models} if not args.no_reference else None,
        "target_ratio": TARGET_RATIO,
        "chunks": [hi - lo for lo, hi in itertools.pairwise(bounds)],
        "read_bandwidth_gb_per_s": bandwidth / 1e9,
        "decode_weight_bytes": weight_bytes,
        "variants": results,
        **origin,
    }
    write_json(args.out, record)
    summary = {n: {k: r[k] for k in ("new_tokens_per_s", "ratio_to_baseline", "weight_bound_new_tokens_per_s")} for n, r in results.items()}
    for name, result in results.items():
        if "vs_batch1" in result:
            summary[name]["identical_to_batch1"] = result["vs_batch1"]["identical"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
