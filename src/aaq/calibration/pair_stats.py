"""How far an aligned model and its unaligned reference are apart, per token, and what AAQ's push can see of it.

The push term of the APC loss acts on the push tokens ``I_d`` (:func:`aaq.calibration.losses.push_indices`) with the
reference's probabilities ``p_b``. Per token position this module measures

- ``kl``: KL(p_a || p_b) over the whole vocabulary, in nats;
- ``mass``: ``sum_{I_d} p_b``, the reference's probability mass on the push tokens;
- ``contrast``: ``sum_{I_d} |p_a - p_b|``, how much the two models differ there.

and averages them over positions. The statistics are pure functions of the two models' logits, so the
teacher cache (which already runs both models over the calibration windows) collects them for free and
``aaq diagnose`` uses the same code on other text.

Why the contrast decides whether the push "sees" anything: the gradient of ``-lam * push`` with respect to
the student's logits at one position is ``lam * (m q - p_b on I_d)`` (``m`` the mass, ``q`` the student's
probabilities). Replacing the reference by the aligned model itself would give
``lam * (m_a q - p_a on I_d)``; the two differ by at most ``2 * lam * contrast`` in L1 norm. So the contrast
bounds everything the push learns from the reference being a *different* model. The pull's gradient is
``sum_(I_a) p_a * q - p_a on I_a``, of L1 norm about ``2 * TV(p_q, p_a)``, the quantization error: measured
0.84 per token for QuaRot W4A4KV4 of ``smollm2-135m-safe`` on the demo's calibration windows. Below
:data:`CONTRAST_FLOOR` the reference-specific part of the push (at most 0.02 at lam <= 1) is under 3% of
that, so the push mostly pushes the student away from the aligned model itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from aaq.calibration.losses import PUSH_TOKENS, LossConfig
from aaq.errors import AaqError

__all__ = ["CONTRAST_FLOOR", "PairStatistics", "PairSummary", "PushSet", "PushSummary", "push_warning", "summary_line"]

# Mean per-token contrast below which the push has nothing to see (see the module docstring for why).
CONTRAST_FLOOR = 0.01
# Rows of logits turned into statistics at once: bounds the fp32 softmax temporaries to a few (rows x V) buffers.
_ROWS_PER_CHUNK = 512


@dataclass(frozen=True)
class PushSet:
    """A choice of push tokens ``I_d``: how they are picked (one of ``PUSH_TOKENS``) and how many (None for "vocab")."""

    tokens: str = "diff"
    k: int | None = 1000

    def __post_init__(self) -> None:
        if self.tokens not in PUSH_TOKENS:
            raise AaqError(f"unknown push tokens {self.tokens!r}; choose one of: {', '.join(PUSH_TOKENS)}")
        if (self.tokens == "vocab") != (self.k is None):
            raise AaqError(f"push tokens {self.tokens!r} need {'no' if self.tokens == 'vocab' else 'a'} top-k; fix the push set")
        if self.k is not None and self.k < 1:
            raise AaqError(f"push top-k must be >= 1, got {self.k}")

    @classmethod
    def of_loss(cls, loss: LossConfig) -> PushSet:
        """The push tokens an APC loss config uses."""
        return cls(loss.push_tokens, None if loss.push_tokens == "vocab" else loss.resolved_push_k)

    def with_alternatives(self, default_k: int) -> tuple[PushSet, ...]:
        """This push set followed by the other kinds of push tokens at its top-k (``default_k`` when it has none)."""
        k = default_k if self.k is None else self.k
        others = (PushSet(tokens, None if tokens == "vocab" else k) for tokens in PUSH_TOKENS if tokens != self.tokens)
        return (self, *others)

    @property
    def label(self) -> str:
        """A short name: ``diff@1000``, ``reference@100``, ``vocab``."""
        return self.tokens if self.k is None else f"{self.tokens}@{self.k}"


@dataclass(frozen=True)
class PushSummary:
    """Mean per-token reference mass and contrast on one choice of push tokens."""

    push: PushSet
    mass: float
    contrast: float

    @property
    def sees_nothing(self) -> bool:
        """Whether the contrast is below :data:`CONTRAST_FLOOR`: the push learns next to nothing from the reference."""
        return self.contrast < CONTRAST_FLOOR


@dataclass(frozen=True)
class PairSummary:
    """Means over ``positions`` token positions: KL(aligned || reference) in nats, and per push set its mass/contrast."""

    positions: int
    kl: float
    push: tuple[PushSummary, ...] = ()

    def of(self, push: PushSet) -> PushSummary:
        """The summary of one push set, which must have been measured."""
        for summary in self.push:
            if summary.push == push:
                return summary
        raise AaqError(f"push set {push.label} was not measured; measured: {', '.join(s.push.label for s in self.push)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON form (push sets keyed by label); :meth:`from_dict` reads it back."""
        return {
            "positions": self.positions,
            "kl": self.kl,
            "push": {s.push.label: {"tokens": s.push.tokens, "k": s.push.k, "mass": s.mass, "contrast": s.contrast} for s in self.push},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairSummary:
        """Inverse of :meth:`to_dict`."""
        push = tuple(PushSummary(PushSet(v["tokens"], v["k"]), v["mass"], v["contrast"]) for v in data["push"].values())
        return cls(positions=data["positions"], kl=data["kl"], push=push)


@dataclass
class PairStatistics:
    """Running sums over token positions of how two models' next-token distributions differ; see the module docstring."""

    push_sets: tuple[PushSet, ...] = ()
    positions: int = 0
    kl_sum: float = 0.0
    mass_sums: dict[PushSet, float] = field(default_factory=dict)
    contrast_sums: dict[PushSet, float] = field(default_factory=dict)

    @torch.no_grad()
    def add(self, z_a: Tensor, z_b: Tensor) -> None:
        """Add the positions of aligned logits ``z_a`` and reference logits ``z_b`` (same shape ``(..., V)``)."""
        if z_a.shape != z_b.shape:
            raise AaqError(
                f"aligned logits {tuple(z_a.shape)} and reference logits {tuple(z_b.shape)} differ; "
                "the reference must share the tokenizer and vocabulary of the aligned model"
            )
        flat_a, flat_b = z_a.reshape(-1, z_a.shape[-1]), z_b.reshape(-1, z_b.shape[-1])
        for start in range(0, flat_a.shape[0], _ROWS_PER_CHUNK):
            self._add_rows(flat_a[start : start + _ROWS_PER_CHUNK].float(), flat_b[start : start + _ROWS_PER_CHUNK].float())

    def _add_rows(self, logits_a: Tensor, logits_b: Tensor) -> None:
        """Accumulate one chunk of fp32 flat logits."""
        log_a, log_b = logits_a.log_softmax(-1), logits_b.log_softmax(-1)
        p_a, p_b = log_a.exp(), log_b.exp()
        self.positions += logits_a.shape[0]
        self.kl_sum += float((p_a * (log_a - log_b)).sum())
        for tokens in dict.fromkeys(push.tokens for push in self.push_sets):
            ks = [push.k for push in self.push_sets if push.tokens == tokens]
            mass, contrast = _prefix_sums(logits_a, logits_b, p_a, p_b, tokens, ks)
            for k, m, c in zip(ks, mass, contrast, strict=True):
                push = PushSet(tokens, k)
                self.mass_sums[push] = self.mass_sums.get(push, 0.0) + m
                self.contrast_sums[push] = self.contrast_sums.get(push, 0.0) + c

    @classmethod
    def combined(cls, parts: list[PairStatistics]) -> PairStatistics:
        """The statistics of the positions of all `parts` (the shares of several processes, same push sets), in order."""
        total = parts[0]
        for part in parts[1:]:
            total = cls(
                total.push_sets,
                total.positions + part.positions,
                total.kl_sum + part.kl_sum,
                {push: total.mass_sums.get(push, 0.0) + part.mass_sums.get(push, 0.0) for push in total.push_sets},
                {push: total.contrast_sums.get(push, 0.0) + part.contrast_sums.get(push, 0.0) for push in total.push_sets},
            )
        return total

    def summary(self) -> PairSummary:
        """The means over every position added so far."""
        if self.positions == 0:
            raise AaqError("no token positions were measured; pass non-empty text")
        n = self.positions
        push = tuple(PushSummary(p, self.mass_sums[p] / n, self.contrast_sums[p] / n) for p in self.push_sets)
        return PairSummary(positions=n, kl=self.kl_sum / n, push=push)


def _prefix_sums(
    logits_a: Tensor, logits_b: Tensor, p_a: Tensor, p_b: Tensor, tokens: str, ks: list[int | None]
) -> tuple[list[float], list[float]]:
    """Summed mass and contrast over the chunk for each k of one kind of push tokens (one top-k for all ks)."""
    if tokens == "vocab":
        return [float(p_b.sum())], [float((p_a - p_b).abs().sum())]
    k_max = min(max(ks), logits_a.shape[-1])
    scores = (logits_a - logits_b).abs() if tokens == "diff" else logits_b
    # topk returns the k largest in descending order, so each smaller top-k is a prefix of the largest.
    idx = scores.topk(k_max, dim=-1).indices
    b_at, a_at = p_b.gather(-1, idx), p_a.gather(-1, idx)
    mass = b_at.sum(0).cumsum(0)
    contrast = (a_at - b_at).abs().sum(0).cumsum(0)
    cut = [min(k, k_max) - 1 for k in ks]
    return [float(mass[i]) for i in cut], [float(contrast[i]) for i in cut]


def summary_line(summary: PairSummary, where: str) -> str:
    """One line with the KL and, per push set, the reference mass and the contrast on the text ``where``."""
    push = "; ".join(f"{s.push.label} mass {s.mass:.4f} contrast {s.contrast:.4f}" for s in summary.push)
    return (
        f"aligned vs reference on {where} ({summary.positions} tokens): KL {summary.kl:.4f} nats/token"
        + (f"; push tokens I_d: {push}" if push else "")
    )


def push_warning(summary: PairSummary, push: PushSet, where: str) -> str | None:
    """The warning to show when ``push`` sees next to nothing of the pair on the text ``where``, else None."""
    measured = summary.of(push)
    if not measured.sees_nothing:
        return None
    return (
        f"the push has nothing to see on {where}: mean contrast sum_(I_d) |p_a - p_b| = {measured.contrast:.4f} "
        f"< {CONTRAST_FLOOR} with I_d = {push.label} (reference mass on I_d {measured.mass:.4f}, "
        f"KL(aligned || reference) {summary.kl:.4f} nats/token), so AAQ's push mostly pushes away from the aligned "
        "model itself; use a pair that differs on this text, chat-form calibration, or other push tokens "
        "(aaq diagnose compares them)"
    )
