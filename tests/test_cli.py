"""The command line: a tiny end-to-end quantize -> eval run, and one-line errors for bad input."""

import json
import math
from pathlib import Path

import pytest

from aaq.cli import main
from aaq.quantizers import QuantScheme

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
    assert report["metric_definitions"]["garbled_rate"].startswith("garbled answers / harmful prompts")
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
    assert "does not record its source model; pass --scorer MODEL" in _error_line(capsys)
    assert main(["eval", "--model", str(run), "--scorer", str(tmp_path / "gone"), "--out", str(tmp_path / "e"), *_prompt_files(tmp_path)]) == 2
    assert "cannot load the scorer" in _error_line(capsys)
    assert main(["eval", "--model", str(run), "--scorer", str(tiny_model_dir), "--out", str(tmp_path / "e"), *_prompt_files(tmp_path)]) == 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["coherence"]["scorer"] == str(tiny_model_dir)


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
    recipe.write_text("method: {name: quarot, weight_quantizer: rtn, rotation: {r1: hadamard}}\nbits: w4a8kv8\nseed: 5\n")
    args = build_parser().parse_args(["quantize", "--model", "m", "--out", "o", "--recipe", str(recipe), "--no-r4", "--damp", "0.1"])
    config = quantize_config_from_args(args)
    assert config.bits == "w4a8kv8" and config.seed == 5
    assert config.method.rotation.r1 == "hadamard" and config.method.rotation.r4 is False
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
    assert len(json.loads((out / "report.json").read_text())) == 2


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--method", "rtn", "--damp", "0.1"], "--damp has no effect with method rtn"),
        (["--method", "gptq", "--no-r4"], "--no-r4 has no effect with method gptq"),
        (["--method", "quarot", "--steps", "5"], "--steps has no effect with method quarot"),
        (["--bits", "w4a16", "--a-clip", "0.9"], "--a-clip has no effect with 16-bit activations"),
        (["--bits", "w8a8", "--kv-clip", "0.9"], "--kv-clip has no effect with a 16-bit KV cache"),
        (["--method", "ostquant", "--r1", "random"], "--r1 has no effect with method ostquant"),
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
