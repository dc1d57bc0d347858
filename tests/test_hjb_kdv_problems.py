"""The built-ins ``hjb-lin`` and ``kdv`` (sdze_core.hjb_kdv_problems, docs/problems.md).

* KdV's closed-form forcing against nested ``jax.jvp`` of u* (float64);
* the ansatz meets the terminal (HJB-LIN) and initial, end and right-slope
  (KdV) conditions exactly, whatever the network;
* the exact solution has zero residual under the problem's own operator,
  evaluated on u* as a model (its jets from the problem's ``exact_jet``);
* registration, argument errors, and a 5-step ``sdze solve`` that writes rel_l2.

The operator terms themselves are checked against nested autodiff in
conformance/test_hjb_kdv_terms_guarantees.py.
"""

import json
import math

import numpy as np
import pytest
from array_api_compat import array_namespace

from sdze.cli import main
from sdze_core import jets
from sdze_core.hjb_kdv_problems import ClampedInterval, HJBLin, KdV, make_hjb_lin, make_kdv
from sdze_core.keys import key
from sdze_core.problem_registry import builtin_problems, make_problem
from sdze_core.registry import make_backend


class ExactModel:
    """u* as a model: ``jet`` from the problem's ``exact_jet`` (no parameters)."""

    def __init__(self, problem):
        self.problem = problem

    def jet(self, params, x, directions, order, collapse=False):
        xp = array_namespace(x)
        if xp.isdtype(directions.dtype, "integral"):
            columns = xp.arange(x.shape[1], device=x.device)
            directions = xp.astype(xp.expand_dims(directions, axis=1) == columns, x.dtype)
        jet = self.problem.exact_jet(jets.input_jet(x, directions, order))
        return jets.collapse(jet) if collapse else jet


def float64(backend):
    return backend.with_config(dtype="float64")


# -- KdV's forcing --------------------------------------------------------------------------


def test_kdv_forcing_matches_nested_autodiff():
    jax = pytest.importorskip("jax", reason="the reference is nested jax.jvp")
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy
    problem = KdV(make_backend("numpy").with_config(dtype="float64"))
    A, k, c, x0 = problem.amplitude, problem.wavenumber, problem.speed, problem.shift

    def u(y):  # y = (x, t)
        return A / jnp.cosh(k * (y[0] - c * y[1] - x0)) ** 2

    def along(f, v):
        return lambda y: jax.jvp(f, (y,), (v,))[1]

    e_x, e_t = jnp.asarray([1.0, 0.0]), jnp.asarray([0.0, 1.0])
    u_x, u_t = along(u, e_x), along(u, e_t)
    u_xxx = along(along(u_x, e_x), e_x)

    def residual(y):
        return u_t(y) + u(y) * u_x(y) + problem.nu * u_xxx(y)

    x = problem.sample_domain(key(3), 64)
    expected = np.asarray(jax.vmap(residual)(jnp.asarray(x)))
    assert np.max(np.abs(expected)) > 0.1  # not a soliton of this ν: f is not 0
    np.testing.assert_allclose(problem.forcing(x), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(problem.exact(x), np.asarray(jax.vmap(u)(jnp.asarray(x))),
                               rtol=0, atol=1e-14)  # fmt: skip


# -- the ansatz meets the conditions exactly -----------------------------------------------


def test_hjb_lin_ansatz_meets_the_terminal_condition(backend):
    b = float64(backend)
    problem = make_hjb_lin(7, backend=b)
    model = problem.model(16, 2)
    params = model.init(key(0), b)
    at_end = problem.domain.sample_boundary(b, key(1), 50, 7)
    assert np.all(b.to_host(at_end[:, -1]) == 1.0)
    u = b.to_host(model.apply(params, at_end))
    np.testing.assert_allclose(u, b.to_host(b.xp.sum(at_end[:, :-1], axis=1)), rtol=0, atol=1e-12)
    inside = problem.sample_domain(key(2), 50)  # and the network does move u inside
    gap = b.to_host(model.apply(params, inside) - problem.exact(inside))
    assert np.max(np.abs(gap)) > 1e-3


def kdv_points(b, x=None, t=None, n=40):
    """(x, t) with x or t fixed, the other uniform."""
    free = b.to_host(b.uniform(key(5), (n,)))
    xs = np.full(n, x) if x is not None else -1.0 + 2.0 * free
    ts = np.full(n, t) if t is not None else free
    return b.asarray(np.stack([xs, ts], axis=1), dtype=b.dtype)


@pytest.mark.parametrize("where", ["initial", "left", "right"])
def test_kdv_ansatz_meets_initial_and_end_values(backend, where):
    b = float64(backend)
    problem = make_kdv(1, backend=b)
    model = problem.model(16, 2)
    params = model.init(key(0), b)
    slices = {"initial": {"t": 0.0}, "left": {"x": -1.0}, "right": {"x": 1.0}}
    x = kdv_points(b, **slices[where])
    np.testing.assert_allclose(
        b.to_host(model.apply(params, x)), b.to_host(problem.exact(x)), rtol=0, atol=1e-12
    )


def test_kdv_ansatz_meets_the_right_slope(backend):
    b = float64(backend)
    problem = make_kdv(1, backend=b)
    model = problem.model(16, 2)
    params = model.init(key(0), b)
    index = b.asarray([0], dtype=b.index_dtype)
    slope = {}
    for end in (1.0, -1.0):
        x = kdv_points(b, x=end)
        u_x = model.jet(params, x, index, 1).coeffs[0][0, ...]
        exact_x = ExactModel(problem).jet(None, x, index, 1).coeffs[0][0, ...]
        slope[end] = np.max(np.abs(b.to_host(u_x - exact_x)))
    assert slope[1.0] < 1e-12
    assert slope[-1.0] > 1e-6  # the left end's slope is the network's: only the right is data


def test_kdv_lift_uses_the_data_only():
    """g is not u* (else the network would have nothing to learn): it differs inside."""
    b = make_backend("numpy").with_config(dtype="float64")
    problem = make_kdv(1, backend=b)
    x = problem.sample_domain(key(4), 100)
    g = problem.lift(jets.Jet(x, ())).primal
    assert np.max(np.abs(g - problem.exact(x))) > 1e-2


def test_clamped_interval_factor():
    b = make_backend("numpy").with_config(dtype="float64")
    domain = ClampedInterval(-1.0, 2.0)
    x = b.asarray([[-1.0], [0.0], [2.0], [0.5]])
    phi = domain.factor(x)
    np.testing.assert_allclose(phi, [0.0, 1.0, 0.0, 27 / 4 * 1.5 * 1.5**2 / 27], atol=1e-15)
    slope = domain.factor_jet(x, b.asarray([0], dtype=b.index_dtype), 1).coeffs[0][0]
    assert abs(slope[2]) < 1e-15 and abs(slope[0]) > 0.1  # clamped at the right end only
    points = domain.sample(b, key(0), 200, 1)
    assert np.all(domain.contains(points)) and points.shape == (200, 1)
    assert set(np.unique(domain.sample_boundary(b, key(1), 50, 1))) == {-1.0, 2.0}
    with pytest.raises(ValueError, match="one-dimensional"):
        domain.sample(b, key(0), 10, 2)
    with pytest.raises(ValueError, match="low < high"):
        ClampedInterval(1.0, 1.0)


# -- the exact solution solves the equation -------------------------------------------------


@pytest.mark.parametrize("name, dim, directions", [("hjb-lin", 6, 2), ("hjb-lin", 6, 16),
                                                   ("kdv", 1, 16)])  # fmt: skip
def test_exact_solution_has_zero_residual(backend, name, dim, directions):
    b = float64(backend)
    problem = make_problem(name, dim, backend=b)
    x = problem.sample_domain(key(6), 50)
    estimate = problem.oracle(directions)(ExactModel(problem), None, x, key(7))
    np.testing.assert_allclose(b.to_host(estimate.u), b.to_host(problem.exact(x)), atol=1e-12)
    residual = b.to_host(estimate.value - problem.forcing(x))
    assert np.max(np.abs(residual)) < 1e-11


def test_hjb_lin_operator_samples_within_space(backend):
    """V sampled coordinates of the d space ones (never time): Δ_x and the sum use V = min(V, d)."""
    b = float64(backend)
    problem = make_hjb_lin(4, backend=b)
    oracle = problem.oracle(16)
    _, laplacian, powers = oracle.terms
    assert laplacian[1].num_directions == 4 and powers[1].num_directions == 4
    assert powers[0] == -0.25 and powers[1].c == 1.75
    x = problem.sample_domain(key(0), 3)
    drawn = set()
    for n in range(20):
        drawn |= set(b.to_host(problem.oracle(1).sample(key(n), x)[1]).tolist())
    assert drawn == {0, 1, 2, 3}


# -- registration and the command line ------------------------------------------------------


def test_registered_as_builtins():
    assert {"hjb-lin", "kdv"} <= set(builtin_problems())
    b = make_backend("numpy")
    hjb = make_problem("hjb-lin", 10, backend=b)
    assert isinstance(hjb, HJBLin) and hjb.dim == 11 and hjb.space_dim == 10
    assert isinstance(make_problem("kdv", 1, backend=b), KdV)


@pytest.mark.parametrize("name, dim", [("kdv", 2), ("kdv", True), ("kdv", 1.0), ("hjb-lin", 0),
                                       ("hjb-lin", 2.5)])  # fmt: skip
def test_bad_dimensions_are_refused(name, dim):
    with pytest.raises(ValueError, match="dimension|--dim 1"):
        make_problem(name, dim, backend=make_backend("numpy"))


@pytest.mark.parametrize("name, dim", [("hjb-lin", 5), ("kdv", 1)])
def test_five_step_solve_writes_rel_l2(tmp_path, name, dim):
    out = tmp_path / name
    argv = ["solve", name, "--dim", str(dim), "--steps", "5", "--width", "16", "--depth", "2",
            "--test-points", "200", "--quiet", "--no-plots", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["exact_solution"] is True
    assert math.isfinite(metrics["rel_l2"]) and 0 < metrics["rel_l2"] < 10
    assert metrics["config"]["problem"] == name
