"""Keyed random draws on the current backend (or the one given).

Each function is a thin front to the :class:`~sdze_core.backend.Backend`
method of the same name; see :mod:`sdze_core.random` for the formulas.

>>> import sdze
>>> k = sdze.key(0)
>>> z = sdze.random.normal(sdze.fold_in(k, "param"), (3, 4))
"""

from __future__ import annotations

from sdze_core.keys import as_key
from sdze_core.registry import resolve_backend

__all__ = ["bits", "uniform", "normal", "rademacher", "integers", "choice"]


def bits(key, shape, *, backend=None):
    """Uniform 32-bit words, bit-identical on every backend (``jax.random.bits``)."""
    return resolve_backend(backend=backend).random_bits(as_key(key), shape)


def uniform(key, shape, dtype=None, *, backend=None):
    """U[0, 1) draws."""
    return resolve_backend(backend=backend).uniform(as_key(key), shape, dtype)


def normal(key, shape, dtype=None, *, backend=None):
    """Standard normal draws."""
    return resolve_backend(backend=backend).normal(as_key(key), shape, dtype)


def rademacher(key, shape, dtype=None, *, backend=None):
    """±1 draws with probability 1/2 each."""
    return resolve_backend(backend=backend).rademacher(as_key(key), shape, dtype)


def integers(key, shape, low, high, *, backend=None):
    """Uniform integers in ``[low, high)``."""
    return resolve_backend(backend=backend).integers(as_key(key), shape, low, high)


def choice(key, n, k, *, backend=None):
    """``k`` distinct indices out of ``range(n)``."""
    return resolve_backend(backend=backend).choice(as_key(key), n, k)
