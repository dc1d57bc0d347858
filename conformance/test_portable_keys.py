"""Guarantee: a portable key gives bit-identical random bits on every backend.

Each backend is checked against an independent reference (pure-Python
Threefry-2x32 on the host, itself checked against Random123's known
answers in ``tests/test_keys.py``), and the cross-backend test compares every
available backend with every other on the same keys.
"""

import pytest

import sdze
from sdze.testing import get_test_backend, selected_backends
from sdze_core.threefry import threefry2x32

np = pytest.importorskip("numpy")

SHAPE = (3, 257)
KEYS = [sdze.key(0), sdze.key(2**40 + 3), sdze.fold_in(sdze.key(7), "spatial")]


def reference_bits(key, shape):
    n = int(np.prod(shape))
    words = [threefry2x32(key.hi, key.lo, 0, i) for i in range(n)]
    return np.array([y0 ^ y1 for y0, y1 in words], dtype=np.uint64).reshape(shape)


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_bits_equal_the_host_reference(backend, key):
    b = backend.with_config(rng="portable")
    got = np.asarray(b.to_host(b.random_bits(key, SHAPE))).astype(np.uint64)
    np.testing.assert_array_equal(got, reference_bits(key, SHAPE))


def draws(b, key):
    return {
        "bits": np.asarray(b.to_host(b.random_bits(key, SHAPE))).astype(np.uint64),
        "uniform32": b.to_host(b.uniform(key, SHAPE, "float32")),
        "integers": b.to_host(b.integers(key, SHAPE, -5, 10**6)).astype(np.int64),
        "choice": b.to_host(b.choice(key, 10**6, 32)).astype(np.int64),
        "rademacher": b.to_host(b.rademacher(key, SHAPE, "float32")),
        "normal32": b.to_host(b.normal(key, SHAPE, "float32")),
    }


def test_all_backends_agree(request):
    """The backends under test and the CPU references (numpy, array_api_strict)
    agree pairwise: exactly for bits, uniforms, integers, indices and signs;
    normals (Box-Muller through each library's log, sqrt, cos, sin) within
    float32 round-off (2e-6 + 2e-6 |z|)."""
    under_test = selected_backends(request.config)
    device = request.config.getoption("--device")
    available = {}
    for name in dict.fromkeys([*under_test, "numpy", "array_api_strict"]):
        try:
            b = get_test_backend(name, device=device if name in under_test else None)
        except pytest.skip.Exception:
            continue
        available[name] = b.with_config(rng="portable")
    if len(available) < 2:
        pytest.skip(f"fewer than two backends can run here: {sorted(available)}")
    for key in KEYS:
        results = {name: draws(b, key) for name, b in available.items()}
        (first, ref), *others = results.items()
        for name, got in others:
            for what in ("bits", "uniform32", "integers", "choice", "rademacher"):
                np.testing.assert_array_equal(
                    got[what], ref[what], err_msg=f"{what}: {name} vs {first}"
                )
            np.testing.assert_allclose(
                got["normal32"],
                ref["normal32"],
                rtol=2e-6,
                atol=2e-6,
                err_msg=f"normal: {name} vs {first}",
            )
