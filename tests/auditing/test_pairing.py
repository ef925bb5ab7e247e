"""Flip accounting and paired figures on hand-made verdicts."""

import pytest

from aaq.auditing.pairing import BENIGN, HARMFUL, AuditPrompts, ModelAnswers, flip_prediction, flipped, pair_rows, paired_figures, transitions
from aaq.eval.prompts import Prompt
from aaq.eval.safety import SafetyRecord

HARMFUL_PROMPTS = [f"harmful {i}" for i in range(6)]
BENIGN_PROMPTS = [f"benign {i}" for i in range(4)]
PROMPTS = AuditPrompts({"set-a": [Prompt(p) for p in HARMFUL_PROMPTS[:4]], "set-b": [Prompt(p) for p in HARMFUL_PROMPTS[4:]]},
                       [Prompt(p) for p in BENIGN_PROMPTS])  # fmt: skip


def answers(harmful: str, benign: str) -> ModelAnswers:
    """Verdicts by letter (r refused, x refused_garbled, c complied, g garbled)."""
    letters = {"r": "refused", "x": "refused_garbled", "c": "complied", "g": "garbled"}

    def records(task, prompts, verdicts):
        return [SafetyRecord(task, p, "all", False, f"answer {v}", letters[v]) for p, v in zip(prompts, verdicts, strict=True)]

    return ModelAnswers({HARMFUL: records("refusal", HARMFUL_PROMPTS, harmful), BENIGN: records("benign", BENIGN_PROMPTS, benign)})


ORIGINAL = answers("rrrrrc", "cccr")
QUANTIZED = answers("rcggxr", "crgc")


def test_flips_are_listed_by_prompt():
    # A refusal that became a garbled refusal (prompt 4) is a refused -> garbled flip too.
    assert flipped(ORIGINAL, QUANTIZED) == {"refused_to_complied": [1], "refused_to_garbled": [2, 3, 4], "complied_to_refused": [1]}
    assert transitions(ORIGINAL, QUANTIZED) == {
        HARMFUL: {"refused->garbled": 2, "refused->refused": 1, "refused->refused_garbled": 1, "refused->complied": 1, "complied->refused": 1},
        BENIGN: {"complied->complied": 1, "complied->refused": 1, "complied->garbled": 1, "refused->complied": 1},
    }


def test_paired_figures_by_hand():
    figures = paired_figures(ORIGINAL, QUANTIZED)
    # Harmful refused (coherently): original 5/6, quantized 2/6 (prompts 0, 5); both 0, original only 1 2 3 4, quantized only 5.
    refused = figures["harmful_refused"]
    assert refused["table"] == {"both": 1, "original_only": 4, "quantized_only": 1, "neither": 0}
    assert (refused["original"], refused["quantized"], refused["difference"]) == pytest.approx((5 / 6, 2 / 6, -3 / 6))
    assert refused["mcnemar_p"] == pytest.approx(2 * 6 / 32)  # min(4, 1) = 1 of 5: (1 + 5) / 32, doubled
    assert figures["harmful_complied"]["difference"] == pytest.approx(0.0)  # prompt 5 stopped complying, prompt 1 started
    assert figures["harmful_garbled"]["quantized"] == pytest.approx(2 / 6)
    assert figures["harmful_refused_garbled"]["quantized"] == pytest.approx(1 / 6)
    assert figures["benign_compliance"]["difference"] == pytest.approx(-1 / 4)
    assert figures["benign_refused"]["table"] == {"both": 0, "original_only": 1, "quantized_only": 1, "neither": 2}
    assert all(f["ci_low"] <= f["difference"] <= f["ci_high"] for f in figures.values())
    assert QUANTIZED.shares()[HARMFUL] == pytest.approx({"refused": 1 / 3, "complied": 1 / 6, "garbled": 1 / 3, "refused_garbled": 1 / 6})
    # Benign refusals of either kind count: a garbled refusal is still a refusal of a benign request.
    assert paired_figures(answers("rrrrrc", "cccr"), answers("rrrrrc", "xccr"))["benign_refused"]["quantized"] == pytest.approx(2 / 4)


def test_the_kl_predicts_flips_by_auroc():
    kl = {HARMFUL: [0.0, 0.9, 0.8, 0.7, 0.1, 0.75], BENIGN: [0.0, 0.5, 0.4, 0.1]}
    # Harmful: changed 1 2 3 4 5 (0.9 0.8 0.7 0.1 0.75) all above unchanged 0 (0.0); benign: changed 1 2 3 (0.5 0.4 0.1) vs 0 (0.0).
    assert flip_prediction(kl, ORIGINAL, QUANTIZED) == {"auroc_harmful": 1.0, "auroc_benign": 1.0}
    assert flip_prediction({HARMFUL: [1.0, 0, 0, 0, 0, 0], BENIGN: [0.2, 0.1, 0.2, 0.3]}, ORIGINAL, QUANTIZED)["auroc_harmful"] == 0.0


def test_pairs_rows_hold_both_answers_and_the_flip():
    rows = pair_rows("q", PROMPTS, ORIGINAL, QUANTIZED, {HARMFUL: [0.5] * 6, BENIGN: [0.1] * 4})
    assert len(rows) == 10 and [row["task"] for row in rows] == [HARMFUL] * 6 + [BENIGN] * 4
    assert [row["prompt_set"] for row in rows[:6]] == ["set-a"] * 4 + ["set-b"] * 2 and rows[6]["prompt_set"] is None
    assert rows[1]["flip"] == "refused_to_complied" and rows[1]["original"]["verdict"] == "refused" and rows[1]["quantized"]["verdict"] == "complied"
    assert rows[7]["flip"] == "complied_to_refused" and rows[0]["flip"] is None and not rows[0]["changed"]
    assert rows[4]["flip"] == "refused_to_garbled" and rows[4]["quantized"]["verdict"] == "refused_garbled"
    assert [row["flip"] for row in rows].count(None) == 5

