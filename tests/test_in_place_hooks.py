"""The backend hooks that keep gigabyte arrays single: ``write_columns``, ``scale``,
and JAX's blocked native draws.

On every backend the values are those of the plain expressions; writeable arrays
are changed in place (the same object comes back), and on JAX the input buffer is
donated (consumed, its memory reused), which is what keeps the first layer's
streamed update, the point draw and the initialisation at one copy of W or of the
batch (docs/benchmarks.md, peak memory at d = 10⁶).
"""

import array_api_compat
import numpy as np
import pytest

from sdze_core import jets
from sdze_core.keys import key
from sdze_core.registry import backend_of


def _host(a):
    return np.asarray(backend_of(a).to_host(a), dtype=np.float64)


def test_write_columns_replaces_the_columns(backend):
    W = backend.normal(key(0), (4, 10))
    expected = _host(W).copy()
    block = backend.normal(key(1), (4, 3))
    expected[:, 5:8] = _host(block)
    writeable = array_api_compat.is_writeable_array(W)
    out = backend.write_columns(W, 5, block)
    np.testing.assert_array_equal(_host(out), expected)
    if writeable:
        assert out is W
    assert out.shape == (4, 10) and out.dtype == backend.float_dtype()


def test_scale_multiplies_in_place(backend):
    x = backend.normal(key(2), (3, 7))
    factor = backend.uniform(key(3), (3,))
    expected = _host(x) * _host(factor)[:, None]
    writeable = array_api_compat.is_writeable_array(x)
    out = backend.scale(x, factor[:, None])
    np.testing.assert_allclose(_host(out), expected, rtol=1e-6)
    assert out.dtype == backend.float_dtype()
    if writeable:
        assert out is x
    doubled = 2 * _host(out)
    assert _host(backend.scale(out, 2.0)).tolist() == doubled.tolist()


def _jax_backend():
    pytest.importorskip("jax")
    from sdze.testing import get_backend_under_test

    return get_backend_under_test("jax")


def test_jax_write_columns_and_scale_reuse_the_donated_buffer():
    backend = _jax_backend()
    W = backend.normal(key(0), (8, 64))
    pointer = W.unsafe_buffer_pointer()
    out = backend.write_columns(W, 16, backend.normal(key(1), (8, 16)))
    assert W.is_deleted(), "write_columns must consume W (its buffer is donated)"
    assert out.unsafe_buffer_pointer() == pointer
    scaled = backend.scale(out, 0.5)
    assert out.is_deleted()
    assert scaled.unsafe_buffer_pointer() == pointer


def test_jax_blocked_draws_are_keyed_blockwise_and_standard(monkeypatch):
    """A draw above the threshold comes in column blocks from fold_in(key, i): same key,
    same numbers; the blocks differ; the moments are N(0, 1)'s and U[0, 1)'s at 99.9 %."""
    backend = _jax_backend()
    import sdze_backends.jax as jax_backend

    monkeypatch.setattr(jax_backend, "BLOCKED_DRAW", 1000)
    monkeypatch.setattr(jax_backend, "DRAW_BLOCK", 400)
    rows, cols = 20, 2000  # 40 000 numbers, blocks of 20 columns
    z = _host(backend.normal(key(4), (rows, cols)))
    again = _host(backend.normal(key(4), (rows, cols)))
    np.testing.assert_array_equal(z, again)
    assert not np.array_equal(z[:, :20], z[:, 20:40])
    n = z.size
    bound = 3.29  # two-sided 99.9 %
    assert abs(z.mean()) < bound / np.sqrt(n)
    assert abs(z.var() - 1.0) < bound * np.sqrt(2.0 / n)
    u = _host(backend.uniform(key(5), (rows, cols)))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < bound * np.sqrt(1 / 12 / n)


def test_matmul_transposed_in_column_blocks(backend, monkeypatch):
    """x Wᵀ from the backend's hook (the activity engine's first layer; JAX sums column
    blocks) equals the plain product, with blocks of 3 columns over 10."""
    monkeypatch.setattr(type(backend), "matmul_block_elements", 12)  # m = 4: 3 columns
    x = backend.normal(key(7), (5, 10))
    W = backend.normal(key(8), (4, 10))
    expected = _host(x) @ _host(W).T
    np.testing.assert_allclose(_host(backend.matmul_transposed(x, W)), expected,
                               rtol=1e-5, atol=1e-5)


def test_rowwise_squared_norm_hook(backend):
    """‖x_b‖² from the backend's hook equals the sum of squares, on 2-D and 3-D arrays."""
    for shape in ((5, 10), (2, 3, 7)):
        x = backend.normal(key(9), shape)
        expected = (_host(x).astype(np.float64) ** 2).sum(-1)
        np.testing.assert_allclose(_host(backend.rowwise_squared_norm(x)), expected,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_host(jets.rowwise_squared_norm(x)), expected,
                                   rtol=1e-5, atol=1e-6)
