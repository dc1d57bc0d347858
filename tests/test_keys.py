"""Keys: JAX-compatible derivations, Random123 known answers, determinism, independence."""

import math

import pytest

import sdze
from sdze_core.threefry import threefry2x32

# Random123 kat_vectors, threefry2x32_20: (key, counter) -> output.
RANDOM123_KAT = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
]


@pytest.mark.parametrize(("key", "counter", "expected"), RANDOM123_KAT)
def test_threefry_random123_known_answers_on_host(key, counter, expected):
    assert threefry2x32(*key, *counter) == expected


def test_threefry_known_answers_on_every_backend(backend):
    xp = backend.xp
    for (k0, k1), (c0, c1), expected in RANDOM123_KAT:
        x0 = backend.asarray([c0], dtype=backend.word_dtype)
        x1 = backend.asarray([c1], dtype=backend.word_dtype)
        y0, y1 = threefry2x32(k0, k1, x0, x1, masked=not backend.native_uint32)
        got = (int(backend.to_host(y0)[0]), int(backend.to_host(y1)[0]))
        assert got == expected, backend.name
        assert xp.isdtype(y0.dtype, "integral")


def test_key_split_fold_in_match_jax():
    jax = pytest.importorskip("jax")
    import numpy as np

    for seed in (0, 42, 2**32 + 7, 2**64 - 1):
        k = sdze.key(seed)
        jk = jax.random.key(seed) if seed < 2**63 else None
        if jk is None:
            continue
        assert k.words == tuple(int(w) for w in jax.random.key_data(jk))
        ours = [s.words for s in sdze.split(k, 5)]
        theirs = [
            tuple(int(w) for w in row)
            for row in np.asarray(jax.random.key_data(jax.random.split(jk, 5)))
        ]
        assert ours == theirs
        for data in (0, 1, 123456, 2**32 - 1):
            folded = jax.random.key_data(jax.random.fold_in(jk, data))
            assert sdze.fold_in(k, data).words == tuple(int(w) for w in folded)


def test_keys_are_deterministic_values():
    assert sdze.key(7) == sdze.key(7)
    assert sdze.split(sdze.key(7), 3) == sdze.split(sdze.key(7), 3)
    assert sdze.fold_in(sdze.key(7), "spatial") == sdze.fold_in(sdze.key(7), "spatial")
    assert hash(sdze.key(7)) == hash(sdze.key(7))


def test_derived_keys_are_distinct():
    root = sdze.key(0)
    derived = list(sdze.split(root, 1000))
    derived += [sdze.fold_in(root, i) for i in range(1000, 1100)]
    derived += [sdze.fold_in(root, role) for role in ("spatial", "param", "layer", "init")]
    assert len(set(derived)) == len(derived)
    assert root not in derived


def test_split_keys_give_independent_bits():
    """Bits of sibling keys are uncorrelated: |corr| < 4.5 sigma over 2**16 pairs."""
    np = pytest.importorskip("numpy")
    with sdze.use("numpy"):
        a, b = sdze.split(sdze.key(3))
        n = 2**16
        u = sdze.random.uniform(a, (n,), "float64", backend="numpy") - 0.5
        v = sdze.random.uniform(b, (n,), "float64", backend="numpy") - 0.5
        corr = float(np.mean(u * v) / np.sqrt(np.mean(u * u) * np.mean(v * v)))
        # corr ~ N(0, 1/n) under independence; 4.5 sigma: false alarm < 1e-5.
        assert abs(corr) < 4.5 / math.sqrt(n)


@pytest.mark.parametrize("bad", [-1, 2**64, 1.5, "0", True])
def test_bad_seeds_are_rejected(bad):
    with pytest.raises((TypeError, ValueError), match="seed"):
        sdze.key(bad)


def test_bad_fold_in_data_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        sdze.fold_in(sdze.key(0), -3)
    with pytest.raises(TypeError, match="int or a str"):
        sdze.fold_in(sdze.key(0), 1.0)
    with pytest.raises(TypeError, match="Key or an int seed"):
        sdze.split("not a key")
