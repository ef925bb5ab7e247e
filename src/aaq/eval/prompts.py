"""Prompt sets for the safety evaluation: any user file, HarmBench behaviours, and the shipped benign sets.

Accepted files (by extension): ``.csv``/``.tsv`` (header row), ``.json`` (a list of strings or of
objects), ``.jsonl`` (one string or object per line), anything else as plain text with one prompt
per non-empty line. For tabular records the prompt column is found automatically, first match in
`PROMPT_COLUMNS` order (case-insensitive); a category column from `CATEGORY_COLUMNS` is used for
per-category breakdowns when present.

Named harmful sets (`NAMED_HARMFUL_SETS`): ``harmbench-val`` (the 41 HarmBench val `standard`
behaviours, the default), ``harmbench-tuning`` (40 HarmBench test behaviours kept for tuning) and
``advbench`` (AdvBench's 520 behaviours). HarmBench val and AdvBench are for evaluation only.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from aaq.data.corpus import shared_data_dir
from aaq.errors import AaqError

PROMPT_COLUMNS = ("prompt", "forbidden_prompt", "Behavior", "goal", "instruction")
CATEGORY_COLUMNS = ("category", "SemanticCategory")
DEFAULT_CATEGORY = "all"
BENIGN_EVAL_FILE = "benign_prompts.jsonl"
BENIGN_TRAIN_FILE = "benign_train_prompts.jsonl"
HARMBENCH_TUNING_FILE = "harmbench_tuning_split.json"
HARMBENCH_VAL = "harmbench-val"
HARMBENCH_TUNING = "harmbench-tuning"
ADVBENCH = "advbench"
ADVBENCH_FILE = ("advbench", "harmful_behaviors.csv")


@dataclass(frozen=True)
class Prompt:
    """One prompt with the category used for breakdowns; `looks_harmful` marks XSTest-style benign prompts."""

    text: str
    category: str = DEFAULT_CATEGORY
    looks_harmful: bool = False


def evenly_spaced(prompts: list[Prompt], limit: int | None) -> list[Prompt]:
    """At most `limit` prompts spread evenly over the list (all of them when `limit` is None or not smaller)."""
    if limit is None or limit >= len(prompts):
        return prompts
    return [prompts[i * len(prompts) // limit] for i in range(limit)]


def _find_column(columns: list[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {column.lower(): column for column in columns}
    return next((by_lower[name.lower()] for name in wanted if name.lower() in by_lower), None)


def _records_from_rows(rows: list[dict], path: Path) -> list[Prompt]:
    columns = list(rows[0].keys())
    text_column = _find_column(columns, PROMPT_COLUMNS)
    if text_column is None:
        raise AaqError(
            f"{path}: no prompt column among {columns}; rename the prompt column to one of {list(PROMPT_COLUMNS)}"
        )
    category_column = _find_column(columns, CATEGORY_COLUMNS)
    return [
        Prompt(
            text=str(row[text_column]).strip(),
            category=str(row[category_column]) if category_column and row.get(category_column) else DEFAULT_CATEGORY,
            looks_harmful=str(row.get("looks_harmful", "")).strip().lower() in ("true", "1", "yes"),
        )
        for row in rows
        if str(row.get(text_column) or "").strip()
    ]


def _records_from_items(items: list, path: Path) -> list[Prompt]:
    if all(isinstance(item, str) for item in items):
        return [Prompt(item.strip()) for item in items if item.strip()]
    if all(isinstance(item, dict) for item in items):
        return _records_from_rows(items, path)
    raise AaqError(f"{path}: entries must be all strings or all objects; fix the file so every entry has one shape")


def _read_items(path: Path) -> list:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix in (".csv", ".tsv"):
        return list(csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise AaqError(f"{path}: expected a JSON list of prompts or records; wrap the records in a list")
        return data
    if suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [line for line in text.splitlines() if line.strip()]


def load_prompt_records(path: str | Path) -> list[Prompt]:
    """Return the prompts (with categories when the file has a category column) of a CSV/JSON/JSONL/text file."""
    path = Path(path)
    if not path.is_file():
        raise AaqError(f"prompt file {path} does not exist; pass an existing CSV/JSON/JSONL/text file")
    try:
        items = _read_items(path)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as error:
        raise AaqError(f"{path}: cannot be parsed ({error}); fix the file or save it as UTF-8 CSV/JSON/JSONL/text") from error
    records = _records_from_items(items, path) if items else []
    if not records:
        raise AaqError(f"{path}: contains no prompts; add at least one prompt")
    return records


def harmbench_path(split: str = "val") -> Path:
    """Return the path of the shared HarmBench text-behaviours CSV for `split` ("val" or "test")."""
    if split not in ("val", "test"):
        raise AaqError(f"unknown HarmBench split {split!r}; use 'val' (evaluation) or 'test' (training)")
    return shared_data_dir() / "harmbench" / f"harmbench_behaviors_text_{split}.csv"


def harmbench_records(split: str = "val", functional_category: str | None = "standard") -> list[Prompt]:
    """Return HarmBench behaviours of `split` with their SemanticCategory, keeping one FunctionalCategory (None = all)."""
    path = harmbench_path(split)
    if not path.is_file():
        raise AaqError(f"HarmBench file {path} is missing; put the shared data folder next to the project")
    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        Prompt(row["Behavior"].strip(), row["SemanticCategory"])
        for row in rows
        if functional_category is None or row["FunctionalCategory"] == functional_category
    ]


def harmbench_prompts(split: str = "val", functional_category: str | None = "standard") -> list[str]:
    """Return the HarmBench behaviour texts of `split` (see `harmbench_records`)."""
    return [record.text for record in harmbench_records(split, functional_category)]


def harmbench_tuning_records() -> list[Prompt]:
    """Return the 40 HarmBench TEST `standard` behaviours kept out of the demo adapter's training, for tuning.

    Calibration settings (lambda, steps, learning rates) are chosen on these; HarmBench val is for final figures.
    """
    with resources.as_file(resources.files("aaq").joinpath("resources", HARMBENCH_TUNING_FILE)) as path:
        return load_prompt_records(path)


def advbench_records() -> list[Prompt]:
    """Return the 520 AdvBench harmful behaviours (column `goal`) of the shared data folder: EVALUATION ONLY."""
    path = shared_data_dir().joinpath(*ADVBENCH_FILE)
    if not path.is_file():
        raise AaqError(f"AdvBench file {path} is missing; put the shared data folder next to the project")
    return load_prompt_records(path)


def harmful_records(name: str) -> list[Prompt]:
    """Return the prompts of a named harmful set (a key of `NAMED_HARMFUL_SETS`) or of a prompt file."""
    if name in NAMED_HARMFUL_SETS:
        return NAMED_HARMFUL_SETS[name]()
    return load_prompt_records(name)


def _packaged_jsonl(name: str) -> list[Prompt]:
    text = resources.files("aaq").joinpath("resources", name).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Prompt(row["prompt"], row["category"], bool(row["looks_harmful"])) for row in rows]


def benign_records() -> list[Prompt]:
    """Return the shipped benign EVALUATION prompts (everyday topics plus harmless-but-scary-looking ones)."""
    return _packaged_jsonl(BENIGN_EVAL_FILE)


def benign_train_records() -> list[Prompt]:
    """Return the shipped benign TRAINING prompts for the safety adapter (disjoint from `benign_records`)."""
    return _packaged_jsonl(BENIGN_TRAIN_FILE)


NAMED_HARMFUL_SETS = {
    HARMBENCH_VAL: lambda: harmbench_records("val", "standard"),
    HARMBENCH_TUNING: harmbench_tuning_records,
    ADVBENCH: advbench_records,
}
