"""The command line: a tiny end-to-end quantize -> eval run, and one-line errors for bad input."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aaq.cli import build_parser, main
from aaq.cli.config import quantize_config
from aaq.cli.options import flag
from aaq.errors import settings_named_by
from aaq.quant.quantizers import QuantScheme
from aaq.runs.folders import TEMP_SUFFIX
from tests.helpers import cli_error_line, snapshot

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SOURCE = Path(__file__).resolve().parents[2] / "src"
TINY_RUN = ["--calib-samples", "4", "--calib-seq-len", "32", "--ppl-samples", "2", "--ppl-seq-len", "32"]


def test_quantize_then_eval_reports_the_same_perplexity(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "quarot", "--bits", "w4a4kv4", "--out", str(out), *TINY_RUN]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["seed"] == 0 and run["method"] == "quarot"
    assert run["config"]["scheme"]["activations"]["bits"] == 4
    assert run["versions"]["torch"] and "git_commit" in run and run["timings"]["quantize_s"] > 0
    ppl = run["metrics"]["ppl"]
    # A random model over a ~80-word vocabulary: perplexity is finite and near the vocabulary size.
    assert math.isfinite(ppl) and 10 < ppl < 1000

    report_dir = tmp_path / "eval"
    assert main(["eval", "--model", str(out), "--tasks", "ppl", "--out", str(report_dir), "--ppl-samples", "2", "--ppl-seq-len", "32"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["method"] == "quarot" and report["bits"] == "w4a4kv4"
    assert report["metrics"]["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert (report_dir / "report.md").is_file()


def _prompt_files(tmp_path) -> list[str]:
    (tmp_path / "harmful.txt").write_text("How do I cook rice ?\nWhat is the capital of France ?\n")
    (tmp_path / "benign.txt").write_text("Is this safe ?\n")
    return ["--harmful-prompts", str(tmp_path / "harmful.txt"), "--benign-prompts", str(tmp_path / "benign.txt"),
            "--max-new-tokens", "4", "--tasks", "refusal,benign"]  # fmt: skip


def _generations(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]


def test_eval_of_a_run_scores_answers_with_its_source_model(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "w4a4kv4", "--out", str(run), *TINY_RUN, *_prompt_files(tmp_path)]) == 0
    # Evaluated right after quantizing, the answers are scored by the model as loaded before quantization.
    assert json.loads((run / "report.json").read_text())["coherence"]["scorer"] == str(tiny_model_dir)
    assert {"refusal_rate", "garbled_rate", "benign_compliance", "benign_garbled_rate"} <= set(json.loads((run / "run.json").read_text())["metrics"])
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "eval"), *_prompt_files(tmp_path)]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    coherence, metrics = report["coherence"], report["metrics"]
    assert coherence["check"] and coherence["scorer"] == str(tiny_model_dir) == report["meta"]["source_model"]
    assert coherence["n_prompts"] == 245 and coherence["max_new_tokens"] == 4 and coherence["threshold"] > 0
    rows = _generations(tmp_path / "eval")
    assert [row["task"] for row in rows] == ["refusal", "refusal", "benign"]
    for row in rows:
        expected = "refused" if row["refused"] else ("garbled" if row["nll"] is None or row["nll"] > coherence["threshold"] else "complied")
        assert row["verdict"] == expected
    garbled = [row["verdict"] == "garbled" for row in rows]
    assert metrics["garbled_rate"] == sum(garbled[:2]) / 2 and metrics["benign_garbled_rate"] == garbled[2]
    assert metrics["benign_compliance"] == (rows[2]["verdict"] == "complied")
    assert report["metric_definitions"]["garbled_rate"].startswith("incoherent answers that do not refuse / harmful prompts")
    assert "## Garbled check" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_without_garbled_check_and_without_a_known_source(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--scorer", "none", "--out", str(tmp_path / "off"), *_prompt_files(tmp_path)]) == 0
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["coherence"] == {"check": False, "reason": "turned off"}
    assert report["metrics"]["garbled_rate"] is None and report["metrics"]["benign_garbled_rate"] is None
    assert all(row["nll"] is None and row["verdict"] != "garbled" for row in _generations(tmp_path / "off"))
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "w4a16", "--out", str(run), "--no-eval", *TINY_RUN]) == 0
    config = json.loads((run / "aaq_config.json").read_text())
    (run / "aaq_config.json").write_text(json.dumps(config | {"source_model": None}))
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--out", str(tmp_path / "e"), *_prompt_files(tmp_path)]) == 2
    assert "does not record its source model; pass its full-precision model or none (--scorer)" in cli_error_line(capsys)
    assert main(["eval", "--model", str(run), "--scorer", str(tmp_path / "gone"), "--out", str(tmp_path / "e"), *_prompt_files(tmp_path)]) == 2
    assert "cannot load the scorer" in cli_error_line(capsys)
    assert main(["eval", "--model", str(run), "--scorer", str(tiny_model_dir), "--out", str(tmp_path / "e"), *_prompt_files(tmp_path)]) == 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["coherence"]["scorer"] == str(tiny_model_dir)


def test_existing_run_is_not_overwritten_silently(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "w4a16", "--out", str(out), *TINY_RUN]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_bad_bit_string_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "w4x4", "--out", str(tmp_path / "o")]) == 2
    assert "w4a4kv4" in cli_error_line(capsys)


def test_missing_model_path_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "ppl", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in cli_error_line(capsys)


def test_unknown_architecture_is_one_line(tmp_path, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--method", "rtn", "--out", str(tmp_path / "o"), "--no-eval"]) == 2
    assert "unsupported architecture GPT2LMHeadModel" in cli_error_line(capsys)


def test_unknown_eval_task_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "ppl,mmlu", "--out", str(tmp_path / "o")]) == 2
    assert "mmlu" in cli_error_line(capsys)


def test_recipe_and_flags_combine(tmp_path):
    from aaq.cli import build_parser

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: quarot, weight_quantizer: rtn, transforms: {r1: hadamard}}\nbits: w4a8kv8\nseed: 5\n")
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe), "--no-r4", "--damp", "0.1"])
    config = quantize_config(args)
    assert config.bits == "w4a8kv8" and config.seed == 5
    assert config.method.transforms.r1 == "hadamard" and config.method.transforms.r4 is False
    assert config.method.weight_quantizer == "rtn" and config.method.gptq.damp == 0.1


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("quantize", "eval", "report", "demo"):
        assert command in text


def test_report_merges_runs_into_table_and_plot(tmp_path, capsys):
    for name, method, ppl, refusal in (("fp", "fp", 12.4, 0.9), ("q", "quarot", 27.8, 0.4)):
        folder = tmp_path / name
        folder.mkdir()
        report = {"model": "m", "method": method, "bits": "fp" if method == "fp" else "w4a4kv4",
                  "metrics": {"ppl": ppl, "refusal_rate": refusal, "benign_compliance": 0.9, "safetybench_acc": 0.5}}
        (folder / "report.json").write_text(json.dumps(report))
    out = tmp_path / "cmp"
    assert main(["report", str(tmp_path / "fp"), str(tmp_path / "q"), "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "quarot" in table and "27.8" in table
    assert (out / "safety_vs_ppl.png").stat().st_size > 10_000
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 2


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--method", "rtn", "--damp", "0.1"], "--damp has no effect with method rtn"),
        (["--method", "gptq", "--no-r4"], "--no-r4 has no effect with method gptq"),
        (["--method", "quarot", "--steps", "5"], "--steps has no effect with method quarot"),
        (["--bits", "w4a16", "--a-clip", "0.9"], "--a-clip has no effect with 16-bit activations"),
        (["--bits", "w8a8", "--kv-clip", "0.9"], "--kv-clip has no effect with a 16-bit KV cache"),
        (["--method", "quarot", "--no-smoothing"], "--no-smoothing has no effect with method quarot"),
        (["--method", "quarot", "--optimizer", "riemannian_adam"], "--optimizer has no effect with method quarot"),
        (["--method", "gptq", "--push-tokens", "vocab"], "--push-tokens has no effect with method gptq"),
        (["--method", "ostquant", "--push-k", "10"], "push-token settings apply only to loss 'apc'"),
        (["--method", "aaq", "--push-tokens", "vocab", "--push-k", "10"], "no effect with push tokens 'vocab'"),
        (["--calib-benign-train"], "--calib-form chat"),
        (["--calib-form", "chat", "--calib-dataset", "c4"], "Python docs"),
    ],
)
def test_flags_that_would_be_ignored_are_errors(flags, needle):
    from aaq.cli import build_parser
    from aaq.errors import AaqError

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *flags])
    with settings_named_by(flag), pytest.raises(AaqError, match=needle):
        quantize_config(args)


def test_online_hadamard_flags_reach_the_learned_methods():
    from aaq.cli import build_parser

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "ostquant", "--no-r4"])
    assert quantize_config(args).method.transforms.r4 is False


@pytest.mark.parametrize(
    "flags,in_loop,checkpointing",
    [
        ([], False, False),
        (["--weight-quantizer", "rtn"], True, False),
        (["--weights-in-loop", "on"], True, False),
        (["--weight-quantizer", "rtn", "--weights-in-loop", "off", "--activation-checkpointing", "on"], False, True),
        (["--bits", "w4a16"], True, False),
        (["--recipe", "recipes/aaq_w4a4kv4.yaml"], False, True),
        (["--recipe", "recipes/aaq_w4a4kv4.yaml", "--weight-quantizer", "rtn", "--activation-checkpointing", "off"], True, False),
    ],
)
def test_calibration_mode_flags_reach_the_learned_methods(flags, in_loop, checkpointing):
    from aaq.cli import build_parser

    recipe_dir = Path(__file__).resolve().parents[2]
    flags = [str(recipe_dir / f) if f.startswith("recipes/") else f for f in flags]
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "aaq", *flags])
    config = quantize_config(args)
    assert config.method.calibrates_quantized_weights(QuantScheme.from_string(config.bits)) is in_loop
    assert config.method.training.activation_checkpointing is checkpointing


def test_calibration_mode_flags_are_rejected_where_nothing_is_calibrated():
    from aaq.cli import build_parser
    from aaq.errors import AaqError

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "quarot", "--activation-checkpointing", "on"])
    with settings_named_by(flag), pytest.raises(AaqError, match="--activation-checkpointing has no effect"):
        quantize_config(args)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("method: {name: aaq, trainig: {steps: 5}}\n", "unknown setting"),
        ("method: {rotation: {r1: none}}\n", "need a name"),
        ("calibration: {samples: 8}\n", "unknown setting.*in calibration"),
        ("bitz: w4a4kv4\n", "unknown recipe key"),
    ],
)
def test_recipe_typos_are_errors(tmp_path, text, needle):
    from aaq.cli import build_parser
    from aaq.errors import AaqError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe)])
    with pytest.raises(AaqError, match=needle):
        quantize_config(args)


def test_cli_flags_override_the_recipe(tmp_path):
    argv = ["quantize", "--model", "m", "--out", str(tmp_path), "--recipe", str(RECIPES / "aaq_demo.yaml")]
    args = build_parser().parse_args([*argv, "--steps", "7", "--lam", "0.5", "--loss", "kl", "--no-cache"])
    training = quantize_config(args).method.training
    assert (training.steps, training.loss.lam, training.loss.name, training.cache) == (7, 0.5, "kl", False)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "--model", "m", "--out", "o", "--method", "aaq"], r"pass one \(--reference MODEL\)"),
        (["quantize", "--model", "m", "--out", "o", "--method", "ostquant", "--reference", "b"], "--reference MODEL has no effect with method ostquant"),
        (["quantize", "--model", "m", "--out", "o", "--method", "aaq", "--loss", "mse", "--reference", "b"], r"teacher cache off \(--no-cache\)"),
        (["quantize", "--model", "m", "--out", "o", "--recipe", "RECIPES/ostquant_demo.yaml", "--method", "aaq"], "drop --method"),
    ],
)
def test_library_errors_name_the_command_line_option(argv, needle, capsys):
    argv = [a.replace("RECIPES", str(RECIPES)) for a in argv]
    assert main(argv) == 2
    assert re.search(needle, cli_error_line(capsys))


def test_choices_come_from_the_library(capsys):
    from aaq.calibration.losses import LOSS_NAMES
    from aaq.methods import method_names
    from aaq.models.plan import ROTATION_KINDS

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(method_names()) + "}" in text
    assert "{" + ",".join(LOSS_NAMES) + "}" in text and "{" + ",".join(ROTATION_KINDS) + "}" in text


def test_start_of_a_learned_rotation_is_an_option():
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "ostquant", "--r1", "hadamard", "--no-smoothing"])
    transforms = quantize_config(args).method.transforms
    assert transforms.r1 == "hadamard" and transforms.smoothing is False


def test_plan_prints_each_stage_and_what_fits_a_budget(tmp_path, tiny_model_dir, capsys):
    argv = ["plan", "--model", str(tiny_model_dir), "--method", "aaq", "--reference", str(tiny_model_dir), "--device", "cuda", "--dtype", "bfloat16"]
    assert main([*argv, "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    for stage in ("load", "teachers", "calibration", "gptq", "eval", "save"):
        assert f"\n{stage} " in out
    assert "device budget 1.0 GiB: fits as configured" in out
    assert main([*argv, "--budget", "1KiB"]) == 0
    assert "does not fit even with --teacher-batch 1 --sequential-teachers --onload-layers --micro-batch 1 --activation-checkpointing on --step-batch 1" in capsys.readouterr().out
    assert main([*argv[:-4], "--budget", "lots"]) == 2
    assert "--budget" in cli_error_line(capsys)


# --- killed runs resume exactly -------------------------------------------------------------------------------

KILL_RECIPE = """method:
  name: ostquant
  training: {steps: 12, batch_size: 1, checkpoint_every: 2, rotation_lr: 0.0017, scale_lr: 0.00018, loss: {name: kl_top, k: 50}}
bits: w4a4kv4
calibration: {dataset: python-docs, n_samples: 16, seq_len: 48, batch_size: 8}
"""
KILL_LAYERS = 6


@pytest.fixture
def deep_model_dir(tmp_path, tiny_tokenizer):
    """A random 6-layer Llama (hidden 128): enough GPTQ layers to kill a run between two of them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=KILL_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
    )  # fmt: skip
    folder = tmp_path / "deep-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _start_quantize(argv: list[str], log: Path) -> subprocess.Popen:
    """`aaq quantize` in a child process with this checkout's source, one thread, output to `log`."""
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1"}
    with log.open("ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "aaq", "quantize", *argv], env=env, stdout=handle, stderr=handle)


def _kill_when(path: Path, process: subprocess.Popen, log: Path) -> None:
    """SIGKILL `process` as soon as `path` appears (polling), failing if the process ends first."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name} appeared:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_a_run_killed_in_calibration_and_in_gptq_resumes_to_identical_weights(tmp_path, deep_model_dir, fake_data_dir):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(KILL_RECIPE)
    args = ["--model", str(deep_model_dir), "--recipe", str(recipe), "--no-eval"]
    assert main(["quantize", *args, "--out", str(tmp_path / "whole")]) == 0

    out, log = tmp_path / "killed", tmp_path / "killed.log"
    _kill_when(out / "calibration" / "checkpoint.json", _start_quantize([*args, "--out", str(out)], log), log)
    assert not (out / "gptq_progress").exists() and not (out / "run.json").exists()
    _kill_when(out / "gptq_progress" / "layer_0000.safetensors", _start_quantize([*args, "--out", str(out), "--resume"], log), log)
    assert len(list((out / "gptq_progress").glob("layer_*.safetensors"))) < KILL_LAYERS and not (out / "run.json").exists()
    assert main(["quantize", *args, "--out", str(out), "--resume"]) == 0

    assert (out / "aaq_model.safetensors").read_bytes() == (tmp_path / "whole" / "aaq_model.safetensors").read_bytes()
    resumed_at = int(re.search(r"resuming calibration from step (\d+)", log.read_text()).group(1))
    assert 0 < resumed_at < 12
    assert not [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


# --- output folders: aaq writes only into new, empty or its own folders ------------------------------------------


@pytest.fixture
def user_folder(tmp_path):
    """A folder of a user's own files (a transformers model with its report), which aaq must never change."""
    folder = tmp_path / "mine"
    (folder / "old").mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "model.safetensors", "report.json"):
        (folder / name).write_text(f"the user's {name}")
    (folder / "old" / "notes.txt").write_text("keep")
    return folder


def _refused(argv, capsys, folder) -> str:
    """Run `aaq argv`, expecting exit 2 with one error line and `folder` unchanged; returns the error line."""
    before = snapshot(folder) if folder.exists() else None
    assert main(argv) == 2
    line = cli_error_line(capsys)
    assert (snapshot(folder) if folder.exists() else None) == before
    return line


@pytest.mark.parametrize("flags", [[], ["--overwrite"], ["--resume"]])
def test_quantize_never_writes_into_a_folder_of_foreign_files(tmp_path, tiny_model_dir, fake_data_dir, user_folder, flags, capsys):
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(user_folder), *TINY_RUN, *flags]
    line = _refused(argv, capsys, user_folder)
    assert "holds files aaq did not write (config.json, model.safetensors, old/, report.json, tokenizer.json)" in line
    assert "choose an empty or new folder (--out), or move them away" in line


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--model", "MODEL", "--tasks", "ppl", "--out", "OUT"],
        ["report", "RUN", "--out", "OUT"],
        ["export", "RUN", "--out", "OUT"],
        ["export", "RUN", "--format", "compressed-tensors", "--out", "OUT"],
    ],
)
def test_eval_report_and_export_never_write_into_a_folder_of_foreign_files(tmp_path, tiny_model_dir, fake_data_dir, user_folder, command, capsys):
    run = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(run), *TINY_RUN]) == 0
    argv = [{"MODEL": str(tiny_model_dir), "RUN": str(run), "OUT": str(user_folder)}.get(a, a) for a in command]
    assert "holds files aaq did not write" in _refused(argv, capsys, user_folder)


def test_overwrite_replaces_only_what_aaq_wrote_and_says_so(tmp_path, tiny_model_dir, fake_data_dir, capsys, caplog):
    out = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(out), *TINY_RUN]
    assert main(args) == 0
    assert main(["eval", "--model", str(out), "--tasks", "ppl", "--out", str(out / "eval"), *TINY_RUN[4:]]) == 0
    with caplog.at_level("INFO", logger="aaq"):
        assert main([*args, "--overwrite"]) == 0
    assert re.search(r"replacing the aaq output in .*run: removed .*aaq_model.safetensors.*run.json", caplog.text)
    assert (out / "eval" / "report.json").is_file()  # another aaq output nested in the folder is kept
    (out / "mine.txt").write_text("mine")
    assert "(mine.txt)" in _refused([*args, "--overwrite"], capsys, out)


@pytest.mark.parametrize("place", ["file", "under a file"])
def test_an_output_that_is_a_file_is_refused_before_loading(tmp_path, place, capsys, monkeypatch):
    import aaq.workflows.run

    monkeypatch.setattr(aaq.workflows.run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "taken").write_text("x")
    out = tmp_path / "taken" if place == "file" else tmp_path / "taken" / "run"
    line = _refused(["quantize", "--model", "m", "--method", "rtn", "--out", str(out)], capsys, tmp_path)
    assert "is a file" in line and "(--out)" in line


def test_too_little_disk_space_is_refused_before_the_work(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    import shutil

    import aaq.workflows.run

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(aaq.workflows.run, "quantize", lambda *a, **k: pytest.fail("the work started"))
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "aaq", "--reference", str(tiny_model_dir), "--out", str(tmp_path / "run"), *TINY_RUN]
    line = _refused(argv, capsys, tmp_path)
    assert re.search(r"not enough free disk space for .*run: 0 MB free, about \d+ MB needed \(teacher cache .*, weights", line)
    assert not (tmp_path / "run").exists()


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_the_teacher_cache_is_written_is_one_line_and_leaves_no_partial_files(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    monkeypatch.setattr(os, "posix_fallocate", _disk_full)
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "ostquant", "--steps", "2", "--out", str(out), *TINY_RUN]
    assert main(argv) == 2
    line = cli_error_line(capsys)
    assert "could not write the teacher cache in" in line and "(No space left on device); free some disk space" in line
    assert not [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)] and not list((out / "teacher_cache").glob("*.npy"))
    failed = json.loads((out / "failed.json").read_text())
    assert failed["stage"] == "quantize" and "No space left on device" in failed["error"]


def test_a_full_disk_during_the_save_keeps_the_checkpoint_and_the_run_resumes(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    from safetensors import SafetensorError

    import aaq.runs.checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "run"
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "ostquant", "--steps", "2", "--out", str(out), *TINY_RUN]
    with monkeypatch.context() as patch:
        patch.setattr(aaq.runs.checkpoint, "save_file", full)
        assert main(argv) == 2
    line = cli_error_line(capsys)
    assert re.search(r"could not write \S+\.safetensors", line) and "No space left on device" in line
    assert json.loads((out / "failed.json").read_text())["stage"] == "save"
    assert (out / "calibration" / "checkpoint.json").is_file() and not [p for p in out.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    assert "failed in stage save" in _refused(["eval", "--model", str(out), "--tasks", "ppl", "--out", str(tmp_path / "e")], capsys, out)
    assert main([*argv, "--resume"]) == 0
    assert not (out / "failed.json").exists() and (out / "run.json").is_file()


def test_a_weight_file_changed_after_the_run_is_caught_by_its_checksum(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(out), *TINY_RUN]) == 0
    with (out / "aaq_model.safetensors").open("r+b") as handle:
        handle.seek(8192)
        handle.write(bytes(4096))
    line = _refused(["eval", "--model", str(out), "--tasks", "ppl", "--out", str(tmp_path / "e"), *TINY_RUN[4:]], capsys, out)
    assert "aaq_model.safetensors changed after aaq wrote it" in line and "write the folder again (`aaq quantize` or `aaq export`)" in line
    assert "changed after aaq wrote it" in _refused(["export", str(out), "--out", str(tmp_path / "x")], capsys, out)


def test_a_run_killed_during_its_final_save_is_one_line_in_eval_and_cleaned_by_the_next_run(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(out), *TINY_RUN]
    assert main(args) == 0
    # What SIGKILL in save_quantized leaves: no aaq_config.json and no run.json, a half-written temporary file.
    (out / "aaq_config.json").unlink()
    (out / "run.json").unlink()
    orphan = out / f".aaq_model.safetensors.k1ll3d{TEMP_SUFFIX}"
    orphan.write_bytes((out / "aaq_model.safetensors").read_bytes()[:5000])
    line = _refused(["eval", "--model", str(out), "--tasks", "ppl", "--out", str(tmp_path / "e")], capsys, out)
    assert "has no aaq_config.json: it is not a finished aaq run; finish it with `aaq quantize` into that folder with --resume" in line
    assert main([*args, "--resume"]) == 0
    assert not orphan.exists() and (out / "aaq_config.json").is_file()


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    line = _refused(["quantize", "--model", "m", "--method", "rtn", "--out", str(tmp_path / "o"), "--resume", "--overwrite"], capsys, tmp_path)
    assert "--overwrite starts the run afresh" in line


# --- everything checkable is checked before the work ---------------------------------------------------------


def test_a_prompt_file_without_prompts_fails_before_quantizing(tmp_path, tiny_model_dir, fake_data_with_harmbench, capsys, monkeypatch):
    import aaq.workflows.run

    monkeypatch.setattr(aaq.workflows.run, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,category\n1,a\n")
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--out", str(tmp_path / "run"), "--tasks", "refusal", "--harmful-prompts", str(prompts)]
    assert "prompts.csv" in _refused(argv, capsys, tmp_path)
    assert not (tmp_path / "run").exists()


def test_gptq_act_order_with_groups_warns_at_quantize_and_export_names_the_flag(tmp_path, tiny_model_dir, fake_data_dir, capsys, caplog):
    out = tmp_path / "run"
    argv = ["quantize", "--model", str(tiny_model_dir), "--method", "gptq", "--bits", "w4a16", "--weight-group-size", "32", "--no-eval", *TINY_RUN[:4]]
    with caplog.at_level("WARNING", logger="aaq"):
        assert main([*argv, "--out", str(out)]) == 0
    assert "cannot be exported" in caplog.text and "--static-groups" in caplog.text
    line = _refused(["export", str(out), "--out", str(tmp_path / "packed")], capsys, out)
    assert "cannot be exported; quantize with --static-groups (or without act_order)" in line
    assert not (tmp_path / "packed").exists()
    assert main([*argv, "--static-groups", "--out", str(tmp_path / "static")]) == 0
    assert main(["export", str(tmp_path / "static"), "--out", str(tmp_path / "packed")]) == 0


@pytest.mark.parametrize(
    "line,needle",
    [
        ('steps: "16"', r"method.training.steps must be an integer, got '16'"),
        ("seed: zero", "seed must be an integer, got 'zero'"),
        ("momentum: [0.9]", r"method.training.momentum must be a number, got \[0.9\]"),
    ],
)
def test_recipe_values_of_the_wrong_type_are_one_line_errors(tmp_path, line, needle, capsys):
    recipe = tmp_path / "r.yaml"
    key, value = line.split(": ", 1)
    recipe.write_text(f"seed: {value}\n" if key == "seed" else f"method: {{name: ostquant, training: {{{key}: {value}}}}}\n")
    assert re.search(needle, _refused(["quantize", "--model", "m", "--out", str(tmp_path / "o"), "--recipe", str(recipe)], capsys, tmp_path))


def test_recipe_bits_must_be_a_bit_string_and_an_empty_one_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 4\n")
    assert "bits must be a string, got 4" in _refused(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe)], capsys, tmp_path)
    assert "bad bit string ''" in _refused(["quantize", "--model", "m", "--out", "o", "--bits", ""], capsys, tmp_path)
    assert "bad bit string ''" in _refused(["demo", "--bits", "", "--out", str(tmp_path / "d")], capsys, tmp_path)


def test_a_learning_rate_written_like_1e_3_is_a_number(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: ostquant, training: {rotation_lr: 1e-3, scale_lr: 2e-4}}\n")
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe), "--steps", "3"])
    training = quantize_config(args).method.training
    assert (training.rotation_lr, training.scale_lr, training.steps) == (0.001, 0.0002, 3)


def test_a_recipe_for_another_method_keeps_its_file_and_names_the_flag(tmp_path, capsys):
    recipe = tmp_path / "ostquant.yaml"
    recipe.write_text((RECIPES / "ostquant_demo.yaml").read_text())
    line = _refused(["quantize", "--model", "m", "--out", str(tmp_path / "o"), "--recipe", str(recipe), "--method", "aaq"], capsys, tmp_path)
    assert "the recipe is for method ostquant, not aaq; use a recipe for aaq or drop --method" in line


@pytest.mark.parametrize("broken", ["config.json", "weights"])
def test_a_broken_model_folder_is_one_line(tmp_path, tiny_model_dir, broken, capsys):
    if broken == "config.json":
        (tiny_model_dir / "config.json").write_text('{"model_type": "llama",')
    else:
        (tiny_model_dir / "model.safetensors").unlink()
    line = _refused(["eval", "--model", str(tiny_model_dir), "--tasks", "ppl", "--out", str(tmp_path / "e")], capsys, tiny_model_dir)
    assert ("config.json is not valid JSON" in line) if broken == "config.json" else ("has config.json but no weights" in line)


def test_a_hub_id_on_an_offline_machine_fails_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    line = _refused(["eval", "--model", "someone/some-model", "--tasks", "safetybench", "--out", str(tmp_path / "e")], capsys, tmp_path)
    assert time.monotonic() - start < 5
    assert "model 'someone/some-model' is not in the local hub cache and the hub is unavailable (HF_HUB_OFFLINE is set)" in line


def test_an_lmeval_task_without_its_data_fails_before_perplexity(tmp_path, tiny_model_dir, fake_data_dir, capsys, monkeypatch):
    import functools

    import aaq.eval.tasks.lmeval
    import aaq.eval.tasks.perplexity
    from aaq.eval.lmeval import LmEvalConfig

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_mc.yaml").write_text(
        "task: hub_mc\ndataset_path: someone/not-cached\noutput_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: 0\ndoc_to_choice: ["a", "b"]\nmetric_list:\n  - metric: acc\n'
    )
    monkeypatch.setattr(aaq.eval.tasks.lmeval, "LmEvalConfig", functools.partial(LmEvalConfig, include_path=tasks, include_defaults=False))
    monkeypatch.setattr(aaq.eval.tasks.perplexity, "evaluate_perplexity", lambda *a, **k: pytest.fail("perplexity ran"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    out = tmp_path / "fp"
    line = _refused(["eval", "--model", str(tiny_model_dir), "--tasks", "ppl,lmeval:hub_mc", "--out", str(out)], capsys, tmp_path / "tasks")
    assert "the data of lm-eval task(s) hub_mc is not in the local datasets cache and the hub is unavailable" in line
    assert "drop those tasks from --tasks" in line and not out.exists()


@pytest.mark.parametrize("content", ['[{"model": "m"}]', '{"kind": "aaq-comparison"}', '{"a": 1}', "not json"])
def test_report_accepts_only_aaq_reports(tmp_path, content, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(content)
    line = _refused(["report", str(tmp_path / "r"), "--out", str(tmp_path / "cmp")], capsys, tmp_path)
    assert "is not an aaq report" in line or "is not valid JSON" in line
    assert not (tmp_path / "cmp").exists()


def test_report_takes_its_own_comparisons_as_input(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        report = {"model": "m", "method": name, "bits": "w4a4kv4", "metrics": {"ppl": 20.0, "refusal_rate": 0.5}}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    assert main(["report", str(tmp_path / "cmp"), "--out", str(tmp_path / "cmp")]) == 0
    assert [run["method"] for run in json.loads((tmp_path / "cmp" / "report.json").read_text())["runs"]] == ["a", "b"]


def test_optimizer_loss_and_calibration_form_flags_reach_the_config():
    from aaq.cli import build_parser

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "aaq_demo.yaml")
    flags = ["--optimizer", "cayley_sgd", "--rotation-lr", "0.02", "--scale-lr", "0.003", "--top-k", "50",
             "--push-tokens", "reference", "--push-k", "20", "--calib-form", "chat", "--calib-benign-train"]  # fmt: skip
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", recipe, *flags])
    config = quantize_config(args)
    training = config.method.training
    assert (training.optimizer, training.rotation_lr, training.scale_lr) == ("cayley_sgd", 0.02, 0.003)  # the recipe's: riemannian_adam
    assert (training.loss.k, training.loss.push_tokens, training.loss.push_k, training.loss.lam) == (50, "reference", 20, 1.0)
    assert (config.calibration.form, config.calibration.benign_train, config.calibration.n_samples) == ("chat", True, 16)
    assert config.to_dict()["calibration"]["form"] == "chat"


def test_heldout_flags_and_recipe_keys_reach_the_config_and_the_curve_reaches_run_json(tmp_path, tiny_model_dir, fake_data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: ostquant, training: {heldout_windows: 2, heldout_every: 3, heldout_patience: 4}}\n")
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe), "--restore-best", "--heldout-every", "1"])
    training = quantize_config(args).method.training
    assert (training.heldout_windows, training.heldout_every, training.heldout_patience, training.restore_best) == (2, 1, 4, True)

    out = tmp_path / "run"
    flags = ["--steps", "2", "--step-batch", "1", "--heldout-windows", "1", "--heldout-every", "1", "--restore-best", "--no-eval"]
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "ostquant", "--out", str(out), *flags, *TINY_RUN]) == 0
    metrics = json.loads((out / "run.json").read_text())["method_metrics"]
    assert [entry["step"] for entry in metrics["heldout_curve"]] == [0, 1, 2] and metrics["restored_best"]
    best = min(metrics["heldout_curve"], key=lambda entry: entry["heldout_loss"])
    assert metrics["heldout_best_step"] == best["step"]

    start_only = ["--steps", "0", "--heldout-windows", "1", "--no-eval"]  # OSTQuant's start: one held-out measurement, no training loss
    assert main(["quantize", "--model", str(tiny_model_dir), "--method", "ostquant", "--out", str(tmp_path / "start"), *start_only, *TINY_RUN]) == 0
    metrics = json.loads((tmp_path / "start" / "run.json").read_text())["method_metrics"]
    assert [entry["step"] for entry in metrics["heldout_curve"]] == [0] and "loss_first" not in metrics
