import logging
import math

import pytest
import torch

from aaq.errors import AaqError
from aaq.transforms.hadamard import (
    HadamardUnavailableError,
    fast_hadamard_transform,
    hadamard_matrix,
    has_hadamard,
    random_hadamard,
    random_orthogonal,
)

SMALL_SIZES = [1, 2, 4, 12, 20, 28, 36, 44, 48, 60, 64, 76, 80, 96, 128, 160]
MEDIUM_SIZES = [576, 768, 896, 1536]
LARGE_SIZES = [2304, 3584, 4864]


def _dense_transform(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    return x @ hadamard_matrix(n).T.to(x.dtype) / math.sqrt(n)


def _sylvester_entry(i: torch.Tensor, j: int) -> torch.Tensor:
    """(-1)^popcount(i & j): the Sylvester matrix entry, written independently of the module."""
    bits = i & j
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits >>= 1
    return 1 - 2 * parity


@pytest.mark.parametrize("n", SMALL_SIZES + MEDIUM_SIZES)
def test_hadamard_matrix_is_exactly_orthogonal_with_unit_entries(n: int) -> None:
    h = hadamard_matrix(n)
    assert h.dtype == torch.float64 and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones_like(h))
    # Entries are ±1 and sums stay below 2^24, so a float32 product is exact and faster.
    assert torch.equal(h.float() @ h.float().T, n * torch.eye(n))


@pytest.mark.parametrize("n", LARGE_SIZES)
def test_large_hadamard_rows_are_orthogonal_to_every_row(n: int) -> None:
    h = hadamard_matrix(n).float()
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:48]
    expected = torch.zeros(48, n)
    expected[torch.arange(48), rows] = n
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h[rows] @ h.T, expected)


def test_hadamard_matrix_returns_an_independent_copy() -> None:
    h = hadamard_matrix(12)
    h.zero_()
    assert torch.equal(hadamard_matrix(12) @ hadamard_matrix(12).T, 12 * torch.eye(12, dtype=torch.float64))


def test_sizes_are_split_into_a_largest_power_of_two_and_a_paley_block() -> None:
    # 576 = 16 * 36 (Paley II, q = 17): the top-left 36 x 36 block is the Paley block itself.
    assert torch.equal(hadamard_matrix(576)[:36, :36], hadamard_matrix(36))
    assert torch.equal(hadamard_matrix(1536), torch.kron(hadamard_matrix(128), hadamard_matrix(12)))


@pytest.mark.parametrize("n", [6, 9, 10, 18, 22, 0, -4])
def test_orders_without_construction_raise(n: int) -> None:
    assert not has_hadamard(n)
    with pytest.raises(HadamardUnavailableError, match=f"order {n}"):
        hadamard_matrix(n)
    with pytest.raises(HadamardUnavailableError):
        fast_hadamard_transform(torch.zeros(2, max(n, 0)))


def test_error_type_is_user_facing_value_error() -> None:
    assert issubclass(HadamardUnavailableError, ValueError)
    assert issubclass(HadamardUnavailableError, AaqError)


@pytest.mark.parametrize("n", SMALL_SIZES + MEDIUM_SIZES + [2304, 3584])
def test_fast_transform_matches_dense_product_float64(n: int) -> None:
    dense = hadamard_matrix(n).T / math.sqrt(n)
    generator = torch.Generator().manual_seed(n)
    for leading in [(), (3,), (2, 5)]:
        x = torch.randn(*leading, n, dtype=torch.float64, generator=generator)
        y = fast_hadamard_transform(x)
        assert y.shape == x.shape and y.dtype == torch.float64
        torch.testing.assert_close(y, x @ dense, rtol=0, atol=1e-10)
        torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_fast_transform_of_14336_matches_kronecker_columns() -> None:
    # 14336 = 512 * 28: the dense matrix is 1.6 GB in float64, so check columns against an independent formula.
    n, m = 14336, 28
    cols = torch.tensor([0, 1, 27, 28, 29, 5000, 9999, n - 1])
    basis = torch.zeros(len(cols), n, dtype=torch.float64)
    basis[torch.arange(len(cols)), cols] = 1.0
    got = fast_hadamard_transform(basis)  # row k = column cols[k] of H / sqrt(n)
    block = hadamard_matrix(m)
    rows = torch.arange(n)
    for k, j in enumerate(cols.tolist()):
        expected = _sylvester_entry(rows // m, j // m).double() * block[rows % m, j % m] / math.sqrt(n)
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(got @ got.T, torch.eye(len(cols), dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(fast_hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_fast_transform_is_linear_and_inverted_by_the_transposed_matrix() -> None:
    n = 96
    x = torch.randn(7, n, dtype=torch.float64)
    y = fast_hadamard_transform(x)
    torch.testing.assert_close(y @ hadamard_matrix(n) / math.sqrt(n), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast_hadamard_transform(2 * x - y), 2 * y - fast_hadamard_transform(y))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_fast_transform_keeps_dtype_with_precision_dependent_error(dtype: torch.dtype, atol: float) -> None:
    x = torch.randn(4, 3, 1536, dtype=torch.float64)
    y = fast_hadamard_transform(x.to(dtype))
    assert y.dtype == dtype and y.device == x.device
    # Inputs and outputs are O(1); bf16 output rounding alone is ~4e-3 relative.
    torch.testing.assert_close(y.double(), _dense_transform(x), rtol=0, atol=atol)


def test_fast_transform_of_non_contiguous_input() -> None:
    x = torch.randn(48, 5, dtype=torch.float64).T
    torch.testing.assert_close(fast_hadamard_transform(x), _dense_transform(x.contiguous()), rtol=0, atol=1e-12)


def test_fast_transform_of_empty_batch() -> None:
    assert fast_hadamard_transform(torch.zeros(0, 3, 192)).shape == (0, 3, 192)


@pytest.mark.parametrize("n", [48, 192, 640])
def test_fast_transform_gradients(n: int) -> None:
    # 192 and 640 exercise the butterfly stages, 48 only the dense block.
    x = torch.randn(2, n, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,), fast_mode=True)
    assert torch.autograd.gradgradcheck(fast_hadamard_transform, (x,), fast_mode=True)


def test_gradient_equals_dense_adjoint_in_float32() -> None:
    n = 1536
    x = torch.randn(3, n, requires_grad=True)
    upstream = torch.randn(3, n)
    (fast_hadamard_transform(x) * upstream).sum().backward()
    expected = upstream.double() @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(x.grad.double(), expected, rtol=0, atol=1e-5)


def test_fast_transform_first_called_in_inference_mode_still_supports_autograd() -> None:
    n = 2 * 448  # a size no other test uses, so the cached block is first built under inference mode
    with torch.inference_mode():
        fast_hadamard_transform(torch.randn(2, n))
    x = torch.randn(2, n, requires_grad=True)
    fast_hadamard_transform(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_fast_transform_rejects_integer_input() -> None:
    with pytest.raises(TypeError):
        fast_hadamard_transform(torch.ones(2, 4, dtype=torch.int64))


@pytest.mark.parametrize("n", [12, 64, 576])
def test_random_hadamard_is_orthogonal_and_seeded(n: int) -> None:
    q = random_hadamard(n, torch.Generator().manual_seed(0))
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    signs = torch.sign(q[0] * hadamard_matrix(n)[0])  # H diag(s) / sqrt(n): row 0 reveals s
    assert torch.equal(q, hadamard_matrix(n) * signs / math.sqrt(n))
    assert torch.equal(q, random_hadamard(n, torch.Generator().manual_seed(0)))
    assert not torch.equal(q, random_hadamard(n, torch.Generator().manual_seed(1)))
    assert (signs > 0).any() and (signs < 0).any()


def test_random_hadamard_falls_back_to_random_orthogonal_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aaq.transforms.hadamard"):
        q = random_hadamard(9, torch.Generator().manual_seed(0))
    assert "order 9" in caplog.text and "random orthogonal" in caplog.text
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(9, torch.Generator().manual_seed(0)))


def test_random_hadamard_does_not_warn_when_a_hadamard_exists(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="aaq.transforms.hadamard"):
        random_hadamard(36)
    assert caplog.records == []


def test_random_orthogonal_is_orthogonal_and_seeded() -> None:
    q = random_orthogonal(10, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.T, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(10, torch.Generator().manual_seed(3)))
    assert not torch.equal(q, random_orthogonal(10, torch.Generator().manual_seed(4)))
    with pytest.raises(AaqError, match="positive"):
        random_orthogonal(0)
