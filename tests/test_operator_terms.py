"""Operator terms (sdze_core.operator_terms): constants, composition and argument errors.

The terms' values against nested autodiff on every backend, and the sampled
terms' unbiasedness, are in conformance/test_operator_terms_guarantees.py. Here: the
polarization constants against nested ``jax.jvp`` on a smooth function of
its own (not through sdze's jets), how :class:`LinearCombination` draws and
adds its terms, and the errors for bad arguments.
"""

from math import factorial

import numpy as np
import pytest

from sdze_core.keys import fold_in, key
from sdze_core.models import MLP
from sdze_core.operator_terms import (
    MAX_MIXED_ORDER,
    Drift,
    GradientNormPower,
    LinearCombination,
    MixedPartial,
    SubsetDiagonal,
    SubsetLaplacian,
    polarization_weights,
)
from sdze_core.oracles import (
    FirstDerivative,
    HutchinsonLaplacian,
    SparseGradientNormSquared,
    SparseLaplacian,
)
from sdze_core.registry import make_backend

D = 4


@pytest.fixture
def numpy_setup():
    b = make_backend("numpy").with_config(dtype="float64")
    model = MLP((D, 8, 1), "tanh")
    return b, model, model.init(key(0), b), b.normal(key(1), (3, D))


# -- polarization ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(1, MAX_MIXED_ORDER + 1))
def test_polarization_constants_against_nested_jvp(k):
    """Σ_ε w_ε D^k f[Σ ε_j v_j] = D^k f[v_1, ..., v_k] (nested jax.jvp), for generic v_j."""
    jax = pytest.importorskip("jax", reason="the reference is nested jax.jvp")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    rng = np.random.default_rng(k)
    a, c = rng.standard_normal(D), rng.standard_normal(D)
    x = jnp.asarray(rng.standard_normal(D))
    vs = [jnp.asarray(v) for v in rng.standard_normal((k, D))]

    def f(y):
        return jnp.sin(y @ a) * jnp.exp(0.5 * (y @ c)) + (y @ a) ** 5

    def along(g, v):
        return lambda y: jax.jvp(g, (y,), (v,))[1]

    def multilinear(g, tangents):
        for v in tangents:
            g = along(g, v)
        return g(x)

    exact = multilinear(f, vs)
    polarized = sum(w * multilinear(f, [sum(e * v for e, v in zip(s, vs, strict=True))] * k)
                    for s, w in polarization_weights(k))  # fmt: skip
    assert abs(float(polarized - exact)) <= 1e-10 * max(1.0, abs(float(exact)))


def test_polarization_weights_are_2_to_k_minus_1_signed_terms():
    for k in range(1, MAX_MIXED_ORDER + 1):
        pairs = polarization_weights(k)
        assert len(pairs) == 2 ** (k - 1) and all(s[0] == 1 for s, _ in pairs)
        assert sum(abs(w) for _, w in pairs) == pytest.approx(1 / factorial(k))


# -- linear combinations ---------------------------------------------------------------------


def test_combination_draws_each_term_from_its_folded_key(numpy_setup):
    b, model, params, x = numpy_setup
    terms = (SparseLaplacian(2), HutchinsonLaplacian(3), FirstDerivative(0))
    combination = LinearCombination(tuple((1.0, t) for t in terms))
    xi = combination.sample(key(5), x)
    for j, (term, drawn) in enumerate(zip(terms, xi, strict=True)):
        expected = term.sample(fold_in(key(5), j), x)
        assert (drawn is None and expected is None) or np.array_equal(drawn, expected)


def test_combination_is_the_weighted_sum_and_keeps_the_first_u(numpy_setup):
    b, model, params, x = numpy_setup
    lap, dt = SubsetLaplacian((0, 1, 2), 2), FirstDerivative(-1)
    combination = LinearCombination(((0.5, lap), (-2.0, dt)))
    assert combination.order == 2
    xi = combination.sample(key(6), x)
    out = combination.estimate(model, params, x, xi)
    first = lap.estimate(model, params, x, xi[0])
    second = dt.estimate(model, params, x, xi[1])
    np.testing.assert_allclose(out.value, 0.5 * first.value - 2.0 * second.value, rtol=1e-14)
    np.testing.assert_array_equal(out.u, first.u)
    np.testing.assert_allclose(second.u, first.u, rtol=1e-14)


def test_combination_refuses_a_term_whose_value_is_not_shaped_like_u(numpy_setup):
    b, model, params, x = numpy_setup
    combination = LinearCombination(((1.0, FirstDerivative([0, 1])),))
    with pytest.raises(ValueError, match="every term's value must have the shape of u"):
        combination(model, params, x, key(0))


def test_gradient_norm_power_two_is_the_sparse_estimator_with_every_coordinate(numpy_setup):
    b, model, params, x = numpy_setup
    exact = GradientNormPower(2)(model, params, x, key(0)).value
    sparse = SparseGradientNormSquared(D)(model, params, x, key(0)).value
    np.testing.assert_allclose(exact, sparse, rtol=1e-13)


def test_exact_terms_do_not_use_the_key(numpy_setup):
    b, model, params, x = numpy_setup
    for oracle in (SubsetLaplacian((0, 1)), MixedPartial((0, 1)), Drift(b.xp.ones(D)),
                   GradientNormPower(1.5)):  # fmt: skip
        assert oracle.sample(key(0), x) is None
        np.testing.assert_array_equal(
            oracle(model, params, x, key(0)).value, oracle(model, params, x, key(1)).value
        )


# -- argument errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: SubsetDiagonal(0, (0,)), "k must be a positive int"),
        (lambda: SubsetLaplacian(()), "coordinates must be a non-empty sequence of ints"),
        (lambda: SubsetLaplacian(3), "coordinates must be a non-empty sequence of ints"),
        (lambda: SubsetLaplacian((0, 1.0)), "coordinates must be a non-empty sequence of ints"),
        (lambda: SubsetLaplacian((0, 0)), "coordinates must be distinct"),
        (lambda: SubsetLaplacian((0, 1), 3), r"num_directions must be at most \|coordinates\| = 2"),
        (lambda: SubsetLaplacian((0, 1), 0), "num_directions must be a positive int"),
        (lambda: MixedPartial(()), "index must be a non-empty sequence of ints"),
        (lambda: MixedPartial((0, 1, 2, 3, 0)), "index must have at most 4 entries"),
        (lambda: MixedPartial((True,)), "index must be a non-empty sequence of ints"),
        (lambda: GradientNormPower(0), "c must be a positive real number"),
        (lambda: GradientNormPower("2"), "c must be a positive real number"),
        (lambda: GradientNormPower(2, (1, 1)), "coordinates must be distinct"),
        (lambda: Drift(np.ones((2, 2))), "drift must be a callable"),
        (lambda: LinearCombination(()), "terms must be a non-empty sequence of"),
        (lambda: LinearCombination(((1.0, "lap"),)), "a real coefficient and an Oracle each"),
        (lambda: LinearCombination((SparseLaplacian(2),)), r"\(coefficient, oracle\) pairs"),
    ],
)
def test_bad_arguments_name_the_argument_and_what_is_allowed(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    ("oracle", "match"),
    [
        (SubsetLaplacian((0, 4)), "coordinate index 4 out of range for d = 4"),
        (SubsetLaplacian((0, -4)), r"name a coordinate twice for d = 4"),
        (MixedPartial((0, -5)), "index: coordinate index -5 out of range for d = 4"),
        (GradientNormPower(1.0, (7,)), "coordinate index 7 out of range"),
        (Drift(lambda x: x[:, :2]), r"drift must have shape \(3, 4\)"),
    ],
)
def test_arguments_that_do_not_fit_the_points_raise(numpy_setup, oracle, match):
    b, model, params, x = numpy_setup
    with pytest.raises(ValueError, match=match):
        oracle(model, params, x, key(0))


def test_constant_drift_of_the_wrong_length_raises(numpy_setup):
    b, model, params, x = numpy_setup
    with pytest.raises(ValueError, match=r"drift must have shape \(4,\)"):
        Drift(b.xp.ones(3))(model, params, x, key(0))
