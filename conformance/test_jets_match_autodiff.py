"""Guarantee: Taylor-mode jets equal jax.experimental.jet (docs/method.md#jets).

Tolerances, relative to the largest reference entry: 1e-12 in float64,
1e-4 in float32 (``RTOL64``, ``RTOL32``). The networks' jets and the exact
oracles built on them are compared with nested autodiff (``jax.jacfwd``) in
``test_estimators_unbiased.py``.

Every backend computes the jets; the reference is always JAX in float64 on
NumPy copies of the same inputs, so the comparison is between independent
implementations (JAX's jet rules are its own recurrences, not Faà di Bruno).
"""

from functools import cache
from math import factorial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.jet import jet as jax_jet

from sdze_core import jets

jax.config.update("jax_enable_x64", True)

ORDERS = range(1, 7)
# Relative to the largest reference entry: float64 round-off of the closed
# forms (tanh's p_6 has coefficients up to 272) stays far below this.
RTOL64 = 1e-12
RTOL32 = 1e-4
V, B, H = 2, 3, 4

REFERENCES = {
    "tanh": jnp.tanh,
    "sin": jnp.sin,
    "cos": jnp.cos,
    "exp": jnp.exp,
    "log": jnp.log,
    "sigmoid": jax.nn.sigmoid,
    # jax.nn.softplus is a custom_jvp that jet cannot trace.
    "softplus": lambda x: jnp.log1p(jnp.exp(x)),
    "square": jnp.square,
}


def assert_close(actual, expected, rtol):
    """max |actual - expected| <= rtol · max(1, max |expected|); ``None`` is an exact zero."""
    expected = np.asarray(expected)
    if actual is None:
        assert not np.any(expected), "a coefficient reported as zero is not"
        return
    actual = np.asarray(actual)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(
        actual, np.broadcast_to(expected, actual.shape), rtol=0, atol=rtol * scale
    )


def as_backend(b, a):
    """A float array on backend ``b`` in its dtype (``b.asarray`` keeps NumPy's float64)."""
    return None if a is None else b.asarray(a, dtype=b.dtype)


def host(b, a):
    return None if a is None else b.to_host(a)


def data(seed, shape, low=None, high=None):
    rng = np.random.default_rng(seed)
    if low is None:
        return 0.8 * rng.standard_normal(shape)
    return rng.uniform(low, high, shape)


def primal_for(name, seed=0):
    if name == "log":
        return data(seed, (B, H), 0.5, 2.0)
    if name == "power-2":
        return data(seed, (B, H), 0.6, 1.5) * np.where(np.arange(H) % 2, 1, -1)
    return data(seed, (B, H))


def input_series(order, sparse, seed=1):
    """(x_1, ..., x_K) with a direction axis; ``sparse`` keeps only x_1."""
    coeffs = [data(seed + k, (V, B, H)) for k in range(order)]
    if sparse:
        coeffs[1:] = [None] * (order - 1)
    return coeffs


@cache
def reference(name, order, sparse):
    """jax.experimental.jet of the elementwise function, all directions at once."""
    fn = {"power3": lambda x: x**3, "power-2": lambda x: x**-2}.get(name) or REFERENCES[name]
    x0 = np.broadcast_to(primal_for(name), (V, B, H))
    series = [np.zeros((V, B, H)) if c is None else c for c in input_series(order, sparse)]
    primal, coeffs = jax_jet(fn, (x0,), (series,))
    return np.asarray(primal[0]), [np.asarray(c) for c in coeffs]


def rule(name):
    if name == "power3":
        return lambda j: jets.power(j, 3)
    if name == "power-2":
        return lambda j: jets.power(j, -2)
    return getattr(jets, name)


RULES = list(REFERENCES) + ["power3", "power-2"]


def make_jet(b, name, order, sparse):
    x0 = as_backend(b, primal_for(name))
    return jets.Jet(x0, tuple(as_backend(b, c) for c in input_series(order, sparse)))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-series", "sparse-series"])
@pytest.mark.parametrize("name", RULES)
def test_elementwise_rules_match_jax_jet(backend, name, sparse):
    b = backend.with_config(dtype="float64")
    for order in ORDERS:
        out = rule(name)(make_jet(b, name, order, sparse))
        primal, coeffs = reference(name, order, sparse)
        assert out.order == order and not out.collapsed
        assert_close(host(b, out.primal), primal, RTOL64)
        for k in range(order):
            assert_close(host(b, out.coeffs[k]), coeffs[k], RTOL64)


@pytest.mark.parametrize("name", ["tanh", "sin", "softplus", "sigmoid"])
def test_elementwise_rules_float32(backend, name):
    """float32 jets agree with the float64 reference to RTOL32 (relative to the largest entry)."""
    assert backend.dtype == backend.xp.float32
    for order in ORDERS:
        out = rule(name)(make_jet(backend, name, order, sparse=False))
        primal, coeffs = reference(name, order, False)
        assert out.primal.dtype == backend.xp.float32
        assert_close(host(backend, out.primal), primal, RTOL32)
        for k in range(order):
            assert_close(host(backend, out.coeffs[k]), coeffs[k], RTOL32)


def test_faa_di_bruno_table():
    """Coefficients k!/Π m_j!(j!)^m_j sum to the Bell numbers; parts add up to k."""
    bell = [1, 2, 5, 15, 52, 203, 877, 4140]
    for k, expected in enumerate(bell, start=1):
        terms = jets._faa_di_bruno_terms(k)
        total = 1  # the single-part partition {k}
        for n, group in terms:
            for coef, mult in group:
                assert sum(j * m for j, m in mult) == k and sum(m for _, m in mult) == n
                total += coef
        assert total == expected
    assert jets._faa_di_bruno_terms(4) is jets._faa_di_bruno_terms(4)  # cached


def test_recurrence_polynomials():
    tanh = jets._recurrence_polynomials(3, "tanh")
    assert tanh[1] == (1, 0, -1)  # 1 - t^2
    assert tanh[2] == (0, -2, 0, 2)  # -2t + 2t^3
    assert tanh[3] == (-2, 0, 8, 0, -6)
    sigmoid = jets._recurrence_polynomials(2, "sigmoid")
    assert sigmoid[1] == (0, 1, -1) and sigmoid[2] == (0, 1, -3, 2)


# -- sums, products, norms ------------------------------------------------------


def two_jets(b, order, sparse, seed=5):
    x0, y0 = data(seed, (B, H)), data(seed + 1, (B, H))
    xs, ys = input_series(order, sparse, seed + 2), input_series(order, False, seed + 20)
    f = jets.Jet(as_backend(b, x0), tuple(as_backend(b, c) for c in xs))
    g = jets.Jet(as_backend(b, y0), tuple(as_backend(b, c) for c in ys))
    full = [np.zeros((V, B, H)) if c is None else c for c in xs]
    return f, g, (x0, y0, full, ys)


def jax_binary(fn, raw, order):
    x0, y0, xs, ys = raw
    xb, yb = np.broadcast_to(x0, (V, B, H)), np.broadcast_to(y0, (V, B, H))
    primal, coeffs = jax_jet(fn, (xb, yb), (xs, ys))
    return np.asarray(primal), [np.asarray(c) for c in coeffs]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-series", "sparse-series"])
def test_arithmetic_matches_jax_jet(backend, sparse):
    b = backend.with_config(dtype="float64")
    cases = [
        (jets.mul, lambda x, y: x * y),
        (jets.add, lambda x, y: x + y),
        (lambda f, g: jets.shift(jets.scale(f, -2.5), 3.0), lambda x, y: 3.0 - 2.5 * x),
        (lambda f, g: jets.squared_norm(f), lambda x, y: jnp.sum(x * x, axis=-1)),
        (lambda f, g: jets.mul(jets.tanh(f), jets.exp(g)), lambda x, y: jnp.tanh(x) * jnp.exp(y)),
    ]
    for order in ORDERS:
        f, g, raw = two_jets(b, order, sparse)
        for ours, theirs in cases:
            out = ours(f, g)
            primal, coeffs = jax_binary(theirs, raw, order)
            assert_close(host(b, out.primal), primal[0], RTOL64)
            for k in range(order):
                assert_close(host(b, out.coeffs[k]), coeffs[k], RTOL64)


def test_squared_norm_of_input_jet(backend):
    """‖x + t v‖² has the jet (‖x‖², 2⟨x, v⟩, 2⟨v, v⟩, 0, ...)."""
    b = backend.with_config(dtype="float64")
    x, v = data(0, (B, H)), data(1, (V, H))
    out = jets.squared_norm(jets.input_jet(as_backend(b, x), as_backend(b, v), 4))
    assert_close(host(b, out.primal), (x * x).sum(-1), RTOL64)
    assert_close(host(b, out.coeffs[0]), 2 * v @ x.T, RTOL64)
    assert_close(host(b, out.coeffs[1]), 2 * (v * v).sum(-1)[:, None], RTOL64)
    assert out.coeffs[2] is None and out.coeffs[3] is None


def test_coordinate_squared_norm(backend):
    b = backend.with_config(dtype="float64")
    x = data(0, (B, 7))
    index = np.array([5, 0, 3])
    out = jets.coordinate_squared_norm(as_backend(b, x), b.asarray(index, dtype=b.index_dtype), 3)
    dense = jets.squared_norm(jets.input_jet(as_backend(b, x), as_backend(b, np.eye(7)[index]), 3))
    assert out.coeffs[2] is None
    pairs = zip((out.primal,) + out.coeffs[:2], (dense.primal,) + dense.coeffs[:2], strict=True)
    for ours, theirs in pairs:
        assert_close(host(b, ours), host(b, theirs), RTOL64)


# -- linear maps and the sparse first layer -----------------------------------------


def test_affine_and_coordinate_first_layer(backend):
    """Gathered columns W[:, j] equal the one-hot product e_j Wᵀ; y_k = 0 for k >= 2."""
    b = backend.with_config(dtype="float64")
    x, W, bias = data(0, (B, 6)), data(1, (H, 6)), data(2, (H,))
    index = np.array([4, 1, 1])
    order = 3
    sparse = jets.coordinate_affine(
        as_backend(b, x),
        as_backend(b, W),
        as_backend(b, bias),
        b.asarray(index, dtype=b.index_dtype),
        order,
    )
    dense = jets.affine(
        jets.input_jet(as_backend(b, x), as_backend(b, np.eye(6)[index]), order),
        as_backend(b, W),
        as_backend(b, bias),
    )
    assert_close(host(b, sparse.primal), x @ W.T + bias, RTOL64)
    assert_close(host(b, dense.primal), x @ W.T + bias, RTOL64)
    assert tuple(sparse.coeffs[0].shape) == (3, 1, H)
    assert_close(host(b, sparse.coeffs[0]), W.T[index][:, None, :], RTOL64)
    assert_close(host(b, dense.coeffs[0]), W.T[index][:, None, :], RTOL64)
    assert sparse.coeffs[1:] == (None, None) and dense.coeffs[1:] == (None, None)


def test_sparse_series_costs_only_the_first_power(backend):
    """With only x_1 nonzero, Faà di Bruno reduces to y_k = φ^(k)(x_0) x_1^k."""
    b = backend.with_config(dtype="float64")
    order = 5
    j = make_jet(b, "tanh", order, sparse=True)
    table = jets.derivatives("tanh", j.primal, order)
    out = jets.tanh(j)
    x1 = host(b, j.coeffs[0])
    for k in range(1, order + 1):
        assert_close(host(b, out.coeffs[k - 1]), host(b, table[k]) * x1**k, RTOL64)


def test_derivative_tables_closed_forms(backend):
    b = backend.with_config(dtype="float64")
    x = data(0, (5,), 0.5, 2.0)
    xb = as_backend(b, x)
    logs = [host(b, d) for d in jets.derivatives("log", xb, 4)]
    for n in range(1, 5):
        assert_close(logs[n], (-1) ** (n - 1) * factorial(n - 1) / x**n, RTOL64)
    square = jets.derivatives("square", xb, 4)
    assert square[2] == 2.0 and square[3] is None and square[4] is None
    with pytest.raises(ValueError, match="unknown elementwise"):
        jets.derivatives("relu", xb, 2)


# -- collapsed top order ------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-series", "sparse-series"])
def test_collapsed_top_is_sum_of_uncollapsed_top(backend, sparse):
    """Every rule maps collapse(jet) to collapse(rule(jet)): top = Σ_v f_K[v], rest unchanged."""
    b = backend.with_config(dtype="float64")
    programs = [
        lambda f, g: jets.tanh(jets.sin(f)),
        lambda f, g: jets.softplus(jets.mul(f, jets.sigmoid(g))),
        lambda f, g: jets.add(jets.power(f, 3), jets.scale(jets.log(jets.exp(g)), 0.5)),
        lambda f, g: jets.squared_norm(jets.cos(f)),
    ]
    for order in range(1, 5):
        f, g, _ = two_jets(b, order, sparse)
        for program in programs:
            full = program(f, g)
            summed = program(jets.collapse(f), g)  # g is collapsed on contact
            assert summed.collapsed and isinstance(summed, jets.CollapsedJet)
            assert_close(host(b, summed.primal), host(b, full.primal), RTOL64)
            for k in range(order - 1):
                assert_close(host(b, summed.coeffs[k]), host(b, full.coeffs[k]), RTOL64)
            top = host(b, full.coeffs[-1]).sum(axis=0)
            assert tuple(summed.coeffs[-1].shape) == top.shape
            assert_close(host(b, summed.coeffs[-1]), top, RTOL64)


def test_collapse_constructors(backend):
    b = backend.with_config(dtype="float64")
    x, v = as_backend(b, data(0, (B, H))), as_backend(b, data(1, (V, H)))
    one = jets.input_jet(x, v, 1, collapse=True)
    assert one.collapsed and tuple(one.coeffs[0].shape) == (1, H)
    assert_close(host(b, one.coeffs[0]), host(b, v).sum(0)[None], RTOL64)
    two = jets.input_jet(x, v, 2, collapse=True)
    assert two.coeffs[1] is None and tuple(two.coeffs[0].shape) == (V, 1, H)
    assert jets.collapse(two) is two


def test_jets_are_jax_pytrees():
    """Jets (collapsed or not) pass through jax.jit and keep their type."""
    x = jnp.asarray(data(0, (B, H)))
    v = jnp.asarray(data(1, (V, H)))

    @jax.jit
    def run(j):
        return jets.tanh(j)

    for flag in (False, True):
        out = run(jets.input_jet(x, v, 3, collapse=flag))
        assert type(out) is (jets.CollapsedJet if flag else jets.Jet)
        expected = jets.tanh(jets.input_jet(x, v, 3, collapse=flag))
        assert_close(out.coeffs[-1], expected.coeffs[-1], RTOL64)


def test_errors(backend):
    b = backend.with_config(dtype="float64")
    x = as_backend(b, data(0, (B, H)))
    with pytest.raises(ValueError, match="order"):
        jets.input_jet(x, as_backend(b, data(1, (V, H))), 0)
    with pytest.raises(ValueError, match="directions"):
        jets.input_jet(x, as_backend(b, data(1, (H,))), 2)
    f = jets.input_jet(x, as_backend(b, data(1, (V, H))), 2)
    g = jets.input_jet(x, as_backend(b, data(1, (V, H))), 3)
    with pytest.raises(ValueError, match="different orders"):
        jets.mul(f, g)
    with pytest.raises(TypeError, match="int exponent"):
        jets.power(f, 1.5)
