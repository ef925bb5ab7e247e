"""Hadamard matrices built by construction, randomised Hadamard rotations and a fast Hadamard transform.

A Hadamard matrix of order ``n`` is a ±1 matrix with ``H @ H.T == n * I``. Orders are 1, 2 or multiples
of 4. We build ``H_n = H_{2^k} ⊗ H_m`` from a Sylvester power of two and a block ``H_m`` that is either
trivial (``m = 1``) or a Paley matrix (``m = q + 1`` with prime ``q ≡ 3 mod 4``, or ``m = 2(q + 1)`` with
prime ``q ≡ 1 mod 4``). This covers every hidden/intermediate size of the LLaMA/Qwen/Mistral families we
target (576 = 16·36, 1536 = 128·12, 3584 = 128·28, 14336 = 512·28, 4864 = 64·76, ...).
"""

from __future__ import annotations

import logging
import math
from functools import cache, lru_cache

import torch

from aaq.errors import AaqError

logger = logging.getLogger(__name__)

# The fast transform applies the first few Sylvester factors together with the Paley block as one dense
# matmul of at most this order: measured on CPU, a 32-64 wide matmul is one memory pass and beats the
# equivalent 5-6 butterfly passes, while larger blocks turn compute-bound.
_DENSE_BLOCK_MAX = 64


class HadamardUnavailableError(AaqError, ValueError):
    """No Hadamard matrix of the requested order can be built by our constructions."""


def _unavailable(n: int) -> HadamardUnavailableError:
    """Return the error for an order ``n`` that has no construction."""
    return HadamardUnavailableError(
        f"no Hadamard matrix of order {n} can be built (need n = 2^k * m with m = 1, q+1 or 2(q+1) for a prime q); "
        "use random_hadamard for a random orthogonal fallback or pick a supported size"
    )


def _is_prime(q: int) -> bool:
    """Return whether ``q`` is a prime number."""
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley_one_prime(m: int) -> int | None:
    """Return the prime ``q ≡ 3 (mod 4)`` with ``m = q + 1``, if there is one."""
    q = m - 1
    return q if q % 4 == 3 and _is_prime(q) else None


def _paley_two_prime(m: int) -> int | None:
    """Return the prime ``q ≡ 1 (mod 4)`` with ``m = 2(q + 1)``, if there is one."""
    if m % 2:
        return None
    q = m // 2 - 1
    return q if q % 4 == 1 and _is_prime(q) else None


def _has_block(m: int) -> bool:
    """Return whether ``m`` is an order with a base (non-Sylvester) construction."""
    return m == 1 or _paley_one_prime(m) is not None or _paley_two_prime(m) is not None


@cache
def _factorisation(n: int) -> tuple[int, int] | None:
    """Return ``(2^k, m)`` with ``n = 2^k * m`` and the largest such power of two for which ``H_m`` exists."""
    if n < 1:
        return None
    power = n & -n
    block = n // power
    while power >= 1:
        if _has_block(block):
            return power, block
        power //= 2
        block *= 2
    return None


def has_hadamard(n: int) -> bool:
    """Return whether a Hadamard matrix of order ``n`` can be built (see ``hadamard_matrix``)."""
    return _factorisation(n) is not None


def _sylvester(order: int) -> torch.Tensor:
    """Return the Sylvester Hadamard matrix of a power-of-two ``order`` (int8), ``H_2 ⊗ ... ⊗ H_2``."""
    h = torch.ones(1, 1, dtype=torch.int8, device="cpu")
    while h.shape[0] < order:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Return the Jacobsthal matrix ``Q[i, j] = legendre(j - i, q)`` of a prime ``q`` (int8)."""
    legendre = -torch.ones(q, dtype=torch.int8, device="cpu")
    legendre[torch.tensor(sorted({x * x % q for x in range(1, q)}), dtype=torch.long)] = 1
    legendre[0] = 0
    idx = torch.arange(q, device="cpu")
    return legendre[(idx[None, :] - idx[:, None]) % q]


def _bordered(q: int, column_sign: int) -> torch.Tensor:
    """Return ``[[0, 1ᵀ], [column_sign * 1, Q]]`` around the Jacobsthal matrix of ``q`` (int8)."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.int8, device="cpu")
    c[0, 1:] = 1
    c[1:, 0] = column_sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley_one(q: int) -> torch.Tensor:
    """Return the Paley I Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)`` (int8)."""
    # S is skew-symmetric with S Sᵀ = qI, so (I + S)(I + S)ᵀ = I - S² = (q + 1) I.
    return torch.eye(q + 1, dtype=torch.int8, device="cpu") + _bordered(q, column_sign=-1)


def _paley_two(q: int) -> torch.Tensor:
    """Return the Paley II Hadamard matrix of order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)`` (int8)."""
    # Symmetric conference matrix C: each 0 becomes [[1, -1], [-1, -1]], each ±1 becomes ±[[1, 1], [1, -1]].
    c = _bordered(q, column_sign=1)
    on_entries = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8, device="cpu")
    on_zeros = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8, device="cpu")
    return torch.kron(c, on_entries) + torch.kron(torch.eye(q + 1, dtype=torch.int8, device="cpu"), on_zeros)


def _block(m: int) -> torch.Tensor:
    """Return the base Hadamard matrix of order ``m`` (1 or Paley), int8."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int8, device="cpu")
    q = _paley_one_prime(m)
    if q is not None:
        return _paley_one(q)
    q = _paley_two_prime(m)
    if q is None:
        raise _unavailable(m)
    return _paley_two(q)


@lru_cache(maxsize=16)
def _hadamard_int8(n: int) -> torch.Tensor:
    """Return the cached Hadamard matrix of order ``n`` as int8; callers must not mutate it."""
    factors = _factorisation(n)
    if factors is None:
        raise _unavailable(n)
    power, m = factors
    # Built outside inference mode so the cached tensor stays usable in autograd-recorded code later.
    with torch.inference_mode(False):
        return torch.kron(_sylvester(power), _block(m))


def hadamard_matrix(n: int) -> torch.Tensor:
    """Return a new float64 ±1 Hadamard matrix ``H`` of order ``n`` with ``H @ H.T == n * I``.

    ``H = H_{2^k} ⊗ H_m`` (Sylvester ⊗ Paley block) with the largest power of two that leaves a constructible
    block. Raises ``HadamardUnavailableError`` when no construction exists (e.g. ``n`` = 6, 9, 10).
    """
    return _hadamard_int8(n).to(torch.float64)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a Haar-random float64 orthogonal ``n x n`` matrix drawn from ``generator``."""
    if n < 1:
        raise AaqError(f"matrix order must be positive, got {n}; pass n >= 1")
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(gaussian)
    # Fixing the signs of diag(R) makes the QR factor unique, hence Haar-distributed.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def random_hadamard(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the float64 orthogonal matrix ``H_n diag(s) / sqrt(n)`` with random signs ``s`` (QuaRot).

    When no Hadamard matrix of order ``n`` exists, logs a warning and returns ``random_orthogonal(n)``.
    """
    if not has_hadamard(n):
        logger.warning("no Hadamard matrix of order %d exists; using a random orthogonal matrix instead", n)
        return random_orthogonal(n, generator)
    signs = torch.randint(0, 2, (n,), generator=generator, device="cpu").to(torch.float64) * 2 - 1
    return hadamard_matrix(n) * signs / math.sqrt(n)


def _butterfly(x: torch.Tensor, inner: int) -> torch.Tensor:
    """Return ``x @ (H_{n/inner} ⊗ I_inner)`` for a 2-D ``x`` of width ``n`` (Sylvester H, symmetric)."""
    x = x.contiguous()
    rows, n = x.shape
    stages = int(math.log2(n // inner))
    # Two ping-pong buffers written with out= avoid allocating a new tensor (and a cat/stack) per stage.
    buffers = [torch.empty_like(x) for _ in range(min(stages, 2))]
    src, h = x, inner
    for stage in range(stages):
        dst = buffers[stage % 2]
        s = src.view(rows, n // (2 * h), 2, h)
        d = dst.view(rows, n // (2 * h), 2, h)
        torch.add(s[:, :, 0], s[:, :, 1], out=d[:, :, 0])
        torch.sub(s[:, :, 0], s[:, :, 1], out=d[:, :, 1])
        src, h = dst, 2 * h
    return src


class _SylvesterButterfly(torch.autograd.Function):
    """Autograd wrapper of ``_butterfly``; the map is symmetric, so its adjoint is itself."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, inner: int) -> torch.Tensor:
        ctx.inner = inner
        return _butterfly(x, inner)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _SylvesterButterfly.apply(grad, ctx.inner), None


@cache
def _leading_block(n: int) -> torch.Tensor:
    """Return ``(H_d / sqrt(n)).T`` (float64), the dense factor of ``H_n = H_{n/d} ⊗ H_d`` used by the transform."""
    _, d = _factorisation(n)
    while d * 2 <= _DENSE_BLOCK_MAX and d * 2 <= n:
        d *= 2
    # H_d factorises as H_{d/m} ⊗ H_m (same search), and Sylvester H_{2^k} = H_{2^k d/n} ⊗ H_{d/m}, so
    # H_n = H_{n/d} ⊗ H_d with the same ordering as hadamard_matrix(n).
    with torch.inference_mode(False):
        return (hadamard_matrix(d) / math.sqrt(n)).T.contiguous()


@lru_cache(maxsize=64)
def _leading_block_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`_leading_block(n)` in `dtype` on `device`, cached: the transform runs in the hot path of every forward."""
    with torch.inference_mode(False):
        return _leading_block(n).to(device=device, dtype=dtype)


def fast_hadamard_transform(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Return ``x @ hadamard_matrix(n).T / sqrt(n)`` over the last dimension ``n``, in ``x``'s dtype and device.

    `inverse=True` returns ``x @ hadamard_matrix(n) / sqrt(n)``, which undoes the forward transform
    (the matrix is orthogonal but not always symmetric). O(n log n), differentiable, any leading
    shape. Half-precision inputs are computed in float32. Raises ``HadamardUnavailableError`` when
    no Hadamard matrix of order ``n`` exists.
    """
    if not torch.is_floating_point(x):
        raise TypeError(f"fast_hadamard_transform needs a floating-point tensor, got {x.dtype}")
    n = x.shape[-1]
    if not has_hadamard(n):
        raise _unavailable(n)
    work_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    block = _leading_block_on(n, x.device, work_dtype)
    if inverse:
        # The Sylvester butterfly is symmetric; only the dense Kronecker factor needs transposing.
        block = block.T
    d = block.shape[0]
    rows = x.numel() // n
    y = (x.to(work_dtype).reshape(rows * (n // d), d) @ block).reshape(rows, n)
    if d < n:
        y = _SylvesterButterfly.apply(y, d)
    return y.reshape(x.shape).to(x.dtype)
