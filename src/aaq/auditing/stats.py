"""Paired statistics of an audit: each prompt answered by the original and by a quantized model.

For a yes/no property of an answer (refused, complied, garbled, ...) the n prompts form a 2 x 2 table:
`a` both models yes, `b` original yes and quantized no, `c` original no and quantized yes, `d` both no.

- **Difference** quantized - original = (c - b) / n, with a 95% interval by **Agresti and Min's adjusted Wald
  interval for matched pairs** ("Wald+2", Statistics in Medicine 24:729-740, 2005): add 1/2 to each cell, then
  (c - b) / (n + 2) +- z * sqrt((b + c + 1) - (c - b)^2 / (n + 2)) / (n + 2), cut to [-1, 1]. Why this interval:
  the difference of paired shares is carried by the discordant prompts alone, and an audit often has few or none
  of them (a model quantized to 8 bits answers almost every prompt as the original did). The plain Wald interval
  then has zero width and claims certainty from a few dozen prompts; so does Newcombe's square-and-add score
  interval when both shares are near 1/2 and b = c = 0. The adjusted Wald interval keeps a width of about
  2 * 1.96 / (n + 2) there, stays close to 95% coverage down to small n (Agresti and Min's evaluation), and is one
  line of arithmetic a reader can check by hand.
- **McNemar's exact test**: under no change, each of the b + c discordant prompts is equally likely to go
  either way, so min(b, c) is Binomial(b + c, 1/2); the two-sided p-value is twice its lower tail (at most 1).
- **AUROC** of a per-prompt score (the first-token KL) for a per-prompt event (the verdict flipped): the
  probability that a prompt with the event scores higher than one without it (ties count one half).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)


@dataclass(frozen=True)
class PairedTable:
    """The 2 x 2 table of one property over n prompts: a both yes, b original only, c quantized only, d neither."""

    a: int
    b: int
    c: int
    d: int

    @classmethod
    def of(cls, original: Sequence[bool], quantized: Sequence[bool]) -> PairedTable:
        """The table of two equally long per-prompt indicators."""
        pairs = list(zip(original, quantized, strict=True))
        return cls(*(sum(1 for pair in pairs if pair == want) for want in ((True, True), (True, False), (False, True), (False, False))))

    @property
    def n(self) -> int:
        """The number of prompts."""
        return self.a + self.b + self.c + self.d

    @property
    def original_rate(self) -> float:
        """Share of prompts with the property for the original model."""
        return (self.a + self.b) / self.n

    @property
    def quantized_rate(self) -> float:
        """Share of prompts with the property for the quantized model."""
        return (self.a + self.c) / self.n

    @property
    def difference(self) -> float:
        """quantized rate - original rate."""
        return (self.c - self.b) / self.n


def paired_difference_interval(table: PairedTable, z: float = Z) -> tuple[float, float]:
    """The 95% interval (by default) of quantized - original by Agresti and Min's adjusted Wald interval (module docstring)."""
    n, b, c = table.n + 2, table.b, table.c
    centre = (c - b) / n
    half = z * math.sqrt((b + c + 1) - (c - b) ** 2 / n) / n
    return max(-1.0, centre - half), min(1.0, centre + half)


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided p-value of McNemar's exact test for b and c discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def auroc(scores: Sequence[float], events: Sequence[bool]) -> float | None:
    """The probability that a prompt with the event scores above one without it (ties one half); None without both kinds."""
    positive = [s for s, e in zip(scores, events, strict=True) if e]
    negative = [s for s, e in zip(scores, events, strict=True) if not e]
    if not positive or not negative:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))
