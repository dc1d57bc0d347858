"""Helpers shared by the engine's tests: host copies and tolerance checks."""

import numpy as np


def f64(backend):
    """The same backend in float64."""
    return backend.with_config(dtype="float64")


def host(b, x):
    """A NumPy copy of a backend array."""
    return np.array(b.to_host(x))


def host_params(b, params):
    """NumPy copies of a model's parameters."""
    return [{k: host(b, v) for k, v in p.items()} for p in params]


def copy_params(b, params):
    """Backend copies of a model's parameters (the engine updates in place)."""
    xp = b.xp
    return [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in params]


def assert_close(actual, expected, rtol):
    """max |actual − expected| <= rtol · max(1, max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)
