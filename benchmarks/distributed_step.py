"""One process x 2 threads against 2 processes x 1 thread (torchrun, gloo): time per calibration step, in total, and the equality.

Runs the same `aaq quantize` (model, reference, recipe, global step batch, evaluation) three times:

    1x2  one process, OMP_NUM_THREADS=2: the single-process run on a 2-core machine
    2x1  torchrun --nproc-per-node 2, OMP_NUM_THREADS=1 each (gloo): the split run
    1x1  one process, OMP_NUM_THREADS=1: the equality reference of 2x1 (the same threads per process);
         its teacher stage is also what process 0 alone would take to build the cache while the others wait

and prints, side by side, each stage's seconds (from run.json), the mean calibration step (the calibration
stage over its steps), the wall time of the whole command, and the equality of each pair of runs: the largest
difference of the learned transforms, how many integer weight codes differ (and in which layer the first
ones are), and the perplexities. It also works out, from the model's shapes, the bytes each process
all-reduces per calibration step (the transforms' gradients and the loss terms, fp32) and per GPTQ layer (the
Hessians, fp64; then the solved codes are all-gathered on the host), for this model and for a config from
benchmarks/configs (default Llama-3.1-8B), with what the all-reduces cost on paper over NVLink and PCIe.
Writes benchmarks/results/distributed_step.json.

    python benchmarks/distributed_step.py [--model smollm2-135m-safe] [--reference smollm2-135m-instruct]
        [--recipe recipes/aaq_demo.yaml] [--step-batch 2] [--ppl-samples 8] [--work DIR]

The demo recipe's step batch is 1, which two processes cannot split; the default here is 2 (one sequence
per process). Run it alone on the machine (`flock /work/bench.lock python benchmarks/distributed_step.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from aaq.models import transform_plan
from aaq.models.loading import load_config_and_tokenizer
from aaq.models.plan import TransformConfig
from aaq.quant.packing import unpack_codes
from aaq.runs.records import provenance, write_json
from aaq.transforms.learnable import LearnableTransforms

RESULTS = Path(__file__).parent / "results" / "distributed_step.json"
SOURCE = Path(__file__).resolve().parents[1] / "src"
RUNS = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}
PAIRS = (("2x1", "1x1"), ("2x1", "1x2"), ("1x2", "1x1"))
STAGES = ("load", "teachers", "calibration", "fusion", "gptq", "quantize", "save", "eval")
# All-reduce bus bandwidths assumed on paper (NCCL ring, per GPU): NVLink 3 (A100 SXM) and PCIe 4.0 x16.
LINKS_GB_S = {"nvlink": 200.0, "pcie": 16.0}


def _quantize(name: str, args: argparse.Namespace, out: Path) -> dict:
    """Run `aaq quantize` as configuration `name` into `out`; its run.json, the wall time and the processes' stderr."""
    processes, threads = RUNS[name]
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": str(threads)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "aaq", "quantize", "--model", args.model, "--reference", args.reference, "--recipe", str(args.recipe)]
    command += ["--step-batch", str(args.step_batch), "--tasks", "ppl", "--ppl-samples", str(args.ppl_samples), "--out", str(out)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    record = json.loads((out / "run.json").read_text())
    steps = record["config"]["method"]["training"]["steps"]
    stages = {stage: record["stages"][stage]["seconds"] for stage in STAGES if stage in record["stages"]}
    return {
        "processes": processes,
        "threads_per_process": threads,
        "wall_s": wall,
        "stages_s": stages,
        "calibration_step_s": stages["calibration"] / steps,
        "steps": steps,
        "ppl": record["metrics"]["ppl"],
        "peak_host_mb_process_0": max(s["peak_host"] or 0 for s in record["stages"].values()) / 2**20,
    }


def _codes(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized linear's integer codes (unpacked) in a run folder."""
    tensors = load_file(folder / "aaq_model.safetensors")
    return {name[: -len(".qweight")]: unpack_codes(t, 2 * t.shape[-1], 4) for name, t in tensors.items() if name.endswith(".qweight")}


def _layer(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


def _equality(a: Path, b: Path, ppl: tuple[float, float]) -> dict:
    """How far two run folders are apart: transforms, integer codes (by layer), perplexity."""
    ta, tb = load_file(a / "transforms.safetensors"), load_file(b / "transforms.safetensors")
    ca, cb = _codes(a), _codes(b)
    by_layer: dict[int, int] = {}
    for name, codes in ca.items():
        by_layer[_layer(name)] = by_layer.get(_layer(name), 0) + int((codes != cb[name]).sum())
    differing = [layer for layer, count in sorted(by_layer.items()) if count]
    return {
        "transforms_max_abs_diff": max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta),
        "codes_differing": sum(by_layer.values()),
        "codes_total": sum(codes.numel() for codes in ca.values()),
        "first_layer_with_differing_codes": differing[0] if differing else None,
        "codes_differing_in_that_layer": by_layer[differing[0]] if differing else 0,
        "codes_differing_by_layer": by_layer,
        "ppl": ppl,
        "ppl_equal_to_4_digits": f"{ppl[0]:.4g}" == f"{ppl[1]:.4g}",
    }


def _communication(config: PretrainedConfig) -> dict:
    """Bytes each process all-reduces per calibration step (fp32 gradients + loss terms) and per GPTQ layer (fp64 Hessians)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    plan = transform_plan(model)
    transforms = LearnableTransforms(plan.geometry, TransformConfig(smoothing=True), seed=0)
    parameters = sum(p.numel() for p in transforms.parameters())
    step_bytes = 4 * (parameters + 3)
    layer = plan.layers[0]
    hessian_entries = sum(model.get_submodule(group[0]).in_features ** 2 for group in layer.input_groups)
    layer_bytes = 8 * hessian_entries
    linears = [model.get_submodule(name) for name in layer.linears]
    return {
        "transform_parameters": parameters,
        "step_bytes": step_bytes,
        "gptq_layer_bytes": layer_bytes,
        "gptq_bytes": layer_bytes * len(plan.layers),
        # Each weight's int4 codes (two per byte) and fp32 per-row scales, all-gathered on the host (gloo) after the solves.
        "gptq_layer_codes_bytes": sum(linear.weight.numel() // 2 + 4 * linear.out_features for linear in linears),
        "layers": len(plan.layers),
    }


def _on_paper(bytes_: int, processes: int) -> dict[str, float]:
    """Seconds of a ring all-reduce of `bytes_` over `processes` GPUs: each sends and receives 2 (N - 1) / N of it."""
    moved = 2 * (processes - 1) / processes * bytes_
    return {link: moved / (gb_s * 1e9) for link, gb_s in LINKS_GB_S.items()}


def _config_file(name: str) -> PretrainedConfig:
    data = json.loads((Path(__file__).parent / "configs" / f"{name}.json").read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _table(runs: dict[str, dict]) -> str:
    rows = [f"{'':24}" + "".join(f"{name:>12}" for name in runs)]
    shapes = [f"{r['processes']} x {r['threads_per_process']}" for r in runs.values()]
    rows.append(f"{'processes x threads':24}" + "".join(f"{shape:>12}" for shape in shapes))
    rows.append(f"{'calibration step (s)':24}" + "".join(f"{r['calibration_step_s']:>12.3f}" for r in runs.values()))
    rows += [f"{stage + ' (s)':24}" + "".join(f"{r['stages_s'].get(stage, float('nan')):>12.1f}" for r in runs.values()) for stage in STAGES]
    rows.append(f"{'whole command (s)':24}" + "".join(f"{r['wall_s']:>12.1f}" for r in runs.values()))
    rows.append(f"{'perplexity':24}" + "".join(f"{r['ppl']:>12.4f}" for r in runs.values()))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-safe")
    parser.add_argument("--reference", default="smollm2-135m-instruct")
    parser.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "recipes" / "aaq_demo.yaml")
    parser.add_argument("--step-batch", type=int, default=2, help="the global calibration batch (sequences per step)")
    parser.add_argument("--ppl-samples", type=int, default=8)
    parser.add_argument("--paper-config", default="llama-3.1-8b-instruct", help="benchmarks/configs entry whose communication is worked out on paper")
    parser.add_argument("--work", type=Path, default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aaq-dist-") as temporary:
        work = args.work or Path(temporary)
        runs = {}
        for name in RUNS:
            runs[name] = _quantize(name, args, work / name)
            print(f"{name}: {runs[name]['wall_s']:.1f} s, calibration step {runs[name]['calibration_step_s']:.3f} s, ppl {runs[name]['ppl']:.4f}", flush=True)
        equality = {f"{a} vs {b}": _equality(work / a, work / b, (runs[a]["ppl"], runs[b]["ppl"])) for a, b in PAIRS}
    communication = {args.model: _communication(load_config_and_tokenizer(args.model)[0]), args.paper_config: _communication(_config_file(args.paper_config))}
    for entry in communication.values():
        entry["on_paper_s"] = {
            f"{n} GPUs": {"step": _on_paper(entry["step_bytes"], n), "gptq_layer": _on_paper(entry["gptq_layer_bytes"], n)} for n in (2, 4, 8)
        }
    result = {
        "model": args.model,
        "reference": args.reference,
        "recipe": str(args.recipe),
        "step_batch": args.step_batch,
        "runs": runs,
        "equality": equality,
        "communication": communication,
        "link_bandwidth_gb_s": LINKS_GB_S,
        **provenance(),
    }
    write_json(args.out, result)
    print(_table(runs))
    for pair, figures in equality.items():
        print(
            f"{pair}: transforms max |diff| {figures['transforms_max_abs_diff']:.3g}; codes differing {figures['codes_differing']} of "
            f"{figures['codes_total']} (first in layer {figures['first_layer_with_differing_codes']}: {figures['codes_differing_in_that_layer']}); "
            f"ppl {figures['ppl'][0]:.4f} / {figures['ppl'][1]:.4f}"
        )
    for model, entry in communication.items():
        paper = entry["on_paper_s"]["8 GPUs"]
        print(
            f"{model}: {entry['transform_parameters']:,} transform parameters, {entry['step_bytes'] / 1e6:.2f} MB all-reduced per step, "
            f"{entry['gptq_layer_bytes'] / 1e6:.1f} MB per GPTQ layer; 8 GPUs: step {paper['step']['nvlink'] * 1e3:.2f} ms NVLink / "
            f"{paper['step']['pcie'] * 1e3:.1f} ms PCIe, GPTQ layer {paper['gptq_layer']['nvlink'] * 1e3:.1f} / {paper['gptq_layer']['pcie'] * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
