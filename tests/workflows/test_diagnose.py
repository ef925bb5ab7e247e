"""Pair diagnostics on tiny models where the answer is known."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from aaq.api import CalibrationConfig, calibration_windows
from aaq.calibration.pair_stats import PushSet
from aaq.cli import build_parser, main
from aaq.cli.diagnose import diagnostics_config
from aaq.errors import AaqError
from aaq.eval.generate import chat_texts
from aaq.eval.prompts import harmbench_tuning_records
from aaq.workflows.diagnose import BENIGN, CALIBRATION, HARMFUL, DiagnosticsConfig, diagnose_pair

CAL = CalibrationConfig(dataset="python-docs", n_samples=3, seq_len=16, batch_size=2)
SMALL = DiagnosticsConfig(calibration=CAL, push=PushSet("diff", 5), push_ks=(2, 5), answer_tokens=1, max_prompts=2)


@pytest.fixture
def perturbed(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return reference


def test_identical_models_differ_nowhere_and_get_the_warning(fake_data_dir, tiny_llama, tiny_tokenizer):
    result = diagnose_pair(tiny_llama, copy.deepcopy(tiny_llama), tiny_tokenizer, SMALL)
    assert [t.name for t in result.texts] == [CALIBRATION, BENIGN, HARMFUL]
    for text in result.texts:
        assert text.summary.kl == pytest.approx(0.0, abs=1e-7)
        assert all(s.contrast == pytest.approx(0.0, abs=1e-7) for s in text.summary.push)
    assert result.warning is not None and "nothing to see on the calibration windows" in result.warning
    assert "diff@5" in result.warning


def test_calibration_figures_are_those_of_the_run_windows(fake_data_dir, tiny_llama, tiny_tokenizer, perturbed):
    result = diagnose_pair(tiny_llama, perturbed, tiny_tokenizer, SMALL)
    windows = calibration_windows(tiny_tokenizer, CAL, seed=0)
    with torch.no_grad():
        log_a = tiny_llama(windows).logits.log_softmax(-1).reshape(-1, len(tiny_tokenizer))
        log_b = perturbed(windows).logits.log_softmax(-1).reshape(-1, len(tiny_tokenizer))
    hand_kl = F.kl_div(log_b, log_a, log_target=True, reduction="batchmean").item()
    calibration = result.of(CALIBRATION).summary
    assert calibration.positions == 3 * 16 and calibration.kl == pytest.approx(hand_kl, rel=1e-4)
    ref_top2 = (log_b.exp().topk(2, dim=-1).values.sum(-1)).mean().item()
    assert calibration.of(PushSet("reference", 2)).mass == pytest.approx(ref_top2, rel=1e-4)
    assert [s.push.label for s in calibration.push] == ["diff@2", "diff@5", "reference@2", "reference@5", "vocab"]
    assert result.warning is None and calibration.of(PushSet("diff", 5)).contrast > 0.01


def test_harmful_figures_are_taken_at_the_first_answer_tokens_of_the_tuning_split(fake_data_dir, tiny_llama, tiny_tokenizer, perturbed):
    config = DiagnosticsConfig(calibration=CAL, push=PushSet("vocab", None), push_ks=(3,), answer_tokens=1, max_prompts=1)
    result = diagnose_pair(tiny_llama, perturbed, tiny_tokenizer, config)
    prompt = chat_texts(tiny_tokenizer, [harmbench_tuning_records()[0].text])[0]
    ids = tiny_tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        log_a = tiny_llama(ids).logits[0, -1].log_softmax(-1)
        log_b = perturbed(ids).logits[0, -1].log_softmax(-1)
    hand = (log_a.exp() * (log_a - log_b)).sum().item()
    harmful = result.of(HARMFUL)
    assert harmful.summary.positions == 1
    assert harmful.summary.kl == pytest.approx(hand, rel=1e-4) and harmful.first_token_kl == pytest.approx(hand, rel=1e-4)
    assert "1 HarmBench test tuning-split behaviours" in harmful.description


def test_answer_tokens_extend_the_measured_positions(fake_data_dir, tiny_llama, tiny_tokenizer, perturbed):
    config = DiagnosticsConfig(calibration=CAL, push=PushSet("diff", 5), push_ks=(5,), answer_tokens=3, max_prompts=2)
    result = diagnose_pair(tiny_llama, perturbed, tiny_tokenizer, config)
    for name in (BENIGN, HARMFUL):
        text = result.of(name)
        assert text.summary.positions == 2 * 3
        assert text.first_token_kl != pytest.approx(text.summary.kl)
    table = result.table()
    assert "| diff@5 (the run's) |" in table and "harmful chat contrast" in table
    assert json.loads(json.dumps(result.to_dict()))["texts"][2]["positions"] == 6


def test_bad_settings_are_one_line_errors():
    with pytest.raises(AaqError, match="answer_tokens"):
        DiagnosticsConfig(answer_tokens=0)
    with pytest.raises(AaqError, match="max_prompts"):
        DiagnosticsConfig(max_prompts=0)


def test_cli_reads_the_recipe_and_flags(capsys, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "method: {name: aaq, training: {loss: {name: apc, k: 50, push_tokens: reference, push_k: 20}}}\n"
        "calibration: {dataset: python-docs, n_samples: 4, seq_len: 64}\nseed: 3\n"
    )
    base = ["diagnose", "--model", "a", "--reference", "b", "--recipe", str(recipe)]
    config = diagnostics_config(build_parser().parse_args(base))
    assert (config.push, config.seed, config.calibration.n_samples) == (PushSet("reference", 20), 3, 4)
    vocab = diagnostics_config(build_parser().parse_args([*base, "--push-tokens", "vocab"]))
    assert vocab.push == PushSet("vocab", None)  # the recipe's push_k 20 is dropped with it
    flags = ["--push-tokens", "vocab", "--push-k", "7", "--calib-form", "chat", "--push-ks", "5,50"]
    with pytest.raises(AaqError, match="no effect"):
        diagnostics_config(build_parser().parse_args(base + flags))
    config = diagnostics_config(build_parser().parse_args(base + flags[2:] + ["--push-tokens", "diff", "--seed", "1"]))
    assert (config.push, config.calibration.form, config.push_ks, config.seed) == (PushSet("diff", 7), "chat", (5, 50), 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--push-ks", "5,x"])
    assert "argument --push-ks: must be a comma list of positive integers, got '5,x'; see aaq diagnose --help" in capsys.readouterr().err


def test_cli_prints_the_tables_and_writes_them(tmp_path, tiny_model_dir, fake_data_dir, capsys):
    out = tmp_path / "diag"
    argv = ["diagnose", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--calib-samples", "2",
            "--calib-seq-len", "16", "--calib-dataset", "python-docs", "--max-prompts", "2", "--answer-tokens", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| calibration: python-docs raw, 2 x 16 tokens, seed 0 | 32 | 0.0000 |" in printed
    assert "WARNING: the push has nothing to see" in printed
    record = json.loads((out / "diagnostics.json").read_text())
    assert record["model"] == str(tiny_model_dir) and record["seed"] == 0 and "versions" in record
    assert record["texts"][0]["kl"] == 0.0 and record["warning"].startswith("the push has nothing to see")
    assert (out / "diagnostics.md").read_text().startswith("# Pair diagnostics")
