"""Helpers shared by the engine's tests: host copies and tolerance checks."""

import numpy as np

from sdze_core.samplers import LowRankSubspace


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


def dense_params(b, sampler, state, directions, params, query, scale):
    """θ + s z_query (plus the pending low-rank update) formed explicitly, on the backend."""
    out = []
    for layer, p in enumerate(host_params(b, params)):
        W, bias = p["W"], p["b"]
        if isinstance(sampler, LowRankSubspace):
            Z = host(b, sampler.perturbation(directions, layer, query))
            if state.pending is not None:
                U, V = (host(b, a) for a in sampler.bases(state, params)[layer])
                W = W + U @ host(b, state.pending[layer]) @ V.T
        else:
            Z = host(b, directions.W[layer])[query]
        zb = host(b, directions.bias[layer])[query]
        out.append({"W": W + scale * Z, "b": bias + scale * zb})
    return [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in out]


def isolate_problem_registry(monkeypatch):
    """The test's registrations (and entry points) are undone after it."""
    from sdze_core import problem_registry

    problem_registry.known_problems()  # the built-ins and installed entry points, loaded
    monkeypatch.setattr(problem_registry, "_FACTORIES", dict(problem_registry._FACTORIES))
    monkeypatch.setattr(problem_registry, "_entry_points_loaded", True)
