"""STDE's semilinear parabolic problems (sdze_core.parabolic) and reference-value scoring.

The terminal condition is built in (u(x, T) = g(x) for any network), the
operator estimate with every space coordinate equals nested autodiff of the
model, the residual has the sign of u_t + Δu + F(u), the points follow the
diffusion (moments within 99.9 % bounds at a fixed seed), and the solver
records ``rel_ref`` for a problem with ``reference()`` (and nothing new for
one without).
"""

import json
import math

import numpy as np
import pytest

from helpers import host, isolate_problem_registry
from sdze.cli import main
from sdze_core.domains import Diffusion, NoBoundaryError, WholeSpace
from sdze_core.keys import key
from sdze_core.parabolic import HORIZON, PARABOLIC, REFERENCE_VALUES
from sdze_core.problem_protocol import check_problem, reference_of
from sdze_core.problem_registry import make_problem
from sdze_core.problems import make_benchmark
from sdze_core.registry import make_backend
from sdze_core.training import ReferenceSet

NAMES = list(PARABOLIC)
F = {
    "allen-cahn-parabolic": lambda u: u - u**3,
    "semilinear-heat-parabolic": lambda u: (1 - u**2) / (1 + u**2),
    "sine-gordon-parabolic": np.sin,
}


SMOOTHED = ("allen-cahn-parabolic",)  # g has kinks: the lift is smoothed before T


def g_numpy(name, x):
    """g(x) for space points x (B, d), written independently of the jets."""
    if name == "allen-cahn-parabolic":
        return np.arctan(np.max(x, axis=1))
    return 5.0 / (10.0 + 2.0 * np.sum(x * x, axis=1))


def zero_params(b, params):
    return [{k: b.xp.zeros_like(v) for k, v in p.items()} for p in params]


# -- the problems -------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_model_meets_the_terminal_condition(backend, name):
    """u(x, T) = g(x) for a random network; with a zero network u = h, the lift."""
    b = backend.with_config(dtype="float64") if backend.name != "torch" else backend
    problem = make_problem(name, 5, backend=b)
    assert problem.dim == 6 and problem.space_dim == 5
    check_problem(problem, "test")
    model = problem.model(16, 2)
    params = model.init(key(1), b)
    x = problem.sample_domain(key(0), 50)
    x_host = host(b, x)
    at_end = b.asarray(np.concatenate([x_host[:, :-1], np.full((50, 1), HORIZON)], axis=1),
                       dtype=b.dtype)
    tol = 1e-5 if b.dtype == b.xp.float32 else 1e-10
    # the smoothed max's width at t = T is s = 2 √(1e−8 / ln d): |h − g| <= s ln d there
    at_t = tol + (2 * math.sqrt(1e-8 / math.log(5)) * math.log(5) if name in SMOOTHED else 0)
    np.testing.assert_allclose(host(b, model.apply(params, at_end)), g_numpy(name, x_host[:, :-1]),
                               rtol=0, atol=at_t)
    zero = host(b, model.apply(zero_params(b, params), x))
    if name != "allen-cahn-parabolic":  # h: ‖x‖² replaced by its mean at T, ‖x‖² + 2d(T − t)
        spread = 2 * 5 * (HORIZON - x_host[:, -1])
        expected = 5.0 / (10.0 + 2.0 * (np.sum(x_host[:, :-1] ** 2, axis=1) + spread))
        np.testing.assert_allclose(zero, expected, rtol=0, atol=tol)
    else:  # the smoothed max lies between max and max + s ln d (s > 0 before T)
        top = x_host[:, :-1].max(axis=1)
        width = 2 * np.sqrt((HORIZON - x_host[:, -1]) / np.log(5))
        assert np.all(zero >= np.arctan(top) - tol)
        assert np.all(zero <= np.arctan(top + width * np.log(5)) + tol)
        assert np.any(zero > np.arctan(top) + 1e-3)  # smoothed, not g itself


@pytest.mark.parametrize("name", NAMES)
def test_operator_and_residual_against_nested_autodiff(name):
    """With V = d the oracle is u_t + Δ_x u exactly: nested torch.autograd of the model;
    the residual r = L̂u − reaction(u) is u_t + Δu + F(u)."""
    torch = pytest.importorskip("torch", reason="the reference is nested torch.autograd")
    import sdze  # noqa: F401  (registers the backends)

    b = make_backend("torch").with_config(dtype="float64")
    d = 3
    problem = make_problem(name, d, backend=b)
    model = problem.model(8, 2)
    params = model.init(key(1), b)
    x = problem.sample_domain(key(0), 6)
    oracle = problem.oracle(16)  # capped at d: every space coordinate
    estimate = oracle.estimate(model, params, x, oracle.sample(key(2), x))
    xr = x.clone().requires_grad_(True)
    u = model.apply(params, xr)
    grad = torch.autograd.grad(u.sum(), xr, create_graph=True)[0]
    expected = grad[:, -1]
    for i in range(d):
        expected = expected + torch.autograd.grad(grad[:, i].sum(), xr, retain_graph=True)[0][:, i]
    np.testing.assert_allclose(host(b, estimate.value), expected.detach().numpy(), rtol=1e-10,
                               atol=1e-10)
    u_np = host(b, estimate.u)
    residual = host(b, estimate.value - problem.reaction(estimate.u, x))
    np.testing.assert_allclose(residual, expected.detach().numpy() + F[name](u_np), rtol=1e-10,
                               atol=1e-10)


def test_the_sampled_operator_draws_space_coordinates_only(backend):
    """V < d: the Laplacian term draws V of the d space coordinates, never time (index d)."""
    problem = make_problem("semilinear-heat-parabolic", 6, backend=backend)
    oracle = problem.oracle(2)
    x = problem.sample_domain(key(0), 4)
    _, laplacian = oracle.terms
    for seed in range(5):
        drawn = host(backend, oracle.sample(key(seed), x)[1])
        assert drawn.shape == (2,) and np.all(drawn < 6)
    assert laplacian[1].num_directions == 2 and laplacian[1].coordinates == tuple(range(6))


# -- the points ------------------------------------------------------------------------------


def test_diffusion_points_have_the_moments_of_the_diffusion(backend):
    """t ~ U[0, T), x | t ~ N(0, 2t I): moments of 20 000 points (d = 4, seed 0) within 99.9 %
    bounds (3.29 standard errors, rounded up):

    * mean t = T/2, standard error √(T²/12 / n) = 6.1e−4: bound 2.1e−3;
    * mean of x_i / √(2t) = 0 and of its square = 1 over n d = 80 000 independent N(0, 1):
      standard errors 3.5e−3 and 5.0e−3, bounds 1.2e−2 and 1.7e−2;
    * mean of the row means of x_i² = E[2t] = T, row variance 4E[t²](1 + 2/d) − T² = 0.09:
      standard error 2.1e−3, bound 7e−3.
    """
    n, d = 20_000, 4
    x = host(backend, Diffusion(t1=HORIZON).sample(backend, key(0), n, d)).astype(np.float64)
    assert x.shape == (n, d + 1)
    t, space = x[:, -1], x[:, :-1]
    assert t.min() >= 0 and t.max() < HORIZON
    assert abs(t.mean() - HORIZON / 2) < 2.1e-3
    xi = space / np.sqrt(2 * t)[:, None]
    assert abs(xi.mean()) < 1.2e-2
    assert abs((xi * xi).mean() - 1) < 1.7e-2
    assert abs((space * space).mean(axis=1).mean() - HORIZON) < 7e-3
    again = host(backend, Diffusion(t1=HORIZON).sample(backend, key(0), n, d))
    np.testing.assert_array_equal(again, x.astype(again.dtype))


def test_diffusion_terminal_slice_and_arguments(backend):
    """sample_boundary: t = T and x ~ N(0, 2T I) (bound as above: 3.29 · √(2/(n d)) · 2T);
    no lateral boundary; only the whole space; a positive diffusivity scales the variance."""
    n, d = 20_000, 3
    domain = Diffusion(t1=HORIZON)
    x = host(backend, domain.sample_boundary(backend, key(1), n, d)).astype(np.float64)
    assert np.all(x[:, -1] == np.float32(HORIZON))
    assert abs((x[:, :-1] ** 2).mean() - 2 * HORIZON) < 3.29 * math.sqrt(2 / (n * d)) * 2 * HORIZON
    faster = host(backend, Diffusion(t1=HORIZON, diffusivity=4.0).sample(backend, key(0), 8, d))
    slower = host(backend, Diffusion(t1=HORIZON).sample(backend, key(0), 8, d))
    np.testing.assert_allclose(faster[:, :-1], 2 * slower[:, :-1], rtol=1e-5)
    with pytest.raises(NoBoundaryError):
        domain.sample_lateral(backend, key(0), 2, d)
    with pytest.raises(TypeError, match="whole space"):
        Diffusion(space=object())
    with pytest.raises(ValueError, match="diffusivity"):
        Diffusion(diffusivity=0.0)
    assert isinstance(domain.space, WholeSpace) and domain.condition == "terminal"


# -- the reference member -------------------------------------------------------------------


def test_reference_values_from_the_table():
    for name in NAMES:
        for d, value in REFERENCE_VALUES[name].items():
            points, values = make_problem(name, d).reference()
            assert points.shape == (1, d + 1) and float(np.max(np.abs(points))) == 0.0
            assert float(values[0]) == pytest.approx(value, rel=1e-7)
        assert make_problem(name, 7).reference() is None  # no reference at d = 7


def test_reference_set_is_the_relative_l2_error_at_the_points():
    b = make_backend("numpy")

    class Known:
        def apply(self, params, x):
            return x[:, 0] + params

    reference = ReferenceSet(b.asarray([[1.0], [2.0]]), b.asarray([1.0, 3.0]))
    errors = reference.errors(Known(), 0.5)
    assert errors["u_ref"] == [1.5, 2.5]
    assert errors["rel_ref"] == pytest.approx(math.sqrt(0.5) / math.sqrt(10))
    with pytest.raises(ValueError, match="not all zero"):
        ReferenceSet(b.asarray([[1.0]]), b.asarray([0.0]))
    with pytest.raises(ValueError, match="shapes"):
        ReferenceSet(b.asarray([1.0]), b.asarray([1.0]))


def test_a_malformed_reference_is_an_error_that_names_the_shapes():
    class Bad:
        dim = 3

        def reference(self):
            return np.zeros((1, 2)), np.zeros(1)

    with pytest.raises(ValueError, match=r"shapes \(R, 3\) and \(R,\)"):
        reference_of(Bad())


def test_solve_scores_a_problem_with_both_exact_and_reference(tmp_path, monkeypatch):
    """rel_ref beside rel_l2: the final rel_ref is |u_θ(p) − u*(p)| / |u*(p)| of the trained net."""
    import sdze
    from sdze_core.problems import Problem

    isolate_problem_registry(monkeypatch)

    class WithReference(Problem):
        def reference(self):
            points = self.sample_domain(key(9), 3)
            return points, self.exact(points)

    def factory(dim, seed=0, backend=None):
        p = make_benchmark("poisson-two-body", dim, seed, backend)
        return WithReference(p.name, p.dim, p.coefficients, p.backend)

    sdze.register_problem("poisson-with-reference", factory)
    result = sdze.solve("poisson-with-reference", 4, steps=4, eval_every=2, width=8, depth=1,
                        test_points=50, out=tmp_path, quiet=True, plots=False)
    problem = result.run.problem
    points, values = problem.reference()
    u = host(result.run.backend, result.run.model.apply(result.params, points))
    v = host(result.run.backend, values)
    assert result.rel_ref == pytest.approx(np.linalg.norm(u - v) / np.linalg.norm(v), rel=1e-5)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["exact_solution"] is True and metrics["rel_l2"] is not None
    assert all({"rel_l2", "rel_ref", "u_ref"} <= set(r) for r in metrics["history"])
    assert metrics["min_rel_ref"] == min(r["rel_ref"] for r in metrics["history"])


def test_without_reference_nothing_new_is_recorded(tmp_path):
    """A parabolic problem at a d without a reference value: no rel_ref, no errors at all."""
    import sdze

    result = sdze.solve("sine-gordon-parabolic", 3, steps=2, width=8, depth=1, out=tmp_path,
                        quiet=True, plots=False)
    assert result.rel_ref is None and result.rel_l2 is None
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "rel_ref" not in metrics and "reference" not in metrics
    assert all(set(r) == {"step", "loss", "time"} for r in metrics["history"])


# -- registration and the command line ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_cli_solve_writes_the_reference_metric(name, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["solve", name, "--dim", "10", "--steps", "5", "--width", "16", "--depth", "2",
                 "--out", str(out), "--quiet", "--no-plots"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"(reference {REFERENCE_VALUES[name][10]:.6g})" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reference"]["values"] == [pytest.approx(REFERENCE_VALUES[name][10])]
    assert math.isfinite(metrics["rel_ref"]) and len(metrics["u_ref"]) == 1
    assert metrics["rel_ref"] == pytest.approx(
        abs(metrics["u_ref"][0] - REFERENCE_VALUES[name][10]) / REFERENCE_VALUES[name][10]
    )
    assert metrics["history"] and all("rel_ref" in r for r in metrics["history"])
    assert metrics["config"]["dim"] == 10  # the space dimension; the network has 11 inputs
    assert metrics["exact_solution"] is False and metrics["rel_l2"] is None
    assert main(["eval", str(out / "checkpoint.npz")]) == 0  # the saved network, scored again
    report = json.loads(capsys.readouterr().out)
    assert report["rel_ref"] == pytest.approx(metrics["rel_ref"], rel=1e-5)


def test_cli_list_shows_the_parabolic_problems(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert name in out


def test_factory_errors():
    with pytest.raises(ValueError, match="space dimension >= 1"):
        make_problem("allen-cahn-parabolic", 0)
    with pytest.raises(ValueError, match="horizon"):
        make_problem("allen-cahn-parabolic", 3, horizon=0.0)
