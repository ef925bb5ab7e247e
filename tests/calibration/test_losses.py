"""Loss values against hand computations with plain Python math on literal logits."""

import math

import pytest
import torch

from aaq.calibration.losses import LossConfig, TeacherTargets, apc_loss, compute_loss, kl_loss, kl_top_loss, mse_loss, push_loss, teacher_targets
from aaq.errors import AaqError

# Two positions, V = 4. With k = 2: I_a = top-2 of z_a, I_d = top-2 of |z_a - z_b| (no ties).
Z_A = [[2.0, 0.5, 1.0, -1.0], [0.0, 3.0, -2.0, 1.0]]
Z_B = [[2.0, 1.5, 1.0, 1.0], [0.3, 1.0, -2.0, 1.5]]
Z_Q = [[1.5, 0.0, 1.2, -0.5], [0.2, 2.5, -1.0, 1.2]]
I_A = [[0, 2], [1, 3]]  # z_a sorted: pos0 2.0 > 1.0, pos1 3.0 > 1.0
I_D = [[3, 1], [1, 3]]  # |z_a - z_b|: pos0 [0, 1, 0, 2], pos1 [0.3, 2, 0, 0.5]
I_B = [[0, 1], [3, 1]]  # z_b sorted: pos0 2.0 > 1.5, pos1 1.5 > 1.0
VOCAB = [[0, 1, 2, 3]] * 2


def softmax(xs: list[float]) -> list[float]:
    total = sum(math.exp(x) for x in xs)
    return [math.exp(x) / total for x in xs]


def partial_kl(p: list[float], q: list[float], idx: list[int]) -> float:
    return sum(p[i] * (math.log(p[i]) - math.log(q[i])) for i in idx)


def hand_mean(teacher: list[list[float]], student: list[list[float]], idx: list[list[int]]) -> float:
    values = [partial_kl(softmax(t), softmax(s), i) for t, s, i in zip(teacher, student, idx, strict=True)]
    return sum(values) / len(values)


def tensor(rows: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def test_topk_indices_are_the_hand_picked_ones() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    assert t.pull_idx.tolist() == I_A
    assert t.push_idx.tolist() == I_D
    pa0 = softmax(Z_A[0])
    assert t.pull_prob[0].tolist() == pytest.approx([pa0[0], pa0[2]], abs=1e-7)
    pb1 = softmax(Z_B[1])
    assert t.push_prob[1].tolist() == pytest.approx([pb1[1], pb1[3]], abs=1e-7)


def test_pull_push_apc_equal_hand_computation() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    pull = hand_mean(Z_A, Z_Q, I_A)
    push = hand_mean(Z_B, Z_Q, I_D)
    assert kl_top_loss(tensor(Z_Q), t).item() == pytest.approx(pull, abs=1e-6)
    assert push_loss(tensor(Z_Q), t).item() == pytest.approx(push, abs=1e-6)
    terms = apc_loss(tensor(Z_Q), t, lam=0.1)
    assert terms.total.item() == pytest.approx(pull - 0.1 * push, abs=1e-6)
    assert terms.pull.item() == pytest.approx(pull, abs=1e-6)
    assert terms.push.item() == pytest.approx(push, abs=1e-6)
    assert set(terms.scalars()) == {"loss", "pull", "push"}


@pytest.mark.parametrize(
    "push_tokens, push_k, idx",
    [("diff", None, I_D), ("reference", None, I_B), ("vocab", None, VOCAB), ("diff", 1, [[3], [1]]), ("reference", 1, [[0], [3]])],
)
def test_push_variants_equal_hand_computation(push_tokens, push_k, idx) -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2, push_k=push_k, push_tokens=push_tokens)
    assert t.pull_idx.tolist() == I_A  # the pull keeps its own k
    assert (t.push_idx is None) == (push_tokens == "vocab")
    if t.push_idx is not None:
        assert t.push_idx.tolist() == idx
    assert t.push_prob.shape == (2, len(idx[0]))
    assert push_loss(tensor(Z_Q), t).item() == pytest.approx(hand_mean(Z_B, Z_Q, idx), abs=1e-6)
    hand_ref = [partial_kl(softmax(b), softmax(a), i) for a, b, i in zip(Z_A, Z_B, idx, strict=True)]
    assert t.push_ref.tolist() == pytest.approx(hand_ref, abs=1e-6)
    config = LossConfig(name="apc", lam=0.5, k=2, push_tokens=push_tokens, push_k=push_k)
    total = compute_loss(tensor(Z_Q), t, config).total.item()
    assert total == pytest.approx(hand_mean(Z_A, Z_Q, I_A) - 0.5 * hand_mean(Z_B, Z_Q, idx), abs=1e-6)


def test_vocabulary_push_is_the_full_kl_from_the_reference() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2, push_tokens="vocab")
    assert push_loss(tensor(Z_Q), t).item() == pytest.approx(kl_loss(tensor(Z_Q), tensor(Z_B)).item(), abs=1e-6)
    with pytest.raises(AaqError, match="vocabulary"):
        push_loss(tensor(Z_Q)[:, :3], t)


def test_bf16_and_batched_logits_give_the_fp32_flat_value() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    z_q = tensor(Z_Q, torch.bfloat16)
    expected = hand_mean(Z_A, z_q.float().tolist(), I_A)
    assert kl_top_loss(z_q.reshape(1, 2, 4), t).dtype == torch.float32
    assert kl_top_loss(z_q.reshape(1, 2, 4), t).item() == pytest.approx(expected, abs=1e-6)


def test_k_at_least_vocab_is_capped_and_pull_is_the_full_kl() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=10)
    assert t.pull_idx.shape == (2, 4) and t.push_idx.shape == (2, 4)
    full = hand_mean(Z_A, Z_Q, [[0, 1, 2, 3]] * 2)
    assert kl_top_loss(tensor(Z_Q), t).item() == pytest.approx(full, abs=1e-6)
    assert kl_loss(tensor(Z_Q), tensor(Z_A)).item() == pytest.approx(full, abs=1e-6)


def test_push_can_be_negative() -> None:
    # The student puts more mass than p_b on both push tokens of position 0 (indices 3 and 1).
    z_q = [[0.0, 5.0, 0.0, 5.0], Z_Q[1]]
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    hand = hand_mean(Z_B, z_q, I_D)
    first = partial_kl(softmax(Z_B[0]), softmax(z_q[0]), I_D[0])
    assert first < 0
    assert push_loss(tensor(z_q), t).item() == pytest.approx(hand, abs=1e-6)


def test_push_ref_is_the_aligned_models_own_push() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    hand = [partial_kl(softmax(b), softmax(a), i) for a, b, i in zip(Z_A, Z_B, I_D, strict=True)]
    assert t.push_ref.tolist() == pytest.approx(hand, abs=1e-6)
    assert push_loss(tensor(Z_A), t).item() == pytest.approx(sum(hand) / 2, abs=1e-6)


def test_faithful_apc_is_unbounded_below_and_bounded_apc_is_not() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    margin = 0.5
    push_ref = [partial_kl(softmax(b), softmax(a), i) for a, b, i in zip(Z_A, Z_B, I_D, strict=True)]
    # The pull is at least sum_{I_a} p_a log p_a, so the bounded loss has this floor.
    pull_floor = sum(sum(softmax(a)[i] * math.log(softmax(a)[i]) for i in idx) for a, idx in zip(Z_A, I_A, strict=True)) / 2
    floor = pull_floor - 0.1 * sum(r + margin for r in push_ref) / 2
    faithful, bounded = [], []
    for scale in (10.0, 100.0, 1000.0):
        # Student that copies z_a but drives the push tokens of position 0 (disjoint from I_a there) to p = 0.
        z_q = tensor(Z_A).clone()
        z_q[0, I_D[0]] = -scale
        faithful.append(apc_loss(z_q, t, lam=0.1).total.item())
        bounded.append(apc_loss(z_q, t, lam=0.1, bound_margin=margin).total.item())
    assert faithful[2] < faithful[1] < faithful[0]
    assert faithful[2] < floor - 10.0
    assert all(value >= floor - 1e-6 for value in bounded)


def test_bounded_push_equals_hand_clamp_and_has_no_gradient_when_clamped() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    margin = 0.25
    # Position 0 pushes far (clamped); position 1 is Z_Q[1] (below the clamp, see the assert).
    z_q = tensor([[2.0, -8.0, 1.0, -8.0], Z_Q[1]]).requires_grad_(True)
    rows = z_q.detach().tolist()
    push = [partial_kl(softmax(b), softmax(q), i) for b, q, i in zip(Z_B, rows, I_D, strict=True)]
    ref = [partial_kl(softmax(b), softmax(a), i) for a, b, i in zip(Z_A, Z_B, I_D, strict=True)]
    assert push[0] > ref[0] + margin and push[1] < ref[1] + margin
    hand = (min(push[0], ref[0] + margin) + min(push[1], ref[1] + margin)) / 2
    value = push_loss(z_q, t, bound_margin=margin)
    assert value.item() == pytest.approx(hand, abs=1e-6)
    value.backward()
    assert torch.all(z_q.grad[0] == 0)
    assert torch.any(z_q.grad[1] != 0)


def test_zero_probabilities_in_targets_are_safe() -> None:
    # An fp16 cache stores p = 0 for tokens far below the top; 0 * log 0 must count as 0, not NaN.
    t = TeacherTargets(pull_idx=torch.tensor([[0, 1]]), pull_prob=torch.tensor([[1.0, 0.0]], dtype=torch.float16))
    z_q = torch.tensor([[1.0, 0.0, -1.0]])
    expected = -math.log(softmax([1.0, 0.0, -1.0])[0])
    assert kl_top_loss(z_q, t).item() == pytest.approx(expected, abs=1e-6)


def test_mse_is_mean_squared_logit_error() -> None:
    hand = sum((q - a) ** 2 for qs, as_ in zip(Z_Q, Z_A, strict=True) for q, a in zip(qs, as_, strict=True)) / 8
    assert mse_loss(tensor(Z_Q), tensor(Z_A)).item() == pytest.approx(hand, abs=1e-6)


def test_compute_loss_dispatches_by_name() -> None:
    t = teacher_targets(tensor(Z_A), tensor(Z_B), k=2)
    z_q = tensor(Z_Q)
    apc = compute_loss(z_q, t, LossConfig(name="apc", lam=0.3, k=2))
    assert apc.total.item() == pytest.approx(hand_mean(Z_A, Z_Q, I_A) - 0.3 * hand_mean(Z_B, Z_Q, I_D), abs=1e-6)
    bounded = compute_loss(z_q, t, LossConfig(name="apc", k=2, bounded=True, margin=0.0))
    assert bounded.push.item() <= apc.push.item() + 1e-7
    assert compute_loss(z_q, t, LossConfig(name="kl_top")).push is None
    assert compute_loss(z_q, tensor(Z_A), LossConfig(name="kl")).total.item() == pytest.approx(
        kl_loss(z_q, tensor(Z_A)).item()
    )
    assert compute_loss(z_q, tensor(Z_A), LossConfig(name="mse")).total.item() == pytest.approx(
        mse_loss(z_q, tensor(Z_A)).item()
    )


def test_loss_config_properties() -> None:
    assert LossConfig("apc", k=50).resolved_push_k == 50 and LossConfig("apc", k=50, push_k=7).resolved_push_k == 7
    assert LossConfig("apc").needs_reference and LossConfig("apc").cacheable
    assert not LossConfig("kl_top").needs_reference and LossConfig("kl_top").cacheable
    assert not LossConfig("mse").cacheable and not LossConfig("kl").cacheable


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"name": "kld"}, "mse, kl, kl_top, apc"),
        ({"lam": -1.0}, "lambda"),
        ({"lam": float("nan")}, "lambda"),
        ({"k": 0}, "top-k"),
        ({"margin": float("inf"), "bounded": True}, "margin"),
        ({"name": "kl_top", "bounded": True}, "bounded"),
        ({"push_tokens": "logits"}, "diff, reference, vocab"),
        ({"push_k": 0}, "push top-k"),
        ({"push_k": True}, "push top-k"),
        ({"name": "kl_top", "push_tokens": "reference"}, "only to loss 'apc'"),
        ({"name": "kl_top", "push_k": 5}, "only to loss 'apc'"),
        ({"push_tokens": "vocab", "push_k": 5}, "no effect"),
    ],
)
def test_loss_config_rejects_bad_settings(kwargs: dict, fragment: str) -> None:
    with pytest.raises(AaqError, match=fragment):
        LossConfig(**kwargs)


def test_wrong_teacher_kind_and_missing_reference_are_errors() -> None:
    t_pull_only = teacher_targets(tensor(Z_A), None, k=2)
    assert t_pull_only.push_idx is None and t_pull_only.push_ref is None
    with pytest.raises(AaqError, match="reference"):
        apc_loss(tensor(Z_Q), t_pull_only)
    with pytest.raises(AaqError, match="no-cache"):
        compute_loss(tensor(Z_Q), t_pull_only, LossConfig(name="mse"))
    with pytest.raises(AaqError, match="TeacherTargets"):
        compute_loss(tensor(Z_Q), tensor(Z_A), LossConfig(name="apc"))
    with pytest.raises(AaqError, match="positions"):
        kl_top_loss(tensor(Z_Q)[:1], t_pull_only)
    with pytest.raises(AaqError, match="vocabulary"):
        teacher_targets(tensor(Z_A), tensor(Z_B)[:, :3])
