"""The command line: a tiny end-to-end quantize -> eval run, and one-line errors for bad input."""

import json
import math
import re
from pathlib import Path

import pytest

from aaq.cli import build_parser, main, quantize_config_from_args
from aaq.quantizers import QuantScheme

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
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


def test_existing_run_is_not_overwritten_silently(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "w4a16", "--out", str(out), *TINY_RUN]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aaq: error: ")
    return last


def test_bad_bit_string_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["quantize", "--model", str(tiny_model_dir), "--bits", "w4x4", "--out", str(tmp_path / "o")]) == 2
    assert "w4a4kv4" in _error_line(capsys)


def test_missing_model_path_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "ppl", "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in _error_line(capsys)


def test_unknown_architecture_is_one_line(tmp_path, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    capsys.readouterr()
    assert main(["quantize", "--model", str(folder), "--method", "rtn", "--out", str(tmp_path / "o"), "--no-eval"]) == 2
    assert "unsupported architecture GPT2LMHeadModel" in _error_line(capsys)


def test_unknown_eval_task_is_one_line(tmp_path, tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "ppl,mmlu", "--out", str(tmp_path / "o")]) == 2
    assert "mmlu" in _error_line(capsys)


def test_recipe_and_flags_combine(tmp_path):
    from aaq.cli import build_parser, quantize_config_from_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: {name: quarot, weight_quantizer: rtn, transforms: {r1: hadamard}}\nbits: w4a8kv8\nseed: 5\n")
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe), "--no-r4", "--damp", "0.1"])
    config = quantize_config_from_args(args)
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
    ],
)
def test_flags_that_would_be_ignored_are_errors(flags, needle):
    from aaq.cli import build_parser, quantize_config_from_args
    from aaq.errors import AaqError

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", *flags])
    with pytest.raises(AaqError, match=needle):
        quantize_config_from_args(args)


def test_online_hadamard_flags_reach_the_learned_methods():
    from aaq.cli import build_parser, quantize_config_from_args

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "ostquant", "--no-r4"])
    assert quantize_config_from_args(args).method.transforms.r4 is False


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
    from aaq.cli import build_parser, quantize_config_from_args

    recipe_dir = Path(__file__).resolve().parents[1]
    flags = [str(recipe_dir / f) if f.startswith("recipes/") else f for f in flags]
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "aaq", *flags])
    config = quantize_config_from_args(args)
    assert config.method.calibrates_quantized_weights(QuantScheme.from_string(config.bits)) is in_loop
    assert config.method.training.activation_checkpointing is checkpointing


def test_calibration_mode_flags_are_rejected_where_nothing_is_calibrated():
    from aaq.cli import build_parser, quantize_config_from_args
    from aaq.errors import AaqError

    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "quarot", "--activation-checkpointing", "on"])
    with pytest.raises(AaqError, match="--activation-checkpointing has no effect"):
        quantize_config_from_args(args)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("method: {name: aaq, trainig: {steps: 5}}\n", "unknown setting"),
        ("method: {rotation: {r1: none}}\n", "need a name"),
        ("calibration: {samples: 8}\n", "unknown calibration setting"),
        ("bitz: w4a4kv4\n", "unknown recipe key"),
    ],
)
def test_recipe_typos_are_errors(tmp_path, text, needle):
    from aaq.cli import build_parser, quantize_config_from_args
    from aaq.errors import AaqError

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe)])
    with pytest.raises(AaqError, match=needle):
        quantize_config_from_args(args)


def test_cli_flags_override_the_recipe(tmp_path):
    argv = ["quantize", "--model", "m", "--out", str(tmp_path), "--recipe", str(RECIPES / "aaq_demo.yaml")]
    args = build_parser().parse_args(argv + ["--steps", "7", "--lam", "0.5", "--loss", "kl", "--no-cache"])
    training = quantize_config_from_args(args).method.training
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
    assert re.search(needle, _error_line(capsys))


def test_choices_come_from_the_library(capsys):
    from aaq.losses import LOSS_NAMES
    from aaq.methods import method_names
    from aaq.plan import ROTATION_KINDS

    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{" + ",".join(method_names()) + "}" in text
    assert "{" + ",".join(LOSS_NAMES) + "}" in text and "{" + ",".join(ROTATION_KINDS) + "}" in text


def test_start_of_a_learned_rotation_is_an_option():
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--method", "ostquant", "--r1", "hadamard", "--no-smoothing"])
    transforms = quantize_config_from_args(args).method.transforms
    assert transforms.r1 == "hadamard" and transforms.smoothing is False


def test_plan_prints_each_stage_and_what_fits_a_budget(tmp_path, tiny_model_dir, capsys):
    argv = ["plan", "--model", str(tiny_model_dir), "--method", "aaq", "--reference", str(tiny_model_dir), "--device", "cuda", "--dtype", "bfloat16"]
    assert main([*argv, "--budget", "1GiB"]) == 0
    out = capsys.readouterr().out
    for stage in ("load", "teachers", "calibration", "gptq", "eval", "save"):
        assert f"\n{stage} " in out
    assert "device budget 1.0 GiB: fits as configured" in out
    assert main([*argv, "--budget", "1KiB"]) == 0
    assert "does not fit even with --teacher-batch 1 --activation-checkpointing on --step-batch 1" in capsys.readouterr().out
    assert main([*argv[:-4], "--budget", "lots"]) == 2
    assert "--budget" in _error_line(capsys)
