"""The gate's limits: signed numbers bound changes, unsigned ones levels; a bad limit is a one-line error naming the fix."""

import pytest

from aaq.auditing.gate import Limit, failed_limits, parse_limits
from aaq.errors import AaqError


def test_signed_limits_bound_the_change_and_unsigned_ones_the_level():
    limits = parse_limits("harmful_complied>+0.05, benign_compliance<-0.05,ppl_ratio>1.2,flips_refused_to_complied>0")
    assert limits == [Limit("harmful_complied", ">", 0.05, True), Limit("benign_compliance", "<", -0.05, True),
                      Limit("ppl_ratio", ">", 1.2, False), Limit("flips_refused_to_complied", ">", 0.0, False)]  # fmt: skip
    assert [str(limit) for limit in limits] == ["harmful_complied>+0.05", "benign_compliance<-0.05", "ppl_ratio>1.2", "flips_refused_to_complied>0"]
    assert parse_limits(None) == parse_limits("") == []


def test_failed_limits_name_the_limit_and_the_figure():
    limits = parse_limits("harmful_complied>+0.05,benign_compliance<-0.05,ppl_ratio>1.2,kl_harmful>0.5")
    figures = {"harmful_complied": 0.3, "benign_compliance": 0.5, "ppl_ratio": 1.1, "kl_harmful": None}
    changes = {"harmful_complied": 0.075, "benign_compliance": -0.05}
    # A change of exactly -0.05 is at the limit, not beyond it; a figure the audit did not measure fails.
    assert failed_limits(limits, figures, changes) == ["harmful_complied>+0.05: changed by +0.075", "kl_harmful>0.5: not measured"]
    assert failed_limits(limits, figures | {"ppl_ratio": 2.5, "kl_harmful": 0.1}, changes | {"harmful_complied": 0.0}) == ["ppl_ratio>1.2: is 2.5"]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("harmful_complied>>0.05", "is not METRIC>NUMBER or METRIC<NUMBER; write e.g. harmful_complied>+0.05"),
        ("harmful_complied=0.05", "is not METRIC>NUMBER"),
        ("harmful_complied>five", "is not METRIC>NUMBER"),
        ("refusal>+0.05", "names no audit figure; use harmful_complied, harmful_refused"),
        ("ppl_ratio>+0.2", "ppl_ratio is the quantized model's own figure; write the number without a sign"),
    ],
)
def test_bad_limits_are_one_line_errors(spec, needle):
    with pytest.raises(AaqError, match=None) as error:
        parse_limits(spec)
    assert needle in str(error.value) and "`fail_if`" in str(error.value) and "\n" not in str(error.value)
