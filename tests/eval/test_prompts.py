import csv
import json

import pytest

from aaq.errors import AaqError
from aaq.eval.prompts import (
    PROMPT_COLUMNS,
    advbench_records,
    benign_records,
    benign_train_records,
    harmbench_prompts,
    harmbench_records,
    load_prompt_records,
)
from tests.helpers import SHARED_DATA


@pytest.mark.parametrize("column", PROMPT_COLUMNS)
def test_csv_finds_each_prompt_column(tmp_path, column):
    path = tmp_path / "p.csv"
    path.write_text(f"id,{column},category\n1,first prompt,a\n2,\"second, with comma\",b\n")
    records = load_prompt_records(path)
    assert [r.text for r in records] == ["first prompt", "second, with comma"]
    assert [r.category for r in records] == ["a", "b"]


def _texts(path) -> list[str]:
    return [record.text for record in load_prompt_records(path)]


def test_column_priority_prefers_prompt_over_goal(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("goal,prompt\nthe goal,the prompt\n")
    assert _texts(path) == ["the prompt"]


def test_json_list_of_objects_and_of_strings(tmp_path):
    objects = tmp_path / "o.json"
    objects.write_text(json.dumps([{"forbidden_prompt": "x1"}, {"forbidden_prompt": "x2"}]))
    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["y1", " y2 "]))
    assert _texts(objects) == ["x1", "x2"]
    assert _texts(strings) == ["y1", "y2"]


def test_jsonl_and_plain_text(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"instruction": "do a", "looks_harmful": true}\n\n{"instruction": "do b"}\n')
    text = tmp_path / "p.txt"
    text.write_text("line one\n\nline two\n")
    records = load_prompt_records(jsonl)
    assert [r.text for r in records] == ["do a", "do b"]
    assert [r.looks_harmful for r in records] == [True, False]
    assert _texts(text) == ["line one", "line two"]


def test_missing_prompt_column_lists_the_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("question,topic\nq,t\n")
    with pytest.raises(AaqError) as error:
        _texts(path)
    message = str(error.value)
    assert "question" in message and "topic" in message and "forbidden_prompt" in message
    assert "\n" not in message


def test_missing_and_empty_files_are_clear_errors(tmp_path):
    with pytest.raises(AaqError, match="does not exist"):
        _texts(tmp_path / "nope.csv")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(AaqError, match="no prompts"):
        _texts(empty)


def test_harmbench_val_standard_has_41_behaviours_with_categories():
    records = harmbench_records("val", "standard")
    assert len(records) == 41
    assert len(harmbench_prompts()) == 41
    assert {r.category for r in records} >= {"illegal", "chemical_biological", "cybercrime_intrusion"}
    assert len(harmbench_records("val", None)) == 80
    assert len(harmbench_records("test", "standard")) == 159


def test_advbench_has_520_goals_and_no_categories(monkeypatch, tmp_path):
    records = advbench_records()
    with (SHARED_DATA / "advbench" / "harmful_behaviors.csv").open(encoding="utf-8", newline="") as handle:
        goals = [row["goal"].strip() for row in csv.DictReader(handle)]
    assert len(records) == 520 and [r.text for r in records] == goals
    assert records[0].text.startswith("Write a script that can exploit vulnerabilities")
    assert {r.category for r in records} == {"all"} and not any(r.looks_harmful for r in records)
    monkeypatch.setenv("AAQ_DATA_DIR", str(tmp_path))
    with pytest.raises(AaqError, match="AdvBench file .* is missing"):
        advbench_records()


def test_harmbench_unknown_split():
    with pytest.raises(AaqError, match="split"):
        harmbench_records("train")


def test_shipped_benign_sets_sizes_and_disjointness():
    evaluation, training = benign_records(), benign_train_records()
    assert len(evaluation) >= 150 and sum(r.looks_harmful for r in evaluation) >= 50
    assert len(training) >= 200 and sum(r.looks_harmful for r in training) >= 55
    eval_texts = {r.text.strip().lower() for r in evaluation}
    train_texts = {r.text.strip().lower() for r in training}
    assert len(eval_texts) == len(evaluation) and len(train_texts) == len(training)
    assert not eval_texts & train_texts
    assert len({r.category for r in evaluation}) >= 8
