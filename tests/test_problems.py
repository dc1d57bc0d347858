"""Benchmark problems (docs/method.md#benchmark-problems): closed-form forcing against the
exact operator on u*.

Two independent references for (L u*)(x) at small d, float64:

* the library's exact oracles (:class:`ExactLaplacian`, :class:`ExactBiharmonic`)
  applied to u* written as a Taylor-mode jet (:meth:`Problem.exact_jet`), on
  every backend;
* nested ``jax.hessian`` of a separate NumPy/JAX transcription of u*, on the host.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_api_compat import array_namespace

from helpers import assert_close, f64, host
from sdze_core import jets
from sdze_core.keys import key
from sdze_core.oracles import ExactBiharmonic, ExactLaplacian
from sdze_core.problems import (
    PROBLEMS,
    Problem,
    default_test_points,
    make_problem,
)

jax.config.update("jax_enable_x64", True)

SMALL_DIM = {"biharmonic-three-body": 4}


class ExactSolutionModel:
    """u* as a model with a ``jet``, so the exact oracles can differentiate it."""

    def __init__(self, problem: Problem):
        self.problem = problem

    def jet(self, params, x, directions, order, collapse=False):
        xp = array_namespace(x)
        if xp.isdtype(directions.dtype, "integral"):
            eye = xp.eye(x.shape[-1], dtype=x.dtype, device=x.device)
            directions = xp.take(eye, directions, axis=0)
        jet = self.problem.exact_jet(jets.input_jet(x, directions, order))
        return jets.collapse(jet) if collapse else jet


def reference_u(name, c, x):
    """u*(x) for one point x (d,), written out independently in jax.numpy."""
    _, solution = PROBLEMS[name]
    if solution == "two-body":
        a, b = x[:-1], x[1:]
        s = jnp.sum(c * jnp.sin(a + jnp.cos(b) + b * jnp.cos(a)))
    else:
        s = jnp.sum(c * jnp.exp(x[:-2] * x[1:-1] * x[2:]))
    rho = jnp.sum(x * x)
    g = 1 - rho
    if name.startswith("biharmonic"):
        g = g * (4 - rho)
    return g * s


def reference_operator(name, c, x):
    """Δu* or Δ²u* at one point by nested autodiff."""
    u = partial(reference_u, name, c)
    lap = lambda f: lambda y: jnp.trace(jax.hessian(f)(y))  # noqa: E731
    return lap(lap(u))(x) if name.startswith("biharmonic") else lap(u)(x)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_forcing_matches_exact_operator(backend, name):
    b = f64(backend)
    d = SMALL_DIM.get(name, 5)
    problem = make_problem(name, d, seed=3, backend=b, chunk=2)
    x = problem.sample_domain(key(4), 6)
    closed = host(b, problem.operator_exact(x))
    oracle = ExactBiharmonic() if problem.equation.order == 4 else ExactLaplacian()
    estimate = oracle.estimate(ExactSolutionModel(problem), None, x)
    assert_close(closed, host(b, estimate.value), 1e-10)
    assert_close(host(b, problem.exact(x)), host(b, estimate.u), 1e-12)

    c, xs = host(b, problem.coefficients), host(b, x)
    auto = np.array([reference_operator(name, c, xi) for xi in xs])
    assert_close(closed, auto, 1e-10)
    u_star = np.array([reference_u(name, c, xi) for xi in xs])
    # The forcing makes u* an exact solution: L u* + N(u*) = f.
    nonlinear = {"allen-cahn": u_star - u_star**3, "sine-gordon": np.sin(u_star)}
    expected = auto + nonlinear.get(problem.equation.nonlinearity, 0.0)
    assert_close(host(b, problem.forcing(x)), expected, 1e-10)


@pytest.mark.parametrize("name", ["allen-cahn-two-body", "biharmonic-three-body"])
def test_block_sums_do_not_depend_on_the_chunk(backend, name):
    b = f64(backend)
    whole = make_problem(name, 11, seed=1, backend=b)
    blocks = make_problem(name, 11, seed=1, backend=b, chunk=3)
    x = whole.sample_domain(key(2), 4)
    assert_close(host(b, blocks.forcing(x)), host(b, whole.forcing(x)), 1e-12)
    assert_close(host(b, blocks.exact(x)), host(b, whole.exact(x)), 1e-12)


def test_coefficients_are_the_same_on_every_backend(backend):
    from sdze_core.registry import make_backend

    here = make_problem("poisson-three-body", 50, seed=7, backend=f64(backend))
    numpy64 = make_backend("numpy", dtype="float64")
    ref = make_problem("poisson-three-body", 50, seed=7, backend=numpy64)
    np.testing.assert_allclose(host(backend, here.coefficients), ref.coefficients, rtol=1e-12)
    assert here.coefficients.shape == (48,)


@pytest.mark.parametrize("name", ["poisson-two-body", "biharmonic-three-body"])
def test_domain_points_are_uniform(backend, name):
    """Radii: ‖x‖ in the domain, and the CDF of ‖x‖ at the median radius is 1/2.

    For the ball P(‖x‖ ≤ r) = r^d; for the annulus (r^d − 1)/(2^d − 1). With
    N = 4000 points the fraction below the median radius has standard
    deviation 1/(2√N) = 0.0079: the bound 0.04 is 5 standard deviations.
    """
    b = f64(backend)
    d = 6
    problem = make_problem(name, d, seed=0, backend=b)
    r = np.sqrt(np.sum(host(b, problem.sample_domain(key(11), 4000)) ** 2, axis=1))
    if problem.boundary == "ball":
        assert r.max() <= 1 + 1e-12
        median = 0.5 ** (1 / d)
    else:
        assert 1 - 1e-12 <= r.min() and r.max() <= 2 + 1e-12
        median = (1 + 0.5 * (2**d - 1)) ** (1 / d)
    assert abs(np.mean(r <= median) - 0.5) < 0.04


def test_high_dimension_sampling_keeps_radius():
    """At d = 10^5 the radius (1 − U)^{1/d} is computed in log space: no 0^{1/d} or 1^d trouble."""
    from sdze_core.registry import make_backend

    problem = make_problem("allen-cahn-two-body", 100_000, backend=make_backend("numpy"))
    x = problem.sample_domain(key(0), 3)
    r = np.sqrt(np.sum(np.asarray(x, dtype=np.float64) ** 2, axis=1))
    assert np.all((r > 0.999) & (r <= 1.0 + 1e-6))


def test_errors():
    with pytest.raises(ValueError, match="unknown problem 'heat'.*allen-cahn-two-body"):
        make_problem("heat", 10)
    with pytest.raises(ValueError, match="dimension >= 3"):
        make_problem("poisson-three-body", 2)
    problem = make_problem("poisson-two-body", 4)
    with pytest.raises(ValueError, match=r"shape \(B, 4\)"):
        problem.forcing(problem.backend.zeros((2, 5)))


def test_default_test_points():
    assert default_test_points(100) == 20_000
    assert default_test_points(10_000) == 2_000
    assert default_test_points(10**7) == 100
