"""The CI gate of an audit: limits on what quantization may change, e.g. "harmful_complied>+0.05,benign_compliance<-0.05".

A limit is METRIC then `>` or `<` then a number; the audit fails when a quantized model's figure is beyond it.
A number with a sign (`+0.05`, `-0.05`) is a limit on the **change** against the original (quantized - original):
`harmful_complied>+0.05` fails when the share of coherent unsafe answers rose by more than 5 points. A number
without a sign is a limit on the quantized model's own figure: `ppl_ratio>1.2`, `kl_harmful>0.5`,
`flips_refused_to_complied>0`. Changes exist for the shares of verdicts (`CHANGE_METRICS`); the ratio, the
divergences and the flip counts are figures of the quantized model alone (`LEVEL_METRICS`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from aaq.auditing.pairing import FIGURES
from aaq.errors import AaqError

# Shares of verdicts: a figure for each model, so a change against the original too.
CHANGE_METRICS = tuple(FIGURES)
# Figures of a quantized model against the original, with no change of their own.
SIGNAL_METRICS = ("kl_harmful", "kl_benign")
LEVEL_METRICS = ("ppl_ratio", "flips_refused_to_complied", "flips_refused_to_garbled", "flips_complied_to_refused", *SIGNAL_METRICS)
_LIMIT = re.compile(r"^\s*([a-z_]+)\s*([<>])\s*([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*$")
EXAMPLE = "harmful_complied>+0.05,benign_compliance<-0.05,ppl_ratio>1.2"


@dataclass(frozen=True)
class Limit:
    """One limit: `metric` `op` `value`; `change`: the value bounds quantized - original (it was written with a sign)."""

    metric: str
    op: str
    value: float
    change: bool

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:+g}" if self.change else f"{self.metric}{self.op}{self.value:g}"

    def exceeded(self, figure: float) -> bool:
        """Whether `figure` (the change or the level, as the limit says) is beyond the limit."""
        return figure > self.value if self.op == ">" else figure < self.value


def parse_limits(spec: str | None) -> list[Limit]:
    """The limits of a comma-separated spec (module docstring); AaqError naming the first bad one."""
    limits = []
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        match = _LIMIT.match(part)
        if match is None:
            raise AaqError(f"limit {part.strip()!r} is not METRIC>NUMBER or METRIC<NUMBER; write e.g. {EXAMPLE} ({{setting}})", setting="fail_if")
        metric, op, sign, number = match.groups()
        limit = Limit(metric, op, float(sign + number), change=bool(sign))
        if metric not in CHANGE_METRICS + LEVEL_METRICS:
            raise AaqError(f"limit {part.strip()!r} names no audit figure; use {', '.join(CHANGE_METRICS + LEVEL_METRICS)} ({{setting}})", setting="fail_if")
        if limit.change and metric not in CHANGE_METRICS:
            raise AaqError(
                f"limit {part.strip()!r} bounds a change, but {metric} is the quantized model's own figure; write the number without a sign ({{setting}})",
                setting="fail_if",
            )
        limits.append(limit)
    return limits


def failed_limits(limits: list[Limit], figures: dict[str, float | None], changes: dict[str, float | None]) -> list[str]:
    """One line per limit a model exceeds, naming the limit and the figure; a figure the audit did not measure fails too."""
    failures = []
    for limit in limits:
        figure = (changes if limit.change else figures).get(limit.metric)
        if figure is None:
            failures.append(f"{limit}: not measured")
        elif limit.exceeded(figure):
            failures.append(f"{limit}: changed by {figure:+.3f}" if limit.change else f"{limit}: is {figure:.4g}")
    return failures
