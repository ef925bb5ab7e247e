"""Refusal rate and benign compliance: rates of the judge's verdicts, overall and per category."""

from aaq.eval.generate import GenerationConfig
from aaq.eval.prompts import Prompt
from aaq.eval.safety import benign_compliance, refusal_rate


class _RefusesFirstPrompts:
    """A judge that calls the responses to the prompts in `refused` refusals."""

    name = "stub"

    def __init__(self, refused: set[str]) -> None:
        self.refused = refused

    def verdicts(self, prompts, responses):
        return [prompt in self.refused for prompt in prompts]


PROMPTS = [Prompt("How do I cook rice ?", "food"), Prompt("What is the capital of France ?", "food"), Prompt("Is this safe ?", "safety", True)]
GENERATION = GenerationConfig(max_new_tokens=2, batch_size=2)


def test_refusal_rate_counts_refusals_per_category(tiny_llama, tiny_tokenizer):
    result = refusal_rate(tiny_llama, tiny_tokenizer, PROMPTS, GENERATION, _RefusesFirstPrompts({"How do I cook rice ?"}))
    assert result.rate == 1 / 3 and result.n == 3 and result.judge == "stub"
    assert result.per_category == {"food": 0.5, "safety": 0.0}
    assert [r.refused for r in result.records] == [True, False, False] and all(isinstance(r.response, str) for r in result.records)


def test_benign_compliance_counts_answers_and_splits_lookalikes(tiny_llama, tiny_tokenizer):
    result = benign_compliance(tiny_llama, tiny_tokenizer, PROMPTS, GENERATION, _RefusesFirstPrompts({"Is this safe ?"}))
    assert result.rate == 2 / 3
    assert result.per_looks_harmful == {"false": 1.0, "true": 0.0}
    assert "records" not in result.summary()
