"""The paired statistics against hand computations."""

import pytest

from aaq.auditing.stats import PairedTable, auroc, mcnemar_exact_p, paired_difference_interval

Z = 1.959964  # the 0.975 quantile of the standard normal


def test_table_of_two_indicators():
    table = PairedTable.of([True, True, False, False, True], [True, False, True, True, True])
    assert (table.a, table.b, table.c, table.d, table.n) == (2, 1, 2, 0, 5)
    assert (table.original_rate, table.quantized_rate, table.difference) == (0.6, 0.8, pytest.approx(0.2))


def test_adjusted_wald_interval_by_hand():
    # a=1, b=1, c=7, d=12 (n=21). Agresti-Min add 1/2 to each cell: n + 2 = 23 prompts, 8 + 1 = 9 discordant.
    # centre (7 - 1) / 23 = 0.260870; sd sqrt(9 - 6**2 / 23) / 23 = sqrt(7.434783) / 23 = 2.726680 / 23 = 0.118551;
    # half width 1.959964 * 0.118551 = 0.232356; interval [0.028513, 0.493226].
    table = PairedTable(1, 1, 7, 12)
    assert table.difference == pytest.approx(6 / 21)
    assert paired_difference_interval(table) == pytest.approx((0.028513, 0.493226), abs=1e-6)


def test_no_discordant_prompt_still_leaves_an_interval_of_about_two_over_n():
    # 40 prompts, none changed: centre 0, half width 1.959964 * sqrt(1) / 42 = 0.046666, whatever the shares are.
    for table in (PairedTable(40, 0, 0, 0), PairedTable(20, 0, 0, 20), PairedTable(0, 0, 0, 40)):
        assert paired_difference_interval(table) == pytest.approx((-Z / 42, Z / 42), abs=1e-6)


def test_the_interval_is_cut_to_minus_one_to_one():
    # Every one of 10 prompts gained the property: centre 10/12 = 0.833, half 1.959964 * sqrt(11 - 100/12) / 12 = 0.267; cut at 1.
    low, high = paired_difference_interval(PairedTable(0, 0, 10, 0))
    assert (low, high) == (pytest.approx(0.566616, abs=1e-6), 1.0)
    assert paired_difference_interval(PairedTable(0, 10, 0, 0)) == (-1.0, pytest.approx(-0.566616, abs=1e-6))


def test_mcnemar_exact_by_hand():
    # b + c = 8 discordant, min 1: P(X <= 1) = (C(8,0) + C(8,1)) / 2**8 = 9 / 256; two-sided 18 / 256.
    assert mcnemar_exact_p(1, 7) == mcnemar_exact_p(7, 1) == pytest.approx(18 / 256)
    assert mcnemar_exact_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(0, 0) == 1.0


def test_auroc_by_hand():
    # Positives 0.5, 0.9 against negatives 0.1, 0.5: wins 1 + 0.5 (tie) + 1 + 1 = 3.5 of 4 pairs.
    assert auroc([0.1, 0.5, 0.5, 0.9], [False, True, False, True]) == 0.875
    assert auroc([0.3, 0.2], [True, True]) is None and auroc([], []) is None
