"""Two processes (gloo, CPU) compute what one process computes: teacher cache, calibration, GPTQ, every method, shared errors, killed runs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from aaq.api import QuantizeConfig, quantize
from aaq.calibration.loop import CalibrationSettings, calibrate
from aaq.calibration.losses import LossConfig
from aaq.calibration.teachers import build_teacher_cache, cached_teacher
from aaq.errors import AaqError
from aaq.methods import AAQConfig, GPTQConfig, OSTQuantConfig, QuaRotConfig, RTNConfig
from aaq.quant.fake_quant import QuantLinear
from aaq.quant.packing import unpack_codes
from aaq.quant.quantizers import QuantScheme
from aaq.runs.folders import TEMP_SUFFIX
from aaq.runtime import distributed
from aaq.runtime.devices import Placement
from tests.helpers import CALIBRATION, calibration_setup, logits_fn, make_tiny_model, perturbed_reference

SOURCE = Path(__file__).resolve().parents[2] / "src"
PROCESSES = 2
# A bound on every two-process run here: a process that hangs fails the test instead of the suite.
DEADLINE_S = 180

# --- one process: every helper is the identity ------------------------------------------------------------------


def test_one_process_is_a_world_of_one():
    assert distributed.world() == distributed.World() and distributed.is_main_process() and not distributed.active()
    assert distributed.share([1, 2, 3]) == [1, 2, 3]
    assert distributed.share_of_batches(20, 8) == slice(0, 20)
    tensor = torch.arange(3.0)
    distributed.sum_([tensor, tensor.clone()], "nothing")
    assert torch.equal(tensor, torch.arange(3.0))
    assert distributed.gather(5, "nothing") == [5] and distributed.from_main("x", "nothing") == "x"
    with pytest.raises(ValueError, match="raised as is"), distributed.agreed("nothing"):
        raise ValueError("raised as is")


def test_balanced_shares_cover_every_task_once(monkeypatch):
    costs = {"q": 4, "k": 1, "v": 1, "o": 4, "gate": 12, "up": 12, "down": 12}
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: distributed.World(rank=rank, size=3))
        shares.append(distributed.balanced_share(costs))
    assert sorted(name for share in shares for name in share) == sorted(costs)
    assert [sum(costs[name] for name in share) for share in shares] == [16, 16, 14]


def test_torchrun_environment_names_the_world_and_each_process_its_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() == distributed.World(rank=3, size=4, local_rank=1) and not distributed.launched().is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Placement().compute_device == torch.device("cuda", 1)
    assert Placement(device="cuda").compute_device == torch.device("cuda", 1)
    assert Placement(device="cuda:0").compute_device == torch.device("cuda", 0)  # an explicit GPU stays as given
    assert Placement(device="cpu").compute_device == torch.device("cpu")
    with pytest.raises(AaqError, match=r"each process computes on its own GPU .*not all on cuda:0") as error, distributed.process_group(torch.device("cuda", 0)):
        pass
    assert error.value.setting == "device"


def test_sigterm_becomes_a_one_line_error_and_then_is_ignored(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stopped = pytest.raises(distributed.Stopped, match=r"process 1 of 2 was stopped by the launcher.*continue the run with `resume`")
        with stopped, distributed.sigterm_as_error():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # the process is ending: no second error
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- two processes through the Python API (torch.multiprocessing, gloo) ------------------------------------------

SCHEME = QuantScheme.from_string("w4a4kv4")
TOKENS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(0))
APC = LossConfig(name="apc", lam=0.1, k=32)
# Batches of 3 over two processes: shares of 1 and 2 sequences, weighted unevenly. Three teacher
# batches of 2: one process builds one of them, the other two.
SETTINGS = CalibrationSettings(
    steps=4, batch_size=3, loss=APC, checkpoint_every=2, cache_dtype="float32", optimizer="riemannian_adam", rotation_lr=0.01, scale_lr=0.01
)
# Two steps: later steps flip 4-bit roundings on the rounding differences of a two-process gradient sum, and the
# trajectories part (by 1e-3 at step 4 on some CPUs). Two held-out windows: one per process.
HELDOUT = replace(SETTINGS, steps=2, heldout_windows=2, heldout_every=1)
TRAINING = CalibrationSettings(steps=3, batch_size=2, loss=LossConfig(name="kl_top", k=32), rotation_lr=0.0017, scale_lr=0.00018)  # the demo rates
METHODS = {
    "rtn": RTNConfig(),
    "gptq": GPTQConfig(),
    "quarot": QuaRotConfig(),
    "ostquant": OSTQuantConfig(training=TRAINING),
    "aaq": AAQConfig(training=CalibrationSettings(**{**TRAINING.__dict__, "loss": APC})),
}
CALIBRATED = ("ostquant", "aaq")


def _calibration(work: Path, settings: CalibrationSettings = HELDOUT) -> dict:
    """Teacher cache, then calibration with checkpoints, of a tiny Llama: the learned parameters, loss history, held-out curve and cache."""
    model = make_tiny_model("llama")
    cache = build_teacher_cache(logits_fn(model), logits_fn(perturbed_reference(model)), TOKENS, work / "teacher_cache", APC.k, torch.float32, 2)
    setup = calibration_setup(model, SCHEME)
    result = calibrate(model, setup.transforms, TOKENS, cached_teacher(cache), settings, seed=0, checkpoint_dir=work / "calibration")
    return {
        "transforms": {k: v.detach().clone() for k, v in setup.transforms.state_dict().items()},
        "history": result.history,
        "heldout": result.heldout,
        "pair_statistics": cache.meta.pair_statistics,
    }


def _methods(work: Path) -> dict:
    """Each method's integer codes (and learned transforms) on a tiny Llama, with a run folder each."""
    results = {}
    for name, method in METHODS.items():
        model = make_tiny_model("llama")
        reference = perturbed_reference(model) if method.needs_reference() else None
        result = quantize(model, QuantizeConfig(method=method, seed=1), calibration=CALIBRATION, reference=reference, run_dir=work / name)
        codes = {n: m.codes.qweight.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.codes is not None}
        results[name] = {"codes": codes, "transforms": result.transforms.tensors()}
    return results


def _failing_step(work: Path) -> dict:
    """Calibration in which process 1 fails in step 1: what each process raises."""
    import aaq.calibration.loop as calibrate_module

    real = calibrate_module.student_loss
    calls = []

    def fails_once_in_process_1(*args):
        calls.append(1)
        if distributed.world().rank == 1 and len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    calibrate_module.student_loss = fails_once_in_process_1
    try:
        _calibration(work, SETTINGS)
    except Exception as error:  # noqa: BLE001 - the error is the result
        return {"error": type(error).__name__, "message": str(error)}
    finally:
        calibrate_module.student_loss = real
    return {"error": None}


def _diverging_loss(work: Path) -> dict:
    """Calibration in which process 1's loss is NaN from step 2 on: what each process raises."""
    import aaq.calibration.loop as calibrate_module

    real = calibrate_module.chunked_loss
    calls = []

    def nan_in_process_1(*args):
        calls.append(1)
        terms = real(*args)
        return terms._replace(total=terms.total * float("nan")) if distributed.world().rank == 1 and len(calls) > 2 else terms

    calibrate_module.chunked_loss = nan_in_process_1
    try:
        _calibration(work, SETTINGS)
    except Exception as error:  # noqa: BLE001 - the error is the result
        return {"error": type(error).__name__, "message": str(error), "checkpoints": sorted(p.name for p in (work / "calibration").iterdir())}
    finally:
        calibrate_module.chunked_loss = real
    return {"error": None}


def _failing_heldout(work: Path) -> dict:
    """Calibration in which process 1 fails while measuring the held-out loss before the first step: what each process raises."""
    import aaq.calibration.loop as calibrate_module

    real = calibrate_module.student_loss

    def fails_without_gradients_in_process_1(*args):
        if distributed.world().rank == 1 and not torch.is_grad_enabled():
            raise RuntimeError("out of memory (simulated)")
        return real(*args)

    calibrate_module.student_loss = fails_without_gradients_in_process_1
    try:
        _calibration(work)
    except Exception as error:  # noqa: BLE001 - the error is the result
        return {"error": type(error).__name__, "message": str(error)}
    finally:
        calibrate_module.student_loss = real
    return {"error": None}


SCENARIOS = {"calibration": _calibration, "failing held-out": _failing_heldout, "methods": _methods, "failing step": _failing_step, "diverging loss": _diverging_loss}


def _worker(rank: int, init_file: str, work: str) -> None:
    """One of the processes: join the group, run every scenario in its own folder (shared by the processes), save the results."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=PROCESSES, timeout=timedelta(seconds=60))
    try:
        results = {name: scenario(Path(work) / name) for name, scenario in SCENARIOS.items()}
        torch.save(results, Path(work) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Every scenario run by two spawned processes: their results by rank, and the work folder."""
    work = tmp_path_factory.mktemp("two-processes")
    context = mp.start_processes(_worker, args=(str(work / "init"), str(work)), nprocs=PROCESSES, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes did not finish in time")
    return [torch.load(work / f"rank{rank}.pt", weights_only=False) for rank in range(PROCESSES)], work


def test_two_processes_calibrate_the_transforms_of_one_and_write_its_files(tmp_path, two_processes):
    (main, other), work = two_processes
    one = _calibration(tmp_path)
    initial = calibration_setup(make_tiny_model("llama"), SCHEME).transforms.state_dict()
    for name, value in one["transforms"].items():
        assert torch.equal(main["calibration"]["transforms"][name], other["calibration"]["transforms"][name]), name
        # Summing the gradient over two processes rounds differently from one process: the two agree to 0.1% of how far
        # each transform moved (a share weighted wrongly flips whole steps of some entries).
        moved = (value - initial[name]).abs().max()
        assert (main["calibration"]["transforms"][name] - value).abs().max() <= 1e-3 * moved, name
    assert min((one["transforms"][name] - value).abs().max() for name, value in initial.items() if name.endswith("r1")) > 1e-3  # they moved
    for step, expected in zip(main["calibration"]["history"], one["history"], strict=True):
        assert step == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # The held-out windows (one per process) give the one-process curve: exactly at the start, and after steps to the few
    # 4-bit roundings that the transforms' last digits flip.
    assert [e["step"] for e in main["calibration"]["heldout"]] == [e["step"] for e in one["heldout"]] == [0, 1, 2]
    for entry, expected in zip(main["calibration"]["heldout"], one["heldout"], strict=True):
        rel = 1e-5 if entry["step"] == 0 else 1e-3
        assert entry["heldout_loss"] == pytest.approx(expected["heldout_loss"], rel=rel, abs=1e-7)
    assert main["calibration"]["pair_statistics"]["positions"] == one["pair_statistics"]["positions"] == TOKENS.numel()
    # The teacher cache (each process wrote its batches) is the one-process cache bit for bit.
    files = sorted(p.name for p in (tmp_path / "teacher_cache").iterdir())
    assert files == sorted(p.name for p in (work / "calibration" / "teacher_cache").iterdir())
    for file in files:
        if file.endswith(".npy"):
            assert (tmp_path / "teacher_cache" / file).read_bytes() == (work / "calibration" / "teacher_cache" / file).read_bytes(), file
    # The checkpoint: the same files, the same record, parameters within the tolerance.
    checkpoints = work / "calibration" / "calibration"
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(p.name for p in (tmp_path / "calibration").iterdir())
    record, expected = (json.loads((folder / "checkpoint.json").read_text()) for folder in (checkpoints, tmp_path / "calibration"))
    assert record["step"] == expected["step"] == HELDOUT.steps and record["settings"] == expected["settings"]
    saved, expected_tensors = (load_file(folder / record["tensors"]) for folder in (checkpoints, tmp_path / "calibration"))
    assert saved.keys() == expected_tensors.keys()
    assert max((saved[k] - expected_tensors[k]).abs().max() for k in saved) < 1e-5


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_over_two_processes_gives_the_codes_of_one(tmp_path, two_processes, method):
    (main, other), work = two_processes
    model = make_tiny_model("llama")
    reference = perturbed_reference(model) if METHODS[method].needs_reference() else None
    result = quantize(model, QuantizeConfig(method=METHODS[method], seed=1), calibration=CALIBRATION, reference=reference)
    ranks = main["methods"][method], other["methods"][method]
    differing = total = 0
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(ranks[0]["codes"][name], ranks[1]["codes"][name]), name  # the same weights on every process
            codes = [unpack_codes(packed, module.in_features, 4) for packed in (ranks[0]["codes"][name], module.codes.qweight)]
            differing, total = differing + int((codes[0] != codes[1]).sum()), total + codes[0].numel()
    # Without learned transforms the sums GPTQ rounds are the same; with them a 1e-6 difference of the
    # transforms may flip a rounding (none here: 0 of 159,744 codes).
    assert differing == 0 if method not in CALIBRATED else differing <= total // 1000
    for name, value in result.transforms.tensors().items():
        assert torch.equal(ranks[0]["transforms"][name], ranks[1]["transforms"][name]), name
        assert (ranks[0]["transforms"][name] - value).abs().max() < 1e-5, name
    run = work / "methods" / method
    assert not (run / "gptq_progress").exists()
    if method in CALIBRATED:
        assert (run / "calibration" / "checkpoint.json").is_file() and (run / "teacher_cache" / "meta.json").is_file()


def test_a_failure_in_one_process_stops_both_with_one_line_errors(two_processes):
    (main, other), _ = two_processes
    assert other["failing step"] == {"error": "RuntimeError", "message": "out of memory (simulated)"}
    assert main["failing step"]["error"] == "AaqError"
    assert main["failing step"]["message"] == "process 1 of 2 failed during calibration step 1: RuntimeError: out of memory (simulated)"


def test_a_failure_while_measuring_the_heldout_loss_stops_both(two_processes):
    (main, other), _ = two_processes
    assert other["failing held-out"] == {"error": "RuntimeError", "message": "out of memory (simulated)"}
    assert main["failing held-out"] == {"error": "AaqError", "message": "process 1 of 2 failed during the held-out loss at step 0: RuntimeError: out of memory (simulated)"}


def test_a_diverged_loss_stops_both_processes_together(two_processes):
    (main, other), _ = two_processes
    assert main["diverging loss"] == other["diverging loss"]
    assert main["diverging loss"]["error"] == "AaqError"
    assert main["diverging loss"]["message"].startswith("calibration diverged: the loss is not finite at step 2; the last good checkpoint (step 2)")
    assert main["diverging loss"]["checkpoints"] == ["checkpoint.json", "state-000002.safetensors"]


# --- two processes under torchrun: the command line, a killed process, --resume ---------------------------------

RECIPE = """method:
  name: aaq
  training: {steps: 8, batch_size: 2, checkpoint_every: 2, rotation_lr: 0.0017, scale_lr: 0.00018, loss: {name: apc, lam: 1.0, k: 50}}
bits: w4a4kv4
calibration: {dataset: python-docs, n_samples: 16, seq_len: 48, batch_size: 8}
"""


def _deep_model(folder: Path, tokenizer, seed: int) -> Path:
    """A random 2-layer Llama (hidden 128) on `tokenizer`, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _torchrun(argv: list[str], logs: Path) -> subprocess.Popen:
    """`torchrun --nproc-per-node 2 -m aaq quantize ...` with this checkout's source, one thread per process, each process's output in `logs`."""
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(PROCESSES), "--log-dir", str(logs), "--redirects", "3"]
    with (logs.parent / f"{logs.name}.launcher.log").open("ab") as handle:
        return subprocess.Popen([*launcher, "-m", "aaq", "quantize", *argv], env=env, stdout=handle, stderr=handle)


def _output(logs: Path, rank: int) -> str:
    """What process `rank` wrote to stderr."""
    return next(logs.glob(f"*/attempt_0/{rank}/stderr.log")).read_text()


def _process_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of process `rank`, a child of the torchrun launcher (read from /proc)."""
    for child in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no process of rank {rank}")


def _finished(launcher: subprocess.Popen) -> int:
    try:
        return launcher.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError("torchrun did not finish in time") from None


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory, tiny_tokenizer):
    """The arguments of an aaq quantize run on tiny models, and that run made by `torchrun --nproc-per-node 2` (its folder and logs)."""
    from tests.conftest import write_fake_data

    work = tmp_path_factory.mktemp("torchrun")
    (work / "recipe.yaml").write_text(RECIPE)
    aligned, reference = _deep_model(work / "aligned", tiny_tokenizer, 0), _deep_model(work / "reference", tiny_tokenizer, 1)
    args = ["--model", str(aligned), "--reference", str(reference), "--recipe", str(work / "recipe.yaml"), "--ppl-samples", "2", "--ppl-seq-len", "32"]
    write_fake_data(work / "data", tiny_tokenizer)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AAQ_DATA_DIR", str(work / "data"))
        assert _finished(_torchrun([*args, "--out", str(work / "run")], work / "logs")) == 0
        yield args, work / "run", work / "logs"


def test_quantize_under_torchrun_matches_one_process_and_only_process_0_writes(tmp_path, torchrun_run):
    from aaq.cli import main

    args, run, logs = torchrun_run
    assert "quantized with aaq" in _output(logs, 0)
    assert _output(logs, 1).strip() == ""  # warnings only (none here), no progress bars
    record = json.loads((run / "run.json").read_text())
    assert record["processes"] == 2 and record["metrics"]["ppl"] > 1
    assert not [p for p in run.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    # One process with the same global batch: the transforms within 1e-5 (the codes follow them through GPTQ; see the README).
    assert main(["quantize", *args, "--out", str(tmp_path / "one"), "--no-eval"]) == 0
    one, two = (load_file(folder / "transforms.safetensors") for folder in (tmp_path / "one", run))
    assert max((one[k] - two[k]).abs().max() for k in one) < 1e-5


def test_a_killed_process_stops_the_run_with_one_line_and_resume_finishes_it(tmp_path, torchrun_run):
    args, run, _ = torchrun_run
    out, logs = tmp_path / "killed", tmp_path / "killed-logs"
    launcher = _torchrun([*args, "--out", str(out)], logs)
    deadline = time.monotonic() + DEADLINE_S
    while not (out / "calibration" / "checkpoint.json").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.002)
    os.kill(_process_pid(launcher, 1), signal.SIGKILL)
    assert _finished(launcher) != 0
    output = _output(logs, 0)
    last = output.strip().splitlines()[-1]
    assert re.fullmatch(r"aaq: error: process 0 of 2 (lost contact with the other processes during .*|was stopped by the launcher.*)--resume", last), last
    assert "Traceback" not in output
    assert json.loads((out / "failed.json").read_text())["stage"] == "quantize" and not (out / "run.json").exists()

    assert _finished(_torchrun([*args, "--out", str(out), "--resume"], tmp_path / "resumed-logs")) == 0
    assert "resuming calibration from step" in _output(tmp_path / "resumed-logs", 0)
    assert (out / "aaq_model.safetensors").read_bytes() == (run / "aaq_model.safetensors").read_bytes()
    assert (out / "transforms.safetensors").read_bytes() == (run / "transforms.safetensors").read_bytes()
    assert not (out / "failed.json").exists()
