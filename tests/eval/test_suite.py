import json

import pytest

from aaq.errors import AaqError
from aaq.eval.coherence import CoherenceScorer
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig, evaluate
from aaq.eval.tasks.benign import benign_prompt_set
from aaq.eval.tasks.refusal import harmful_prompt_sets


def test_unknown_task_lists_valid_ones():
    with pytest.raises(AaqError) as error:
        EvalConfig(tasks=["ppl", "toxicity"])
    assert "toxicity" in str(error.value) and "safetybench" in str(error.value) and "lmeval:" in str(error.value)


def test_lmeval_task_list_keeps_its_commas():
    config = EvalConfig(tasks="ppl,lmeval:arc_easy,piqa,refusal")
    assert config.tasks == ["ppl", "lmeval:arc_easy,piqa", "refusal"]
    assert [(task.name, task.arguments) for task in config.selected_tasks()] == [("ppl", ""), ("lmeval", "arc_easy,piqa"), ("refusal", "")]


def test_configured_judge_must_be_passed(tiny_llama, tiny_tokenizer):
    with pytest.raises(AaqError, match="judge"):
        evaluate(tiny_llama, tiny_tokenizer, EvalConfig(tasks=["refusal"], judge="some-judge"))


def test_evaluate_writes_report_and_auditable_generations(tmp_path, tiny_llama, tiny_tokenizer):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("How do I cook rice ?\nWhat is the capital of France ?\n")
    benign = tmp_path / "benign.jsonl"
    benign.write_text('{"prompt": "Is this safe ?", "category": "x", "looks_harmful": true}\n{"prompt": "Sure", "category": "y"}\n')
    config = EvalConfig(
        tasks=["ppl", "refusal", "benign", "safetybench"],
        harmful_prompts=str(harmful),
        benign_prompts=str(benign),
        max_new_tokens=4,
        batch_size=8,
        ppl=PerplexityConfig(n_samples=2, seq_len=16, batch_size=2),
    )
    out = tmp_path / "run"
    report = evaluate(tiny_llama, tiny_tokenizer, config, out, meta={"model": "tiny", "method": "fp", "bits": "w16a16"})
    assert (report["model"], report["method"], report["bits"], report["seed"]) == ("tiny", "fp", "w16a16", 0)
    metrics = report["metrics"]
    assert metrics["ppl"] > 1 and 0 <= metrics["refusal_rate"] <= 1 and 0 <= metrics["benign_compliance"] <= 1
    assert 0 <= metrics["safetybench_acc"] <= 1
    assert report["n_items"]["refusal"] == 2 and report["n_items"]["benign"] == 2 and report["n_items"]["safetybench"] == 35
    assert set(report["seconds"]) == {"ppl", "refusal", f"refusal:{harmful}", "benign", "safetybench", "coherence_calibration"}
    assert set(report["breakdowns"]["benign"]) == {"x", "y"}
    assert {"torch", "transformers", "aaq", "python"} <= set(report["versions"])
    assert json.loads((out / "report.json").read_text())["metrics"] == json.loads(json.dumps(metrics))
    assert "# Evaluation: tiny" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [row["task"] for row in rows].count("refusal") == 2 and [row["task"] for row in rows].count("safetybench") == 35
    refusal_rows = [row for row in rows if row["task"] == "refusal"]
    assert sum(row["refused"] for row in refusal_rows) / 2 == metrics["refusal_rate"]
    assert all("response" in row for row in rows)
    # The unquantized model scores its own answers; the report says so and defines every metric it carries.
    assert report["coherence"]["check"] and report["coherence"]["scorer"] == "tiny" and report["coherence"]["threshold"] > 0
    assert set(metrics) - {"refusal_by_set"} == set(report["metric_definitions"])
    assert {row["verdict"] for row in rows if row["task"] != "safetybench"} <= {"refused", "complied", "garbled"}


class KeywordJudge:
    """Refuses exactly the prompts that mention France, whatever the answer."""

    name = "keyword"

    def verdicts(self, prompts, responses):
        return ["France" in prompt for prompt in prompts]


def test_four_verdicts_are_counted_in_a_suite_run(tmp_path, tiny_llama, fluent_tiny_llama, tiny_tokenizer):
    harmful = tmp_path / "harmful.txt"
    harmful.write_text("What is the capital of France ?\nHow do I cook rice ?\nIs this safe ?\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("The quick brown fox jumps over the lazy dog .\nIs this safe ?\n")
    config = EvalConfig(tasks="refusal,benign", harmful_prompts=str(harmful), benign_prompts=str(benign), max_new_tokens=8)
    scorer = CoherenceScorer(fluent_tiny_llama, tiny_tokenizer, "fluent")
    threshold = scorer.calibration(config.generation).threshold
    # The untrained model's answers are word salad to the trained scorer; the scorer's own answers are not.
    damaged = evaluate(tiny_llama, tiny_tokenizer, config, tmp_path / "damaged", judge=KeywordJudge(), scorer=scorer)
    fluent = evaluate(fluent_tiny_llama, tiny_tokenizer, config, tmp_path / "fluent", judge=KeywordJudge(), scorer=scorer)
    # The damaged model's keyword refusal is word salad too: refused_garbled, not a clean refusal.
    assert damaged["details"]["refusal"]["verdicts"] == {"refused": 0, "refused_garbled": 1, "complied": 0, "garbled": 2}
    assert damaged["details"]["benign"]["verdicts"] == {"refused": 0, "refused_garbled": 0, "complied": 0, "garbled": 2}
    assert fluent["details"]["refusal"]["verdicts"] == {"refused": 1, "refused_garbled": 0, "complied": 2, "garbled": 0}
    assert fluent["details"]["benign"]["verdicts"] == {"refused": 0, "refused_garbled": 0, "complied": 2, "garbled": 0}
    rates = ("refusal_rate", "refused_garbled_rate", "harmful_complied_rate", "garbled_rate", "benign_compliance", "benign_refusal_rate", "benign_garbled_rate")
    assert [damaged["metrics"][name] for name in rates] == pytest.approx([0.0, 1 / 3, 0.0, 2 / 3, 0.0, 0.0, 1.0])
    assert [fluent["metrics"][name] for name in rates] == pytest.approx([1 / 3, 0.0, 2 / 3, 0.0, 1.0, 0.0, 0.0])
    assert damaged["coherence"]["threshold"] == threshold and damaged["coherence"]["scorer"] == "fluent"
    rows = [json.loads(line) for line in (tmp_path / "damaged" / "generations.jsonl").read_text().splitlines()]
    assert [row["verdict"] for row in rows] == ["refused_garbled", "garbled", "garbled", "garbled", "garbled"]
    assert all(row["nll"] > threshold for row in rows)  # refusals are scored too
    assert {row["prompt_set"] for row in rows} == {str(harmful), None}


def test_several_harmful_sets_are_reported_one_by_one_and_pooled(tmp_path, fluent_tiny_llama, tiny_tokenizer):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("What is the capital of France ?\n")
    second.write_text("How do I cook rice ?\nIs this safe ?\nThe quick brown fox jumps over the lazy dog .\n")
    config = EvalConfig(tasks="refusal", harmful_prompts=f"{first},{second}", max_new_tokens=6)
    report = evaluate(fluent_tiny_llama, tiny_tokenizer, config, judge=KeywordJudge())
    assert report["metrics"]["refusal_by_set"] == {
        str(first): {"refusal_rate": 1.0, "harmful_complied_rate": 0.0, "refused_garbled_rate": 0.0, "garbled_rate": 0.0, "n": 1},
        str(second): {"refusal_rate": 0.0, "harmful_complied_rate": 1.0, "refused_garbled_rate": 0.0, "garbled_rate": 0.0, "n": 3},
    }
    assert report["metrics"]["refusal_rate"] == 0.25 and report["metrics"]["harmful_complied_rate"] == 0.75 and report["n_items"]["refusal"] == 4
    assert report["breakdowns"]["refusal"] == {str(first): 1.0, str(second): 0.0}
    assert report["breakdowns"][f"refusal:{first}"] == {"all": 1.0}


def test_harmful_sets_by_name_and_their_errors():
    sets = harmful_prompt_sets(EvalConfig(harmful_prompts="harmbench-val, advbench"))
    assert {name: len(prompts) for name, prompts in sets.items()} == {"harmbench-val": 41, "advbench": 520}
    assert list(harmful_prompt_sets(EvalConfig())) == ["harmbench-val"]
    assert [len(p) for p in harmful_prompt_sets(EvalConfig(harmful_prompts="advbench,harmbench-tuning", max_prompts=30)).values()] == [30, 30]
    with pytest.raises(AaqError, match="unknown harmful prompt set 'advbnch'; use harmbench-val, harmbench-tuning, advbench"):
        EvalConfig(harmful_prompts="harmbench-val,advbnch")
    with pytest.raises(AaqError, match="name each set once"):
        EvalConfig(harmful_prompts="advbench,advbench")


def test_a_quantized_model_needs_a_scorer_or_the_check_off(tiny_llama, tiny_tokenizer):
    from aaq.api import QuantizeConfig, quantize
    from aaq.methods import RTNConfig

    quantize(tiny_llama, QuantizeConfig(method=RTNConfig(), bits="w4a16"), tokenizer=tiny_tokenizer)
    with pytest.raises(AaqError, match="cannot score its own answers"):
        evaluate(tiny_llama, tiny_tokenizer, EvalConfig(tasks="refusal", max_new_tokens=2))
    report = evaluate(tiny_llama, tiny_tokenizer, EvalConfig(tasks="refusal", max_new_tokens=2, garbled_check=False))
    assert report["coherence"] == {"check": False, "reason": "turned off"} and report["metrics"]["garbled_rate"] is None


def test_max_prompts_takes_an_evenly_spaced_subset():
    everything = benign_prompt_set(EvalConfig())
    subset = benign_prompt_set(EvalConfig(max_prompts=40))
    assert len(subset) == 40 and subset[0] == everything[0] and set(subset) < set(everything)
    assert {p.looks_harmful for p in subset} == {True, False}
    assert benign_prompt_set(EvalConfig(max_prompts=10_000)) == everything
    with pytest.raises(AaqError, match="max_prompts"):
        EvalConfig(max_prompts=0)


def test_bad_inputs_fail_before_the_first_task(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    import aaq.eval.tasks.perplexity

    monkeypatch.setattr(aaq.eval.tasks.perplexity, "evaluate_perplexity", lambda *a, **k: pytest.fail("perplexity ran"))
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,category\n1,a\n")
    config = EvalConfig(tasks="ppl,refusal", harmful_prompts=str(prompts))
    with pytest.raises(AaqError, match="prompts.csv"):
        evaluate(tiny_llama, tiny_tokenizer, config, tmp_path / "out")
    with pytest.raises(AaqError, match="SafetyBench file .* does not exist"):
        evaluate(tiny_llama, tiny_tokenizer, EvalConfig(tasks="ppl,safetybench", safetybench=str(tmp_path / "none.json")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_judge_that_does_not_exist_fails_before_any_model_work(tmp_path):
    from aaq.eval.suite import prepare_inputs

    with pytest.raises(AaqError, match="model path .*no-judge does not exist"):
        prepare_inputs(EvalConfig(tasks="refusal", judge=str(tmp_path / "no-judge")))


def test_a_scorer_loaded_after_the_quantized_model_is_freed_gives_the_verdicts_of_one_loaded_beside_it(tmp_path, tiny_llama, fluent_tiny_llama, tiny_tokenizer):
    import copy

    from aaq.api import QuantizeConfig, quantize
    from aaq.methods import RTNConfig
    from aaq.quant.fake_quant import release_weights

    harmful = tmp_path / "harmful.txt"
    harmful.write_text("What is the capital of France ?\nHow do I cook rice ?\nIs this safe ?\n")
    benign = tmp_path / "benign.txt"
    benign.write_text("The quick brown fox jumps over the lazy dog .\nIs this safe ?\nSure\n")
    config = EvalConfig(tasks="ppl,refusal,benign,safetybench", harmful_prompts=str(harmful), benign_prompts=str(benign), max_new_tokens=6,
                        ppl=PerplexityConfig(n_samples=2, seq_len=16, batch_size=2))  # fmt: skip
    quantize(tiny_llama, QuantizeConfig(method=RTNConfig(), bits="w4a16"), tokenizer=tiny_tokenizer)
    beside = evaluate(copy.deepcopy(tiny_llama), tiny_tokenizer, config, tmp_path / "beside", judge=KeywordJudge(),
                      scorer=CoherenceScorer(fluent_tiny_llama, tiny_tokenizer, "fluent"))  # fmt: skip
    events = []

    def load_scorer():
        events.append(("load", tiny_llama.lm_head.weight.device.type))
        return CoherenceScorer(fluent_tiny_llama, tiny_tokenizer, "fluent")

    def release():
        events.append(("release", tiny_llama.lm_head.weight.device.type))
        release_weights(tiny_llama)

    after = evaluate(tiny_llama, tiny_tokenizer, config, tmp_path / "after", judge=KeywordJudge(), scorer=load_scorer, release_model=release)
    assert events == [("release", "cpu"), ("load", "meta")]
    assert all(p.device.type == "meta" for p in tiny_llama.parameters())
    timing = {"seconds", "cached"}

    def untimed(record: dict) -> dict:
        return {k: untimed(v) if isinstance(v, dict) else v for k, v in record.items() if k not in timing}

    for part in ("metrics", "details", "breakdowns", "n_items", "coherence"):
        assert untimed(after[part]) == untimed(beside[part]), part
    assert after["details"]["benign"]["verdicts"]["complied"] < 3  # the answers were scored (the untrained model's are word salad)
    assert (tmp_path / "after" / "generations.jsonl").read_text() == (tmp_path / "beside" / "generations.jsonl").read_text()
    assert "scorer_load" in after["seconds"] and "scorer_load" not in beside["seconds"]
