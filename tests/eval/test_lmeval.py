import json

import pytest
import torch

from aaq.errors import AaqError
from aaq.eval.lmeval import LmEvalConfig, lmeval_tasks

ITEMS = [
    {"question": "What is the capital of France ?", "choices": ["Paris", "rice", "dog"], "answer": 0},
    {"question": "How do I cook rice ?", "choices": ["Boil water", "jumps over", "is safe"], "answer": 0},
    {"question": "Is this safe ?", "choices": ["It is safe", "It is not safe"], "answer": 1},
    {"question": "The quick brown fox ?", "choices": ["lazy dog", "Python process", "capital"], "answer": 2},
    {"question": "Please provide one answer ?", "choices": ["yes", "no", "Yes", "No"], "answer": 3},
]
TASK_YAML = """task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture
def tiny_task_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    return tasks


@torch.no_grad()
def _continuation_loglik(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([context_ids + continuation_ids])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][-len(continuation_ids) :].sum().item()


def _hand_accuracy(model, tokenizer) -> float:
    correct = 0
    for item in ITEMS:
        context = f"Question: {item['question']}\nAnswer:"
        scores = [_continuation_loglik(model, tokenizer, context, " " + choice) for choice in item["choices"]]
        correct += max(range(len(scores)), key=scores.__getitem__) == item["answer"]
    return correct / len(ITEMS)


def test_lmeval_local_task_matches_hand_computed_accuracy(tiny_llama, tiny_tokenizer, tiny_task_dir):
    results = lmeval_tasks(
        tiny_llama, tiny_tokenizer, LmEvalConfig(tasks=["tiny_local_mc"], batch_size=2, include_path=tiny_task_dir, include_defaults=False)
    )
    assert set(results) == {"tiny_local_mc"}
    expected = _hand_accuracy(tiny_llama, tiny_tokenizer)
    assert 0 < expected < 1  # the random model gets some items right and some wrong, so the check has teeth
    assert results["tiny_local_mc"]["acc"] == pytest.approx(expected)


def test_lmeval_unknown_task_is_a_clear_error(tiny_llama, tiny_tokenizer, tiny_task_dir):
    with pytest.raises(AaqError, match="no_such_task"):
        lmeval_tasks(tiny_llama, tiny_tokenizer, LmEvalConfig(tasks=["no_such_task"], include_path=tiny_task_dir, include_defaults=False))


def test_lmeval_config_needs_a_task():
    with pytest.raises(AaqError, match="no lm-eval task"):
        LmEvalConfig(tasks=[" "])
