"""The generalisation suite's closed-form forcing terms against JAX autodiff (float64)."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

jax = pytest.importorskip("jax", reason="JAX is the autodiff reference")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from generalisation import NAMES, GeneralisationProblem  # noqa: E402

from sdze_core.keys import key  # noqa: E402
from sdze_core.registry import make_backend  # noqa: E402


def _operator(problem, x):
    """L u* at one point by nested autodiff of problem.exact."""

    def u(z):
        return problem.exact(z[None, :])[0]

    hess = jax.hessian(u)(x)
    d = problem.dim
    if problem.name == "anisotropic":
        return jnp.sum(jnp.asarray(problem.a) * jnp.diag(hess))
    if problem.name == "heat":
        return jax.grad(u)(x)[d] - jnp.trace(hess[:d, :d])
    lap = jnp.trace(hess)
    if problem.name == "lifted-sine-gordon":
        return lap + jnp.sin(u(x))
    return lap


@pytest.mark.parametrize("name", NAMES)
def test_forcing_matches_autodiff(name):
    backend = make_backend("numpy", dtype="float64")
    problem = GeneralisationProblem(name, 7, backend, seed=3)
    x = np.asarray(problem.sample_domain(key(1), 6), dtype=np.float64)
    f = np.asarray(problem.forcing(x))
    ref = np.array([float(_operator(problem, jnp.asarray(xi))) for xi in x])
    np.testing.assert_allclose(f, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())


def test_soft_boundary_solution_is_not_small_on_the_sphere():
    backend = make_backend("numpy", dtype="float64")
    problem = GeneralisationProblem("soft-boundary", 50, backend)
    u = np.asarray(problem.exact(problem.sample_sphere(key(2), 200)))
    assert np.sqrt(np.mean(u**2)) > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_operator_estimates_with_all_coordinates_are_exact(name):
    """Each problem's oracle with V = d (no sampling error) equals nested autodiff of the model."""
    backend = make_backend("jax", dtype="float64")
    problem = GeneralisationProblem(name, 5, backend, seed=1)
    loss = problem.loss(batch_size=4, width=8, depth=2, num_directions=5)
    params = loss.model.init(key(0), backend)
    x = problem.sample_domain(key(4), 4)
    est = loss.oracle(loss.model, params, x, key(5))

    def u(z):
        return loss.model.apply(params, z[None, :])[0]

    ref = []
    for xi in x:
        hess = jax.hessian(u)(xi)
        d = problem.dim
        if name == "anisotropic":
            ref.append(jnp.sum(problem.a * jnp.diag(hess)))
        elif name == "heat":
            ref.append(jax.grad(u)(xi)[d] - jnp.trace(hess[:d, :d]))
        else:
            ref.append(jnp.trace(hess))
    np.testing.assert_allclose(np.asarray(est.value), np.asarray(ref), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        np.asarray(est.u), np.asarray(loss.model.apply(params, x)), rtol=1e-12
    )
