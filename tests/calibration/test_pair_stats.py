"""Pair statistics (KL, reference mass and contrast on the push tokens) against hand computations."""

import math

import pytest
import torch

from aaq.calibration.pair_stats import CONTRAST_FLOOR, PairStatistics, PairSummary, PushSet, push_warning, summary_line
from aaq.errors import AaqError

# The literal logits of test_losses: I_d (diff, k=2) = [[3, 1], [1, 3]], reference top-2 = [[0, 1], [3, 1]].
Z_A = [[2.0, 0.5, 1.0, -1.0], [0.0, 3.0, -2.0, 1.0]]
Z_B = [[2.0, 1.5, 1.0, 1.0], [0.3, 1.0, -2.0, 1.5]]
PUSH_IDX = {"diff@2": [[3, 1], [1, 3]], "diff@1": [[3], [1]], "reference@2": [[0, 1], [3, 1]], "vocab": [[0, 1, 2, 3]] * 2}


def softmax(xs: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in xs)
    return [math.exp(x) / total for x in xs]


def hand_means(idx: list[list[int]]) -> tuple[float, float]:
    masses, contrasts = [], []
    for a, b, rows in zip(Z_A, Z_B, idx, strict=True):
        p_a, p_b = softmax(a), softmax(b)
        masses.append(sum(p_b[i] for i in rows))
        contrasts.append(sum(abs(p_a[i] - p_b[i]) for i in rows))
    return sum(masses) / 2, sum(contrasts) / 2


def measured(push_sets: tuple[PushSet, ...], z_a=Z_A, z_b=Z_B) -> PairSummary:
    statistics = PairStatistics(push_sets)
    statistics.add(torch.as_tensor(z_a), torch.as_tensor(z_b))
    return statistics.summary()


def test_kl_mass_and_contrast_equal_hand_computation() -> None:
    push_sets = (PushSet("diff", 2), PushSet("diff", 1), PushSet("reference", 2), PushSet("vocab", None))
    summary = measured(push_sets)
    hand_kl = sum(sum(p * math.log(p / q) for p, q in zip(softmax(a), softmax(b), strict=True)) for a, b in zip(Z_A, Z_B, strict=True)) / 2
    assert summary.positions == 2 and summary.kl == pytest.approx(hand_kl, abs=1e-6)
    for push in push_sets:
        mass, contrast = hand_means(PUSH_IDX[push.label])
        assert summary.of(push).mass == pytest.approx(mass, abs=1e-6)
        assert summary.of(push).contrast == pytest.approx(contrast, abs=1e-6)
    assert summary.of(PushSet("vocab", None)).mass == pytest.approx(1.0, abs=1e-6)


def test_batched_and_chunked_positions_give_the_same_means(monkeypatch) -> None:
    generator = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(3, 5, 11, generator=generator), torch.randn(3, 5, 11, generator=generator)
    push_sets = PushSet("diff", 4).with_alternatives(4)
    whole = measured(push_sets, z_a, z_b)
    monkeypatch.setattr("aaq.calibration.pair_stats._ROWS_PER_CHUNK", 4)
    statistics = PairStatistics(push_sets)
    statistics.add(z_a[:2], z_b[:2])
    statistics.add(z_a[2:], z_b[2:])
    chunked = statistics.summary()
    assert chunked.positions == whole.positions == 15
    assert chunked.kl == pytest.approx(whole.kl, rel=1e-6)
    for got, want in zip(chunked.push, whole.push, strict=True):
        assert got.mass == pytest.approx(want.mass, rel=1e-6) and got.contrast == pytest.approx(want.contrast, rel=1e-6)


def test_identical_models_have_nothing_to_push_on_and_get_the_warning() -> None:
    push = PushSet("diff", 2)
    summary = measured(push.with_alternatives(2), Z_A, Z_A)
    assert summary.kl == pytest.approx(0.0, abs=1e-7)
    assert all(s.contrast == pytest.approx(0.0, abs=1e-7) and s.sees_nothing for s in summary.push)
    warning = push_warning(summary, push, "the calibration windows")
    assert warning is not None and "nothing to see on the calibration windows" in warning and "diff@2" in warning
    assert push_warning(measured(push.with_alternatives(2)), push, "x") is None
    assert hand_means(PUSH_IDX["diff@2"])[1] > CONTRAST_FLOOR  # the pair above really is above the floor


def test_summary_round_trips_and_names_every_push_set() -> None:
    summary = measured(PushSet("reference", 2).with_alternatives(2))
    assert PairSummary.from_dict(summary.to_dict()) == summary
    assert [s.push.label for s in summary.push] == ["reference@2", "diff@2", "vocab"]
    line = summary_line(summary, "text")
    assert "2 tokens" in line and "reference@2 mass" in line and "vocab" in line
    with pytest.raises(AaqError, match="not measured"):
        summary.of(PushSet("diff", 5))


@pytest.mark.parametrize("tokens, k", [("vocab", 3), ("diff", None), ("logits", 3), ("diff", 0)])
def test_bad_push_sets_are_errors(tokens, k) -> None:
    with pytest.raises(AaqError):
        PushSet(tokens, k)


def test_mismatched_or_empty_input_is_an_error() -> None:
    statistics = PairStatistics((PushSet("vocab", None),))
    with pytest.raises(AaqError, match="no token positions"):
        statistics.summary()
    with pytest.raises(AaqError, match="vocabulary"):
        statistics.add(torch.zeros(2, 4), torch.zeros(2, 5))
