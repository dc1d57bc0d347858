"""Keyed draws: same key, same numbers; right distributions; portable mode identical."""

import math

import pytest

import sdze
from sdze_core.random import floyd_sample

np = pytest.importorskip("numpy")


def host(backend, x):
    return np.asarray(backend.to_host(x))


@pytest.mark.parametrize("rng", ["native", "portable"])
@pytest.mark.parametrize("draw", ["uniform", "normal", "rademacher"])
def test_same_key_same_numbers(backend, rng, draw):
    b = backend.with_config(rng=rng)
    k = sdze.key(11)
    first = host(b, getattr(b, draw)(k, (4, 5)))
    again = host(b, getattr(b, draw)(k, (4, 5)))
    other = host(b, getattr(b, draw)(sdze.fold_in(k, 1), (4, 5)))
    assert first.shape == (4, 5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("rng", ["native", "portable"])
def test_integers_and_choice_deterministic_and_in_range(backend, rng):
    b = backend.with_config(rng=rng)
    k = sdze.key(5)
    ints = host(b, b.integers(k, (1000,), 3, 17))
    np.testing.assert_array_equal(ints, host(b, b.integers(k, (1000,), 3, 17)))
    assert ints.min() >= 3 and ints.max() < 17
    assert set(ints.tolist()) == set(range(3, 17))
    picked = host(b, b.choice(k, 10**7, 16))
    assert len(set(picked.tolist())) == 16 and picked.min() >= 0 and picked.max() < 10**7
    np.testing.assert_array_equal(picked, host(b, b.choice(k, 10**7, 16)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rng", ["native", "portable"])
def test_distributions_moments(backend, rng, dtype):
    """Mean and variance within 5 standard errors (false alarm < 1e-6 each), n = 2**16."""
    if backend.name == "jax" and dtype == "float64":
        b = backend.with_config(rng=rng, dtype="float64")
    else:
        b = backend.with_config(rng=rng, dtype=dtype)
    n = 2**16
    k = sdze.key(2024)
    u = host(b, b.uniform(sdze.fold_in(k, 0), (n,))).astype(np.float64)
    z = host(b, b.normal(sdze.fold_in(k, 1), (n,))).astype(np.float64)
    s = host(b, b.rademacher(sdze.fold_in(k, 2), (n,)))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert set(np.unique(s).tolist()) == {-1.0, 1.0}
    assert abs(s.mean()) < 5 / math.sqrt(n)
    assert str(b.normal(k, (2,)).dtype).endswith(dtype)


def test_portable_integers_uniform_chi_square(backend):
    """Chi-square over 10 bins, n = 10**5: statistic < 33.7 (df 9, p = 1e-4)."""
    b = backend.with_config(rng="portable")
    counts = np.bincount(host(b, b.integers(sdze.key(9), (100_000,), 0, 10)), minlength=10)
    chi2 = float(((counts - 10_000) ** 2 / 10_000).sum())
    assert chi2 < 33.7


def test_floyd_sample_is_uniform_over_subsets():
    """All C(5, 2) = 10 subsets equally likely: chi-square, df 9, p = 1e-4."""
    counts = {}
    for i in range(20_000):
        subset = frozenset(floyd_sample(sdze.fold_in(sdze.key(1), i), 5, 2))
        counts[subset] = counts.get(subset, 0) + 1
    assert len(counts) == 10
    chi2 = sum((c - 2000) ** 2 / 2000 for c in counts.values())
    assert chi2 < 33.7


def test_choice_edge_cases(backend):
    assert host(backend, backend.choice(sdze.key(0), 5, 0)).shape == (0,)
    assert sorted(host(backend, backend.choice(sdze.key(0), 5, 5)).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="0 <= k <= n"):
        backend.choice(sdze.key(0), 3, 4)
    with pytest.raises(ValueError, match="high > low"):
        backend.integers(sdze.key(0), (2,), 5, 5)


def test_portable_bits_match_jax_random_bits(backend):
    jax = pytest.importorskip("jax")
    k = sdze.key(123456789)
    ours = host(backend, backend.random_bits(k, (3, 7)))
    theirs = np.asarray(jax.random.bits(jax.random.key(123456789), (3, 7), jax.numpy.uint32))
    np.testing.assert_array_equal(ours.astype(np.uint64), theirs.astype(np.uint64))


def test_qr_gives_orthonormal_columns(backend):
    b = backend.with_config(dtype="float64")
    a = b.normal(sdze.key(4), (50, 6))
    q, r = b.qr(a)
    qh = host(b, q)
    np.testing.assert_allclose(qh.T @ qh, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(qh @ host(b, r), host(b, a), atol=1e-12)


def test_jit_hook_preserves_results(backend):
    if backend.name == "torch":
        pytest.importorskip("torch")
    x = backend.asarray([1.0, 2.0, 3.0])
    f = lambda v: backend.xp.sum(v * v)  # noqa: E731
    assert float(backend.jit(f)(x)) == pytest.approx(14.0)
    backend.synchronize(x)


def test_peak_memory_sees_an_allocation(backend, request):
    """In a fresh process (so no freed, still-resident memory is reused), a
    256 MiB array raises the peak reading by at least 200 MiB (on the device
    the backend under test was built for: ``--device``, or its default)."""
    import subprocess
    import sys

    code = f"""
import sdze
b = sdze.use({backend.name!r}, device={request.config.getoption("--device")!r}).backend
b.reset_peak_memory()
before = b.peak_memory()
big = b.zeros((64, 1024, 1024), dtype=b.xp.float32) + 1.0
b.synchronize(big)
print(b.peak_memory() - before)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 200 * 2**20
