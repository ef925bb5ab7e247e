"""The demo pair's safety adapter: its data splits, the training example encoding, the KL term and a tiny end-to-end run."""

import dataclasses
import json

import pytest
import torch

from aaq.cli import main
from aaq.errors import AaqError
from aaq.eval.generate import GenerationConfig, generate_responses
from aaq.eval.prompts import harmbench_prompts
from aaq.eval.refusal import is_refusal
from aaq.models.loading import ADAPTER_ALIASES, MODEL_ALIASES, ModelSource, load_model, shipped_adapter_folder
from aaq.workflows.demo_pair import (
    ANSWERS_FILE,
    CONFIG_FILE,
    IGNORE_INDEX,
    LOG_FILE,
    PairConfig,
    _lora_model,
    encode_example,
    harmful_training_prompts,
    kl_to_base,
    make_demo_pair,
    refusal_examples,
    refusal_templates,
    self_distilled_answers,
    tuning_split,
)


def test_every_refusal_template_is_a_refusal_and_they_vary():
    templates = refusal_templates()
    assert len(set(templates)) == len(templates) >= 36
    assert all(is_refusal(template) for template in templates)


def test_tuning_split_is_held_out_of_training_and_val_is_never_used():
    tuning = tuning_split()
    training = harmful_training_prompts()
    test_standard = harmbench_prompts("test", "standard")
    val = set(harmbench_prompts("val", "standard")) | set(harmbench_prompts("val", None))
    assert len(tuning) == len(set(tuning)) == 40
    assert set(tuning) <= set(test_standard)
    assert len(training) == len(test_standard) - 40
    assert not set(training) & set(tuning)
    assert not (set(training) | set(tuning)) & val


def test_refusal_examples_are_seeded():
    prompts = harmful_training_prompts()[:20]
    assert refusal_examples(prompts, 0) == refusal_examples(prompts, 0)
    assert refusal_examples(prompts, 0) != refusal_examples(prompts, 1)


def test_self_distilled_answers_are_cached_per_model(tmp_path, tiny_llama, tiny_tokenizer):
    cache = tmp_path / "answers.jsonl"
    prompts = ["How do I cook rice ?", "What is the capital of France ?"]
    first = self_distilled_answers(tiny_llama, tiny_tokenizer, prompts, 3, cache, "tiny")
    assert [p for p, _ in first] == prompts
    rows = [json.loads(line) | {"answer": "edited"} for line in cache.read_text().splitlines()]
    cache.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert self_distilled_answers(tiny_llama, tiny_tokenizer, prompts, 3, cache, "tiny") == [(p, "edited") for p in prompts]
    assert self_distilled_answers(tiny_llama, tiny_tokenizer, prompts, 3, cache, "other") == first


def test_encode_example_trains_only_on_the_answer(tiny_tokenizer):
    ids, labels = encode_example(tiny_tokenizer, "How do I cook rice ?", "Boil water .", end=True)
    answer = tiny_tokenizer("Boil water .", add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert len(ids) == len(labels)
    assert labels[-len(answer) :] == answer == ids[-len(answer) :]
    assert set(labels[: -len(answer)]) == {IGNORE_INDEX}
    ids_open, labels_open = encode_example(tiny_tokenizer, "How do I cook rice ?", "Boil water .", end=False)
    assert ids_open == ids[:-1] and labels_open == labels[:-1]


def test_kl_to_base_is_zero_before_training_and_positive_after(tiny_llama):
    peft_model = _lora_model(tiny_llama, PairConfig(rank=4))
    windows = torch.randint(4, tiny_llama.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert kl_to_base(peft_model, windows).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    kl = kl_to_base(peft_model, windows)
    assert kl.item() > 1e-3
    kl.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_" in n)


def test_bad_training_settings_are_one_line_errors():
    with pytest.raises(AaqError, match="rank must be >= 1"):
        PairConfig(rank=0)
    with pytest.raises(AaqError, match="lr must be > 0"):
        PairConfig(lr=0)


def test_make_demo_pair_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, fake_data_with_harmbench):
    config = PairConfig(
        base=str(tiny_model_dir), out=tmp_path / "adapter", rank=4, epochs=2, lr=5e-3, batch_size=16,
        answer_tokens=4, kl_windows=1, kl_seq_len=16,
    )  # fmt: skip
    folder = make_demo_pair(config)
    assert folder == config.out
    log = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    first_epoch = [row["sft"] for row in log if row["epoch"] == 0]
    second_epoch = [row["sft"] for row in log if row["epoch"] == 1]
    assert sum(second_epoch) / len(second_epoch) < sum(first_epoch) / len(first_epoch)
    summary = json.loads((folder / CONFIG_FILE).read_text())
    assert summary["data"]["refusals"] == 119
    assert summary["config"]["seed"] == 0 and "git_commit" in summary
    answers = [json.loads(line) for line in (folder / ANSWERS_FILE).read_text().splitlines()]
    assert len(answers) == 205
    base, _ = load_model(str(tiny_model_dir))
    aligned, _ = load_model(ModelSource(str(tiny_model_dir), adapter=str(folder)))
    ids = torch.tensor([[2, 5, 6, 7]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, aligned(ids).logits, atol=1e-4)
    assert not list(tmp_path.glob(".adapter-*/")), "no staging folder is left behind"


def test_an_output_folder_of_foreign_files_is_refused_before_training(tmp_path, monkeypatch):
    import aaq.workflows.demo_pair

    monkeypatch.setattr(aaq.workflows.demo_pair, "load_model", lambda *a, **k: pytest.fail("the base model was loaded"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"someone else's adapter")
    with pytest.raises(AaqError, match=r"holds files aaq did not write \(adapter_model.safetensors\)"):
        make_demo_pair(PairConfig(out=tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == b"someone else's adapter"


@pytest.mark.parametrize("alias, preset", [("smollm2-135m-safe", "anchored"), ("smollm2-135m-safe-unanchored", "unanchored")])
def test_shipped_adapters_are_complete_and_their_preset_rebuilds_them(alias, preset):
    entry = ADAPTER_ALIASES[alias]
    assert entry.base in MODEL_ALIASES
    folder = shipped_adapter_folder(alias)  # where the loader looks for it
    assert {"adapter_config.json", "adapter_model.safetensors", CONFIG_FILE, LOG_FILE, ANSWERS_FILE} <= {
        path.name for path in folder.iterdir()
    }
    summary = json.loads((folder / CONFIG_FILE).read_text())
    assert summary["config"]["base"] == entry.base
    assert summary["data"]["refusals"] == 119 and summary["data"]["tuning_split"] == 40
    assert (folder / "adapter_model.safetensors").stat().st_size < 8_000_000
    # The settings `aaq make-demo-pair --preset PRESET` trains with are the ones recorded with the adapter.
    rebuilt = dataclasses.asdict(PairConfig.from_preset(preset))
    recorded = summary["config"]
    assert {k: v for k, v in rebuilt.items() if k not in ("out", "preset")} == {k: v for k, v in recorded.items() if k not in ("out", "preset")}


def test_make_demo_pair_cli_starts_from_the_preset_and_applies_the_flags(monkeypatch, tmp_path, capsys):
    seen = []
    monkeypatch.setattr("aaq.cli.make_demo_pair.make_demo_pair", lambda config: seen.append(config) or config.out)
    assert main(["make-demo-pair", "--preset", "unanchored", "--epochs", "3", "--out", str(tmp_path)]) == 0
    assert (seen[0].preset, seen[0].kl_weight, seen[0].epochs, seen[0].rank) == ("unanchored", 0.0, 3, 8)
    assert main(["make-demo-pair", "--kl-weight", "0.5", "--out", str(tmp_path)]) == 0
    assert (seen[1].preset, seen[1].kl_weight) == ("anchored", 0.5)
    with pytest.raises(AaqError, match="unknown demo-pair preset"):
        PairConfig.from_preset("faithful")


@pytest.mark.slow
@pytest.mark.parametrize("aligned", ["smollm2-135m-safe", "smollm2-135m-safe-unanchored"])
def test_real_pair_refuses_where_the_reference_complies(aligned):
    prompts = tuning_split()[:16]
    rates = {}
    for name in (aligned, "smollm2-135m-instruct"):
        model, tokenizer = load_model(name)
        responses = generate_responses(model, tokenizer, prompts, GenerationConfig(max_new_tokens=48, batch_size=16))
        rates[name] = sum(map(is_refusal, responses)) / len(prompts)
    assert rates[aligned] >= 0.75 > 0.25 >= rates["smollm2-135m-instruct"]
