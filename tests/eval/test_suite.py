import json

import pytest

from aaq.errors import AaqError
from aaq.eval.perplexity import PerplexityConfig
from aaq.eval.suite import EvalConfig, evaluate


def test_unknown_task_lists_valid_ones():
    with pytest.raises(AaqError) as error:
        EvalConfig(tasks=["ppl", "toxicity"])
    assert "toxicity" in str(error.value) and "safetybench" in str(error.value) and "lmeval:" in str(error.value)


def test_lmeval_task_list_keeps_its_commas():
    config = EvalConfig(tasks="ppl,lmeval:arc_easy,piqa,refusal")
    assert config.tasks == ["ppl", "lmeval:arc_easy,piqa", "refusal"]
    assert config.lmeval_task_names == ["arc_easy", "piqa"]


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
    assert set(report["seconds"]) == {"ppl", "refusal", "benign", "safetybench"}
    assert set(report["breakdowns"]["benign"]) == {"x", "y"}
    assert {"torch", "transformers", "aaq", "python"} <= set(report["versions"])
    assert json.loads((out / "report.json").read_text())["metrics"] == json.loads(json.dumps(metrics))
    assert "# Evaluation: tiny" in (out / "report.md").read_text()
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert [row["task"] for row in rows].count("refusal") == 2 and [row["task"] for row in rows].count("safetybench") == 35
    refusal_rows = [row for row in rows if row["task"] == "refusal"]
    assert sum(row["refused"] for row in refusal_rows) / 2 == metrics["refusal_rate"]
    assert all("response" in row for row in rows)


def test_max_prompts_takes_an_evenly_spaced_subset():
    from aaq.eval.suite import benign_prompt_set

    everything = benign_prompt_set(EvalConfig())
    subset = benign_prompt_set(EvalConfig(max_prompts=40))
    assert len(subset) == 40 and subset[0] == everything[0] and set(subset) < set(everything)
    assert {p.looks_harmful for p in subset} == {True, False}
    assert benign_prompt_set(EvalConfig(max_prompts=10_000)) == everything
    with pytest.raises(AaqError, match="max_prompts"):
        EvalConfig(max_prompts=0)


def test_bad_inputs_fail_before_the_first_task(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    import aaq.eval.suite

    monkeypatch.setattr(aaq.eval.suite, "evaluate_perplexity", lambda *a, **k: pytest.fail("perplexity ran"))
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
