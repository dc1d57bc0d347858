"""Portable keyed draws built on Threefry-2x32 bits (array API only).

Every function takes the backend (for its namespace, device and word dtype)
and a :class:`~sdze_core.keys.Key`; the same key gives the same numbers on
every backend. The formulas:

* bits: ``b[i] = y0 ^ y1`` with ``(y0, y1) = threefry2x32(key, (0, i))`` for
  the row-major index ``i``, exactly ``jax.random.bits(key, shape, uint32)``;
* uniform, float32: ``(b >> 8) · 2⁻²⁴``; float64: 53 bits from two words,
  ``((b₀ >> 5) · 2²⁶ + (b₁ >> 6)) · 2⁻⁵³``; both in [0, 1), exact;
* normal: Box–Muller, ``sqrt(−2 log(1 − u₀)) · (cos 2πu₁, sin 2πu₁)``, both
  outputs used (equal to float tolerance across backends, since the
  transcendental functions are each library's own);
* Rademacher: ``1 − 2 · (b >> 31)``;
* integers in [low, low + n): ``floor(n · (b₀ · 2³² + b₁) / 2⁶⁴)``, a 64-bit
  multiply-high done in 16-bit limbs, so it runs on uint32-only libraries;
  its bias is below n / 2⁶⁴;
* k distinct indices of n: Floyd's algorithm on the host, O(k).
"""

from __future__ import annotations

import math

from .keys import Key, as_key
from .threefry import MASK32, threefry2x32

__all__ = [
    "portable_bits",
    "portable_uniform",
    "portable_normal",
    "portable_rademacher",
    "portable_integers",
    "floyd_sample",
]


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, int):
        return (shape,)
    shape = tuple(shape)
    if not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"shape must be non-negative ints, got {shape!r}")
    return shape


def portable_bits(backend, key: Key, shape):
    """Uniform 32-bit words of ``shape`` in the backend's word dtype."""
    key, shape = as_key(key), _shape(shape)
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"at most 2**32 - 1 random words per draw, asked for {n}")
    xp = backend.xp
    counter = backend.arange(n, dtype=backend.word_dtype)
    y0, y1 = threefry2x32(key.hi, key.lo, 0, counter, masked=not backend.native_uint32)
    return xp.reshape(y0 ^ y1, shape)


def portable_uniform(backend, key: Key, shape, dtype):
    """U[0, 1) in float32 (24 bits) or float64 (53 bits), exactly representable."""
    xp, shape = backend.xp, _shape(shape)
    if dtype == xp.float32:
        bits = backend.random_bits(key, shape)
        return xp.astype(bits >> 8, dtype) * (2.0**-24)
    bits = backend.random_bits(key, (2, *shape))
    high = xp.astype(bits[0, ...] >> 5, dtype)
    low = xp.astype(bits[1, ...] >> 6, dtype)
    return (high * 67108864.0 + low) * (2.0**-53)


def portable_normal(backend, key: Key, shape, dtype):
    """Standard normal by Box–Muller (tails cut at 5.8σ in float32, 8.6σ in float64)."""
    xp, shape = backend.xp, _shape(shape)
    n = math.prod(shape)
    half = (n + 1) // 2
    u = portable_uniform(backend, key, (2, half), dtype)
    radius = xp.sqrt(-2.0 * xp.log(1.0 - u[0, ...]))
    angle = (2.0 * math.pi) * u[1, ...]
    z = xp.concat((radius * xp.cos(angle), radius * xp.sin(angle)))
    return xp.reshape(z[:n], shape)


def portable_rademacher(backend, key: Key, shape, dtype):
    """±1 with probability 1/2 each, from the top bit of each word."""
    bits = backend.random_bits(key, _shape(shape))
    return 1.0 - 2.0 * backend.xp.astype(bits >> 31, dtype)


def _mul_high_low(a, n: int, wrap):
    """High and low 32-bit words of ``a · n`` for words ``a`` and an int n < 2**32."""
    a0, a1 = a & 0xFFFF, a >> 16
    n0, n1 = n & 0xFFFF, n >> 16
    lo_lo, hi_lo, lo_hi, hi_hi = a0 * n0, a1 * n0, a0 * n1, a1 * n1
    cross = (lo_lo >> 16) + (hi_lo & 0xFFFF) + lo_hi
    high = (hi_lo >> 16) + (cross >> 16) + hi_hi
    low = wrap(cross << 16) | (lo_lo & 0xFFFF)
    return high, low


def portable_integers(backend, key: Key, shape, low: int, high: int):
    """Uniform integers in ``[low, high)`` by a 64-bit multiply-high."""
    span = high - low
    if not 0 < span <= MASK32:
        raise ValueError(f"integers needs 0 < high - low < 2**32, got {span}")
    xp, shape = backend.xp, _shape(shape)
    bits = backend.random_bits(key, (2, *shape))
    wrap = (lambda v: v) if backend.native_uint32 else (lambda v: v & MASK32)
    hi_high, hi_low = _mul_high_low(bits[0, ...], span, wrap)
    lo_high, _ = _mul_high_low(bits[1, ...], span, wrap)
    middle = wrap(hi_low + lo_high)
    carry = xp.astype(middle < hi_low, backend.word_dtype)
    index = xp.astype(hi_high + carry, backend.index_dtype)
    return index + low if low else index


def _host_below(key: Key, counter: int, bound: int) -> int:
    """One exact draw from ``range(bound)`` on the host (64 random bits)."""
    y0, y1 = threefry2x32(key.hi, key.lo, 0, counter)
    return ((y0 << 32 | y1) * bound) >> 64


def floyd_sample(key: Key, n: int, k: int) -> list[int]:
    """``k`` distinct integers from ``range(n)``, uniformly (Floyd's algorithm).

    Every k-subset is equally likely; the order of the returned list is not
    itself random (the sparse estimators only use the set).
    """
    key = as_key(key)
    if not (isinstance(n, int) and isinstance(k, int)) or not 0 <= k <= n:
        raise ValueError(f"need integers 0 <= k <= n, got k={k!r}, n={n!r}")
    chosen: set[int] = set()
    out: list[int] = []
    for i, j in enumerate(range(n - k, n)):
        t = _host_below(key, i, j + 1)
        pick = j if t in chosen else t
        chosen.add(pick)
        out.append(pick)
    return out
