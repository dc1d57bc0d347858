"""Threefry-2x32-20, the counter-based generator behind JAX's default PRNG.

Threefry (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11)
maps a 64-bit key and a 64-bit counter to 64 pseudo-random bits with 20
rounds of add/rotate/xor on two 32-bit words. Being a pure function of
(key, counter) it needs no state, so the same key yields the same bits on
every backend: this module is the *portable* mode of :mod:`sdze_core.random`
(docs/keys.md; issue "Foundation", item 3).

One implementation serves three word representations:

* Python ``int`` (host-side scalars, used for ``split``/``fold_in``),
* ``uint32`` arrays, which wrap modulo 2**32 natively,
* ``int64`` arrays masked to their low 32 bits after every add and shift,
  for libraries without unsigned 32-bit arithmetic (PyTorch).

Only the array API's integer operators (``+ ^ | & << >>``) are used.
"""

from __future__ import annotations

MASK32 = 0xFFFFFFFF
_PARITY = 0x1BD11BDA
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotl(x, r, wrap):
    return wrap(x << r) | (x >> (32 - r))


def threefry2x32(k0, k1, x0, x1, *, masked=True):
    """Threefry-2x32 with 20 rounds on a pair of counter words.

    Parameters
    ----------
    k0, k1 : int or array
        The two 32-bit key words.
    x0, x1 : int or array
        The two 32-bit counter words (broadcast together with the key).
    masked : bool
        ``True`` when the words are Python ints or ``int64`` arrays and must be
        reduced modulo 2**32 after each add and left shift; ``False`` for
        ``uint32`` arrays, whose arithmetic already wraps.

    Returns
    -------
    (y0, y1)
        The two 32-bit output words, in the representation of the inputs.

    Notes
    -----
    Key schedule k2 = k0 ^ k1 ^ 0x1BD11BDA; five groups of four rounds
    ``x0 += x1; x1 = rotl(x1, R) ^ x0`` with the key injected after each group
    (Random123 ``threefry2x32_R(20)``; JAX ``threefry2x32_p``).
    """
    wrap = (lambda v: v & MASK32) if masked else (lambda v: v)
    ks = (k0, k1, wrap(k0 ^ k1 ^ _PARITY))
    x0 = wrap(x0 + ks[0])
    x1 = wrap(x1 + ks[1])
    for group in range(5):
        for r in _ROTATIONS[group % 2]:
            x0 = wrap(x0 + x1)
            x1 = _rotl(x1, r, wrap) ^ x0
        x0 = wrap(x0 + ks[(group + 1) % 3])
        x1 = wrap(x1 + ks[(group + 2) % 3] + group + 1)
    return x0, x1
