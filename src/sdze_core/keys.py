"""Explicit random keys: ``key``, ``split`` and ``fold_in``.

All randomness in sdze flows from :class:`Key` values passed as arguments;
there is no global random state. A key is two 32-bit words, laid out exactly
like a JAX ``threefry2x32`` key, and the derivations below are JAX's
(``jax_threefry_partitionable`` mode):

* ``key(seed)``          = (seed >> 32, seed & 0xFFFFFFFF)
* ``split(k, n)[i]``     = threefry2x32(k, (0, i))
* ``fold_in(k, data)``   = threefry2x32(k, (0, data))

so ``sdze.key(s)`` and ``jax.random.key(s)`` name the same stream, and
keys derived on the host never touch a device. ``fold_in`` also accepts a
string (a *role*, e.g. ``"spatial"`` or ``"param"``), hashed to 32 bits with
CRC-32, so key trees read like the algorithm they drive::

    step_key = fold_in(run_key, step)
    spatial = fold_in(step_key, "spatial")   # collocation points, directions
    param = fold_in(step_key, "param")       # perturbations z_i

The arrays drawn from a key are produced by :mod:`sdze_core.random`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from .threefry import MASK32, threefry2x32

__all__ = ["Key", "key", "split", "fold_in", "as_key"]


@dataclass(frozen=True, slots=True)
class Key:
    """An immutable Threefry-2x32 key: two unsigned 32-bit words.

    Keys are cheap host-side values: hashable, comparable, and identical on
    every backend. Create them with :func:`key`, derive new ones with
    :func:`split` and :func:`fold_in`; never reuse one key for two purposes.
    """

    hi: int
    lo: int

    def __post_init__(self):
        for word in (self.hi, self.lo):
            if not isinstance(word, int) or not 0 <= word <= MASK32:
                raise ValueError(f"key words must be integers in [0, 2**32); got {word!r}")

    @property
    def words(self) -> tuple[int, int]:
        """The key as ``(hi, lo)``, the order of ``jax.random.key_data``."""
        return (self.hi, self.lo)

    def __repr__(self) -> str:
        return f"Key(0x{self.hi:08x}, 0x{self.lo:08x})"


def key(seed: int) -> Key:
    """Make a root key from a non-negative integer seed below 2**64.

    Equal to ``jax.random.key(seed)`` for the default ``threefry2x32`` impl.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return Key(seed >> 32, seed & MASK32)


def as_key(k: Key | int) -> Key:
    """Accept a :class:`Key` or an integer seed; anything else is a TypeError."""
    if isinstance(k, Key):
        return k
    if isinstance(k, int) and not isinstance(k, bool):
        return key(k)
    raise TypeError(f"expected an sdze Key or an int seed, got {type(k).__name__}")


def _derive(k: Key, counter: int) -> Key:
    return Key(*threefry2x32(k.hi, k.lo, 0, counter))


def split(k: Key, num: int = 2) -> tuple[Key, ...]:
    """Split a key into ``num`` independent keys (``jax.random.split``)."""
    k = as_key(k)
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    return tuple(_derive(k, i) for i in range(num))


def _role_word(data: int | str) -> int:
    if isinstance(data, str):
        return zlib.crc32(data.encode("utf-8"))
    if isinstance(data, bool) or not isinstance(data, int):
        raise TypeError(f"fold_in data must be an int or a str, got {type(data).__name__}")
    if not 0 <= data <= MASK32:
        raise ValueError(f"fold_in data must be in [0, 2**32), got {data}")
    return data


def fold_in(k: Key, data: int | str) -> Key:
    """Derive a key from ``k`` and a step, index or role name.

    Integers give ``jax.random.fold_in(k, data)``; a string is first hashed
    to a 32-bit word with CRC-32.
    """
    return _derive(as_key(k), _role_word(data))
