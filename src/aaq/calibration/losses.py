"""Calibration losses: MSE, full KL, KL-top (pull) and the AAQ contrastive APC loss (pull - lambda * push).

Logits are ``(B, T, V)`` or ``(N, V)``; positions are flattened and every loss is a mean over positions
("batchmean"). The top-k losses take the student logits and a :class:`TeacherTargets`, whether the targets
were computed on the fly from the teacher logits (:func:`teacher_targets`) or read back from the on-disk
cache (:mod:`aaq.calibration.teachers`), so the cached and uncached paths share one implementation.

Calibration itself calls :func:`chunked_loss`, which takes the student's final hidden states and its
output head instead of its logits: the full-vocabulary logits, their float32 log-softmax and their
gradients then exist for `ROWS_PER_CHUNK` positions at a time (and are formed again in the backward)
instead of for the whole batch, which at 4 x 2048 tokens of a 128k vocabulary is ~14 GiB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from aaq.errors import AaqError
from aaq.runtime.devices import compute_dtype

__all__ = [
    "LOSS_NAMES",
    "PUSH_TOKENS",
    "ROWS_PER_CHUNK",
    "LossConfig",
    "LossTerms",
    "TeacherTargets",
    "apc_loss",
    "chunked_loss",
    "compute_loss",
    "kl_loss",
    "kl_top_loss",
    "mse_loss",
    "push_indices",
    "push_loss",
    "teacher_targets",
]


@dataclass(frozen=True)
class TeacherTargets:
    """What the teachers contribute to the top-k losses, per flattened position (N rows).

    ``pull_idx``/``pull_prob``: top-k indices of the aligned logits ``z_a`` and ``softmax(z_a)`` (full
    vocabulary) gathered there. ``push_idx``/``push_prob``: the push tokens ``I_d`` (see :func:`push_indices`)
    and ``softmax(z_b)`` gathered there; for the full-vocabulary push ``push_idx`` is None and ``push_prob``
    holds every token's probability (implicit indices ``0..V-1``). ``push_ref``: the aligned FP model's own
    push value per position, ``sum_{I_d} p_b (log p_b - log p_a)`` (used by the bounded push). Push fields are
    None without a reference.
    """

    pull_idx: Tensor
    pull_prob: Tensor
    push_idx: Tensor | None = None
    push_prob: Tensor | None = None
    push_ref: Tensor | None = None

    @property
    def num_positions(self) -> int:
        """The number of flattened token positions these targets cover."""
        return self.pull_idx.shape[0]

    @property
    def has_push(self) -> bool:
        """Whether the push (reference) fields are present."""
        return self.push_prob is not None

    def rows(self, start: int, stop: int) -> TeacherTargets:
        """The targets of positions ``start`` to ``stop`` (views, no copies)."""
        return TeacherTargets(*(None if value is None else value[start:stop] for value in (getattr(self, f.name) for f in fields(self))))

    @staticmethod
    def concatenated(parts: list[TeacherTargets]) -> TeacherTargets:
        """The targets of consecutive runs of positions, as one."""
        return TeacherTargets(*(None if values[0] is None else torch.cat(values) for values in zip(*(
            [getattr(part, f.name) for f in fields(part)] for part in parts), strict=True)))  # fmt: skip


class LossTerms(NamedTuple):
    """A loss value and its terms: ``pull`` (towards the aligned model) and ``push`` (None without one)."""

    total: Tensor
    pull: Tensor
    push: Tensor | None = None

    def detached(self) -> LossTerms:
        """The terms without their graph (still tensors: reading them would make a GPU wait)."""
        return LossTerms(*(None if value is None else value.detach() for value in self))

    def scaled(self, weight: float) -> LossTerms:
        """Every term times `weight` (one process's share of a batch, weighted by its fraction of it)."""
        return LossTerms(*(None if value is None else value * weight for value in self))

    def plus(self, other: LossTerms) -> LossTerms:
        """The terms of two parts of a batch (each weighted by its fraction of it) added up."""
        return LossTerms(*(None if value is None else value + more for value, more in zip(self, other, strict=True)))

    def scalars(self) -> dict[str, float]:
        """The terms as Python floats, for a progress bar or a log line."""
        values = {"loss": self.total, "pull": self.pull, "push": self.push}
        return {name: float(value.detach()) for name, value in values.items() if value is not None}


def _flat(logits: Tensor) -> Tensor:
    """Logits as ``(N, V)`` in their own dtype."""
    if logits.dim() < 2:
        raise AaqError(f"logits must be (B, T, V) or (N, V), got shape {tuple(logits.shape)}; pass model logits")
    return logits.reshape(-1, logits.shape[-1])


def _flat_fp32(logits: Tensor) -> Tensor:
    """Logits as ``(N, V)`` in fp32 at least: bf16/fp16 softmax over 50k classes loses too much to compare to fp16 targets."""
    flat = _flat(logits)
    return flat.to(compute_dtype(flat.dtype))


PUSH_TOKENS: tuple[str, ...] = ("diff", "reference", "vocab")


def push_indices(logits_a: Tensor, logits_b: Tensor, k: int, push_tokens: str = "diff") -> Tensor | None:
    """The push tokens ``I_d`` per row of flat logits, ``(N, min(k, V))``; None for the whole vocabulary.

    ``push_tokens``: "diff" = top-k of ``|z_a - z_b|`` (where the two models disagree most), "reference" =
    top-k of the reference logits ``z_b``, "vocab" = every token (the push is then the full KL(p_b || p_q)).
    These are the three choices of the paper's public code.
    """
    if push_tokens not in PUSH_TOKENS:
        raise AaqError(f"unknown push tokens {push_tokens!r}; choose one of: {', '.join(PUSH_TOKENS)}")
    if push_tokens == "vocab":
        return None
    k_eff = min(k, logits_a.shape[-1])
    scores = (logits_a - logits_b).abs() if push_tokens == "diff" else logits_b
    return scores.topk(k_eff, dim=-1).indices


def _gather_or_all(values: Tensor, idx: Tensor | None) -> Tensor:
    """``values`` at the indices ``idx`` per row, or all of ``values`` when ``idx`` is None (every token)."""
    return values if idx is None else values.gather(-1, idx.to(device=values.device, dtype=torch.int64))


# Positions whose full-vocabulary logits are turned into float32 (log-)softmaxes at once: a chunk of 512 x
# 128,256 (Llama 3) values is 0.26 GB, where a 4 x 2048-token batch takes 4 GiB per copy.
ROWS_PER_CHUNK = 512


@torch.no_grad()
def teacher_targets(
    z_a: Tensor, z_b: Tensor | None = None, k: int = 1000, push_k: int | None = None, push_tokens: str = "diff"
) -> TeacherTargets:
    """The top-k pull (and, with a reference ``z_b``, push) targets of teacher logits, in fp32.

    ``k`` (capped at V) sizes ``I_a``; the push tokens ``I_d`` are chosen by ``push_tokens`` (see
    :func:`push_indices`) with ``push_k`` of them (default ``k``). Formed `ROWS_PER_CHUNK` positions at a time.
    """
    flat_a = _flat(z_a)
    flat_b = None if z_b is None else _flat(z_b)
    if flat_b is not None and flat_b.shape != flat_a.shape:
        raise AaqError(
            f"aligned logits {tuple(flat_a.shape)} and reference logits {tuple(flat_b.shape)} differ; "
            "the reference must share the tokenizer and vocabulary of the aligned model"
        )
    parts = [
        _row_targets(flat_a[start : start + ROWS_PER_CHUNK], None if flat_b is None else flat_b[start : start + ROWS_PER_CHUNK], k, push_k, push_tokens)
        for start in range(0, max(flat_a.shape[0], 1), ROWS_PER_CHUNK)
    ]
    return parts[0] if len(parts) == 1 else TeacherTargets.concatenated(parts)


def _row_targets(z_a: Tensor, z_b: Tensor | None, k: int, push_k: int | None, push_tokens: str) -> TeacherTargets:
    """`teacher_targets` of a few rows of flat logits."""
    logits_a = z_a.to(compute_dtype(z_a.dtype))
    k_eff = min(k, logits_a.shape[-1])
    log_a = logits_a.log_softmax(-1)
    pull_idx = logits_a.topk(k_eff, dim=-1).indices
    pull_prob = log_a.gather(-1, pull_idx).exp()
    if z_b is None:
        return TeacherTargets(pull_idx=pull_idx, pull_prob=pull_prob)
    logits_b = z_b.to(compute_dtype(z_b.dtype))
    push_idx = push_indices(logits_a, logits_b, k if push_k is None else push_k, push_tokens)
    log_b_at_push = _gather_or_all(logits_b.log_softmax(-1), push_idx)
    push_prob = log_b_at_push.exp()
    push_ref = (push_prob * (log_b_at_push - _gather_or_all(log_a, push_idx))).sum(-1)
    return TeacherTargets(pull_idx, pull_prob, push_idx, push_prob, push_ref)


def _kl_terms(prob: Tensor, log_q: Tensor) -> Tensor:
    """Per-position ``sum_i prob_i (log prob_i - log_q_i)``.

    ``xlogy`` makes ``0 * log 0 = 0``: cached fp16 probabilities underflow to exactly 0 for unlikely tokens.
    """
    prob = prob.to(compute_dtype(prob.dtype))
    return (torch.xlogy(prob, prob) - prob * log_q).sum(-1)


def _student_log_probs(z_q: Tensor, targets: TeacherTargets) -> Tensor:
    """Full-vocabulary fp32 ``log_softmax`` of the student, checked against the targets' position count."""
    log_q = _flat_fp32(z_q).log_softmax(-1)
    if log_q.shape[0] != targets.num_positions:
        raise AaqError(
            f"student logits have {log_q.shape[0]} positions but the teacher targets {targets.num_positions}; "
            "the targets must come from the same calibration batch"
        )
    return log_q


def _pull_per_position(log_q: Tensor, targets: TeacherTargets) -> Tensor:
    """KL-top pull value per position: ``sum_{I_a} p_a (log p_a - log p_q)``."""
    idx = targets.pull_idx.to(device=log_q.device, dtype=torch.int64)
    return _kl_terms(targets.pull_prob.to(log_q.device), log_q.gather(-1, idx))


def _push_per_position(log_q: Tensor, targets: TeacherTargets, bound_margin: float | None) -> Tensor:
    """Push value per position: ``sum_{I_d} p_b (log p_b - log p_q)``, clamped at ``push_ref + margin`` if bounded."""
    if targets.push_prob is None:
        raise AaqError("the push loss needs reference-model targets; pass --reference (or build the cache with one)")
    if targets.push_idx is None and targets.push_prob.shape[-1] != log_q.shape[-1]:
        raise AaqError(
            f"full-vocabulary push targets hold {targets.push_prob.shape[-1]} tokens but the student {log_q.shape[-1]}; "
            "the targets must come from a model with the student's vocabulary"
        )
    push = _kl_terms(targets.push_prob.to(log_q.device), _gather_or_all(log_q, targets.push_idx))
    if bound_margin is None:
        return push
    if targets.push_ref is None:
        raise AaqError("the bounded push needs push_ref in the teacher targets; rebuild the teacher cache")
    return torch.minimum(push, targets.push_ref.to(device=log_q.device, dtype=compute_dtype(targets.push_ref.dtype)) + bound_margin)


def kl_top_loss(z_q: Tensor, targets: TeacherTargets) -> Tensor:
    """OSTQuant's KL-top (the pull term): KL of the student from the aligned model on ``I_a``, mean over positions."""
    return _pull_per_position(_student_log_probs(z_q, targets), targets).mean()


def push_loss(z_q: Tensor, targets: TeacherTargets, bound_margin: float | None = None) -> Tensor:
    """The AAQ push term: KL of the student from the reference on ``I_d``, mean over positions.

    ``bound_margin=None`` is the faithful, unbounded form; a float gives the bounded form (see :func:`apc_loss`).
    """
    return _push_per_position(_student_log_probs(z_q, targets), targets, bound_margin).mean()


def _apc_per_position(z_q: Tensor, targets: TeacherTargets, bound_margin: float | None) -> Tensor:
    """Pull and push value per position, ``(N, 2)``."""
    log_q = _student_log_probs(z_q, targets)
    return torch.stack((_pull_per_position(log_q, targets), _push_per_position(log_q, targets, bound_margin)), -1)


def _apc_terms(means: Tensor, lam: float) -> LossTerms:
    """``pull - lam * push`` with its terms, from the mean pull and push."""
    pull, push = means.unbind()
    return LossTerms(total=pull - lam * push, pull=pull, push=push)


def apc_loss(
    z_q: Tensor, targets: TeacherTargets, lam: float = 0.1, bound_margin: float | None = None
) -> LossTerms:
    """The AAQ contrastive loss ``pull - lam * push`` with its terms.

    Faithful form (``bound_margin=None``): restricted to ``I_d`` the push is not a full KL, and maximising it
    drives ``p_q`` to 0 on ``I_d``, so the loss is unbounded below and only the pull on ``I_a & I_d`` holds
    it back. Bounded form (``bound_margin=m``): the push is clamped per position at ``push_ref + m``, where
    ``push_ref`` is the aligned FP model's own push value; the student is rewarded for moving away from the
    reference only until it is ``m`` nats further from it on ``I_d`` than the aligned model is, so the
    loss is bounded below by ``mean(sum_{I_a} p_a log p_a) - lam * mean(push_ref + m)``. ``m = 0`` asks the
    quantized model to be at least as far from the reference as the aligned model, and no further.
    """
    return _apc_terms(_apc_per_position(z_q, targets, bound_margin).mean(0), lam)


def _squared_error_per_position(z_q: Tensor, z_a: Tensor) -> Tensor:
    """Mean over the vocabulary of the squared logit error, per position, in fp32."""
    diff = _flat_fp32(z_q) - _flat_fp32(z_a)
    return diff.square().mean(-1)


def mse_loss(z_q: Tensor, z_a: Tensor) -> Tensor:
    """Mean squared error between student and aligned logits, in fp32, mean over positions and vocabulary."""
    return _squared_error_per_position(z_q, z_a).mean()


def _kl_per_position(z_q: Tensor, z_a: Tensor) -> Tensor:
    """Full-vocabulary ``KL(p_a || p_q)`` per position."""
    log_q = _flat_fp32(z_q).log_softmax(-1)
    p_a = _flat_fp32(z_a).softmax(-1)
    if p_a.shape != log_q.shape:
        raise AaqError(f"student logits {tuple(log_q.shape)} and aligned logits {tuple(p_a.shape)} differ in shape")
    return _kl_terms(p_a, log_q)


def kl_loss(z_q: Tensor, z_a: Tensor) -> Tensor:
    """Full-vocabulary ``KL(p_a || p_q)``, mean over positions ("batchmean")."""
    return _kl_per_position(z_q, z_a).mean()


def _logits_only(name: str, teacher: TeacherTargets | Tensor) -> Tensor:
    """The aligned logits for a full-vocabulary loss, or an error when given top-k targets."""
    if not isinstance(teacher, Tensor):
        raise AaqError(
            f"loss {name!r} needs the full aligned logits, which the top-k teacher cache does not hold; "
            "use --no-cache or a top-k loss (kl_top, apc)"
        )
    return teacher


def _targets_only(name: str, teacher: TeacherTargets | Tensor) -> TeacherTargets:
    """The top-k teacher targets for a top-k loss, or an error when given raw logits."""
    if not isinstance(teacher, TeacherTargets):
        raise AaqError(f"loss {name!r} takes TeacherTargets; build them with aaq.calibration.losses.teacher_targets(z_a, z_b, k)")
    return teacher


# Each loss as its terms per position, (N, 1) or, for apc, (N, 2) = pull, push: a loss is their mean
# over positions, so chunks of positions can be summed separately (`chunked_loss`).
_LOSSES: dict[str, Callable[[Tensor, TeacherTargets | Tensor, LossConfig], Tensor]] = {
    "mse": lambda z_q, teacher, config: _squared_error_per_position(z_q, _logits_only(config.name, teacher)).unsqueeze(-1),
    "kl": lambda z_q, teacher, config: _kl_per_position(z_q, _logits_only(config.name, teacher)).unsqueeze(-1),
    "kl_top": lambda z_q, teacher, config: _pull_per_position(_student_log_probs(z_q, _targets_only(config.name, teacher)), teacher).unsqueeze(-1),
    "apc": lambda z_q, teacher, config: _apc_per_position(z_q, _targets_only(config.name, teacher), config.margin if config.bounded else None),
}
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)
_TOP_K_LOSSES = frozenset({"kl_top", "apc"})


def _positive_int(value: object) -> bool:
    """Whether ``value`` is an int >= 1 (and not a bool, which YAML and argparse can produce)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class LossConfig:
    """Which calibration loss to use and its settings.

    ``name``: one of :data:`LOSS_NAMES`. ``lam``: push weight of ``apc``. ``k``: top-k size of the pull tokens
    ``I_a`` (capped at the vocabulary). ``push_tokens``: how ``apc`` chooses its push tokens ``I_d`` (one of
    :data:`PUSH_TOKENS`, see :func:`push_indices`), ``push_k`` how many (default ``k``; not with "vocab").
    ``bounded``/``margin``: the bounded push of ``apc`` (see :func:`apc_loss`), margin in nats.
    ``mse`` and ``kl`` compare full logits and cannot use the top-k teacher cache (caching full logits would
    take ``samples x seq_len x V`` values, ~25 GB in fp16 at the paper's settings).
    """

    name: str = "apc"
    lam: float = 0.1
    k: int = 1000
    bounded: bool = False
    margin: float = 0.0
    push_tokens: str = "diff"
    push_k: int | None = None

    def __post_init__(self) -> None:
        if self.name not in _LOSSES:
            raise AaqError(f"unknown loss {self.name!r}; choose one of: {', '.join(LOSS_NAMES)}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise AaqError(f"loss lambda must be a finite number >= 0, got {self.lam}")
        if not _positive_int(self.k):
            raise AaqError(f"loss top-k must be a positive integer, got {self.k!r}")
        if not math.isfinite(self.margin):
            raise AaqError(f"bounded-push margin must be a finite number of nats, got {self.margin}")
        if self.bounded and self.name != "apc":
            raise AaqError(f"the bounded push applies only to loss 'apc', not {self.name!r}; drop bounded from the recipe's loss")
        self._check_push_tokens()

    def _check_push_tokens(self) -> None:
        """One-line errors for push-token settings that are unknown or that nothing would read."""
        if self.push_tokens not in PUSH_TOKENS:
            raise AaqError(f"unknown push tokens {self.push_tokens!r}; choose one of: {', '.join(PUSH_TOKENS)}")
        if self.push_k is not None and not _positive_int(self.push_k):
            raise AaqError(f"push top-k must be a positive integer, got {self.push_k!r}")
        if (self.push_tokens != "diff" or self.push_k is not None) and self.name != "apc":
            raise AaqError(f"push-token settings apply only to loss 'apc', not {self.name!r}; drop {{setting}}", setting="push_tokens")
        if self.push_tokens == "vocab" and self.push_k is not None:
            raise AaqError("{setting} has no effect with push tokens 'vocab' (every token); drop it", setting="push_k")

    def with_push(self, push_tokens: str | None = None, push_k: int | None = None) -> LossConfig:
        """This config with other push tokens; choosing "vocab" alone drops an earlier `push_k` (every token is pushed)."""
        if push_tokens is None and push_k is None:
            return self
        tokens = push_tokens or self.push_tokens
        k = push_k if push_k is not None or push_tokens == "vocab" else self.push_k
        return replace(self, push_tokens=tokens, push_k=k)

    @property
    def resolved_push_k(self) -> int:
        """How many push tokens ``I_d`` a "diff"/"reference" push takes: ``push_k``, else ``k``."""
        return self.k if self.push_k is None else self.push_k

    @property
    def needs_reference(self) -> bool:
        """Whether this loss needs the unaligned reference model."""
        return self.name == "apc"

    @property
    def cacheable(self) -> bool:
        """Whether the teacher side of this loss fits the top-k teacher cache."""
        return self.name in _TOP_K_LOSSES


def _terms(means: Tensor, config: LossConfig) -> LossTerms:
    """The loss terms from the mean over positions of the per-position terms."""
    if config.name == "apc":
        return _apc_terms(means, config.lam)
    return LossTerms(total=means[0], pull=means[0])


def compute_loss(z_q: Tensor, teacher: TeacherTargets | Tensor, config: LossConfig) -> LossTerms:
    """The configured loss of student logits ``z_q`` against the teacher.

    ``teacher`` is a :class:`TeacherTargets` (cached or from :func:`teacher_targets`) for ``kl_top``/``apc``,
    or the aligned logits ``z_a`` for ``mse``/``kl``.
    """
    return _terms(_LOSSES[config.name](z_q, teacher, config).mean(0), config)


def _teacher_rows(teacher: TeacherTargets | Tensor, start: int, stop: int) -> TeacherTargets | Tensor:
    """The teacher's targets (or flat logits) of positions ``start`` to ``stop``."""
    return teacher.rows(start, stop) if isinstance(teacher, TeacherTargets) else teacher[start:stop]


def _chunk_sums(hidden: Tensor, head: Callable[[Tensor], Tensor], teacher: TeacherTargets | Tensor, config: LossConfig) -> Tensor:
    """The per-position terms of the logits ``head(hidden)`` of a chunk of positions, summed over them."""
    return _LOSSES[config.name](head(hidden), teacher, config).sum(0)


def chunked_loss(
    hidden: Tensor, head: Callable[[Tensor], Tensor], teacher: TeacherTargets | Tensor, config: LossConfig, rows: int = ROWS_PER_CHUNK
) -> LossTerms:
    """The configured loss of the logits ``head(hidden)``, formed ``rows`` positions at a time.

    Equal in value and gradient to ``compute_loss(head(hidden), teacher, config)``, but each chunk's
    full-vocabulary logits, their float32 log-softmax and their gradients exist only while that chunk
    is summed, and again in the backward, which forms them anew (activation checkpointing of the
    output head and the loss): the peak holds one chunk's ``(rows, V)`` buffers, not the batch's.
    ``hidden``: the final hidden states ``(B, T, d)`` or ``(N, d)``; ``head``: the output embedding
    (a module, whose hooks run with it) that maps them to logits.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    teacher = teacher if isinstance(teacher, TeacherTargets) else _flat(teacher)
    positions = teacher.num_positions if isinstance(teacher, TeacherTargets) else teacher.shape[0]
    if positions != flat.shape[0]:
        raise AaqError(
            f"student logits have {flat.shape[0]} positions but the teacher targets {positions}; "
            "the targets must come from the same calibration batch"
        )
    total = None
    for start in range(0, flat.shape[0], rows):
        chunk = partial(_chunk_sums, head=head, teacher=_teacher_rows(teacher, start, start + rows), config=config)
        sums = checkpoint(chunk, flat[start : start + rows], use_reentrant=False, preserve_rng_state=False) if torch.is_grad_enabled() else chunk(flat[start : start + rows])
        total = sums if total is None else total + sums
    return _terms(total / flat.shape[0], config)
