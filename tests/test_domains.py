"""Domains (sdze_core.domains): samplers, boundary factors, hard constraints, closed forms.

Distribution checks use a fixed key and a stated bound: a test that holds
with probability at least 99.9 % for a random key (Kolmogorov–Smirnov
distances against the critical value of the Kolmogorov distribution,
binomial counts against normal quantiles with a Bonferroni split). Jets are
checked against nested ``jax.jvp`` (forward-over-forward autodiff) in float64.
"""

import dataclasses
from functools import cache
from math import erf, log, sqrt
from statistics import NormalDist

import numpy as np
import pytest
from array_api_compat import array_namespace

from helpers import f64, host
from sdze_core import jets
from sdze_core.domains import (
    DOMAINS,
    Annulus,
    Ball,
    Box,
    Domain,
    HardConstraint,
    MissingClosedFormError,
    NoBoundaryError,
    SpaceTime,
    WholeSpace,
    make_domain,
    register_domain,
)
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP

ALPHA = 1e-3  # every statistical check holds with probability >= 1 − ALPHA for a random key
N = 4000  # points per distribution check
D = 3  # spatial dimension of the jet checks
B, V = 5, 3
RTOL64 = 1e-12  # relative to max(1, largest reference entry)

DOMAIN_CASES = {
    "ball": Ball(1.3),
    "annulus": Annulus(0.5, 1.5),
    "box": Box((-1.0, 0.0, 0.5), (1.0, 2.0, 1.5)),
    "cube": Box(),
    "ball-x-time": SpaceTime(Ball(), 0.2, 1.1, "initial"),
    "annulus-x-time": SpaceTime(Annulus(), 0.0, 0.3, "terminal", hard_space=True),
    "box-x-time": SpaceTime(Box(-1.0, 1.0), 0.0, 1.0, "initial", hard_space=True),
    "whole-space-x-time": SpaceTime(WholeSpace(), 0.0, 1.0, "terminal"),
}


def ks_critical(n: int, alpha: float = ALPHA) -> float:
    """The (1 − α) quantile of the KS distance for n points: c_α / (√n + 0.12 + 0.11/√n)
    (Stephens' finite-n form), c_α = √(−ln(α/2)/2) (the Kolmogorov distribution's tail)."""
    return sqrt(-log(alpha / 2) / 2) / (sqrt(n) + 0.12 + 0.11 / sqrt(n))


def ks_distance(sample, cdf) -> float:
    """sup_x |F_n(x) − F(x)| for a 1-D sample and a vectorised CDF."""
    s = np.sort(np.asarray(sample, dtype=np.float64))
    F = cdf(s)
    n = s.size
    return float(max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n)))


def uniform_cdf(low, high):
    return lambda s: np.clip((s - low) / (high - low), 0.0, 1.0)


def normal_cdf(s):
    return 0.5 * (1.0 + np.vectorize(erf)(s / sqrt(2.0)))


def assert_close(actual, expected, rtol):
    """max |actual − expected| <= rtol · max(1, max |expected|), actual broadcast to expected."""
    expected = np.asarray(expected)
    actual = np.broadcast_to(np.asarray(actual), expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def eps(backend) -> float:
    return float(backend.xp.finfo(backend.dtype).eps)


# -- samplers: shape, dtype, inside -------------------------------------------------------


@pytest.mark.parametrize("name", list(DOMAIN_CASES) + ["whole-space"])
def test_samples_lie_in_the_domain_with_the_backends_dtype(backend, name):
    domain = DOMAIN_CASES.get(name, WholeSpace(2.0))
    x = domain.sample(backend, key(0), 64, D)
    assert tuple(x.shape) == (64, domain.input_dim(D))
    assert x.dtype == backend.dtype
    assert bool(backend.xp.all(domain.contains(x, atol=8 * eps(backend))))
    again = domain.sample(backend, key(0), 64, D)
    np.testing.assert_array_equal(host(backend, x), host(backend, again))


@pytest.mark.parametrize("name", list(DOMAIN_CASES))
def test_boundary_samples_have_zero_factor_and_interior_samples_positive(backend, name):
    b = f64(backend)
    domain = DOMAIN_CASES[name]
    on = domain.sample_boundary(b, key(1), 64, D)
    assert tuple(on.shape) == (64, domain.input_dim(D)) and on.dtype == b.dtype
    assert bool(b.xp.all(domain.contains(on, atol=1e-12)))
    assert np.max(np.abs(host(b, domain.factor(on)))) <= 1e-12
    inside = host(b, domain.factor(domain.sample(b, key(2), 256, D)))
    assert np.all(inside > 0) and np.all(inside <= 1 + 1e-12)


# -- samplers: distributions -------------------------------------------------------------------


def test_ball_radius_and_direction_laws(backend):
    """Uniform in the ball of radius R in R^d: (‖x‖/R)^d ~ U[0, 1]; on the sphere in R^3,
    x_1/R ~ U[−1, 1] (Archimedes), and ‖x‖ = R."""
    R, d = 1.5, 5
    r = np.linalg.norm(host(backend, Ball(R).sample(backend, key(3), N, d)), axis=1)
    assert ks_distance((r / R) ** d, uniform_cdf(0, 1)) < ks_critical(N)
    sphere = host(backend, Ball(R).sample_boundary(backend, key(4), N, 3))
    np.testing.assert_allclose(np.linalg.norm(sphere, axis=1), R, rtol=8 * eps(backend))
    assert ks_distance(sphere[:, 0] / R, uniform_cdf(-1, 1)) < ks_critical(N)


def test_annulus_radius_law_and_boundary_split(backend):
    """Uniform in a ≤ ‖x‖ ≤ b: P(‖x‖ ≤ r) = (r^d − a^d)/(b^d − a^d); boundary points lie on
    one of the spheres, the inner one with probability 1/2."""
    a, b_, d = 0.5, 1.5, 4
    r = np.linalg.norm(host(backend, Annulus(a, b_).sample(backend, key(5), N, d)), axis=1)
    assert ks_distance(r, lambda s: (s**d - a**d) / (b_**d - a**d)) < ks_critical(N)
    on = np.linalg.norm(
        host(backend, Annulus(a, b_).sample_boundary(backend, key(6), N, d)), axis=1
    )
    inner = np.abs(on - a) <= 8 * eps(backend) * a
    assert np.all(inner | (np.abs(on - b_) <= 8 * eps(backend) * b_))
    z = NormalDist().inv_cdf(1 - ALPHA / 2)
    assert abs(inner.sum() - N / 2) <= z * sqrt(N) / 2


def test_box_coordinates_uniform_and_faces_by_area(backend):
    """Inside: each (x_i − l_i)/(h_i − l_i) ~ U[0, 1], i.i.d. over points and coordinates.
    On the boundary: face x_i = l_i or h_i with probability ∝ its area, the others uniform."""
    low, high = np.array([-1.0, 0.0, 0.5]), np.array([1.0, 0.5, 4.5])
    box = Box(tuple(low), tuple(high))
    s = (host(backend, box.sample(backend, key(7), N, 3)) - low) / (high - low)
    assert ks_distance(s.ravel(), uniform_cdf(0, 1)) < ks_critical(s.size)

    x = host(backend, box.sample_boundary(backend, key(8), N, 3))
    tol = 8 * eps(backend) * np.maximum(np.abs(low), np.abs(high))
    at_low, at_high = np.abs(x - low) <= tol, np.abs(x - high) <= tol
    assert np.all((at_low | at_high).sum(axis=1) >= 1)
    face = np.where(at_low.any(axis=1), at_low.argmax(axis=1), 3 + at_high.argmax(axis=1))
    area = np.prod(high - low) / (high - low)
    p = np.concatenate([area, area]) / (2 * area.sum())
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * p.size))  # Bonferroni over the 2d faces
    counts = np.bincount(face, minlength=p.size)
    assert np.all(np.abs(counts - N * p) <= z * np.sqrt(N * p * (1 - p)))
    free = (x - low) / (high - low)
    others = free[~(at_low | at_high)]
    assert ks_distance(others, uniform_cdf(0, 1)) < ks_critical(others.size)


def test_whole_space_is_gaussian(backend):
    """x ~ N(0, σ² I): x_i / σ ~ N(0, 1), i.i.d."""
    sigma = 0.7
    x = host(backend, WholeSpace(sigma).sample(backend, key(9), N // 2, 2))
    assert ks_distance(x.ravel() / sigma, normal_cdf) < ks_critical(x.size)


def test_space_time_samples(backend):
    """t ~ U[t0, t1] independent of x from the space's sampler; the condition's slice and
    the lateral boundary ∂Ω × [t0, t1]."""
    t0, t1 = 0.2, 1.1
    domain = SpaceTime(Ball(), t0, t1, "terminal")
    x = host(backend, domain.sample(backend, key(10), N, 2))
    assert ks_distance(x[:, -1], uniform_cdf(t0, t1)) < ks_critical(N)
    assert ks_distance(np.sum(x[:, :-1] ** 2, axis=1), uniform_cdf(0, 1)) < ks_critical(N)
    end = host(backend, domain.sample_boundary(backend, key(11), 16, 2))
    np.testing.assert_array_equal(end[:, -1], np.float32(t1) if eps(backend) > 1e-10 else t1)
    side = host(backend, domain.sample_lateral(backend, key(12), 16, 2))
    np.testing.assert_allclose(np.linalg.norm(side[:, :-1], axis=1), 1.0, rtol=8 * eps(backend))
    start = SpaceTime(Ball(), t0, t1, "initial").sample_boundary(backend, key(11), 4, 2)
    assert np.all(host(backend, start)[:, -1] == np.asarray(t0, dtype=host(backend, start).dtype))


def test_keys_are_roles_not_reused(backend):
    """Independent draws for different keys; the boundary sampler is not the interior one."""
    ball = Ball()
    a, b_ = ball.sample(backend, key(0), 8, 3), ball.sample(backend, fold_in(key(0), 1), 8, 3)
    assert not np.allclose(host(backend, a), host(backend, b_))


# -- boundary factors: jets against nested autodiff ----------------------------------------------


def _jax():
    jax = pytest.importorskip("jax", reason="jax is the nested-autodiff reference")
    jax.config.update("jax_enable_x64", True)
    return jax


def reference_factor(domain):
    """φ restated in jax.numpy, independently of the library's jets."""
    jnp = _jax().numpy
    if isinstance(domain, SpaceTime):
        space = reference_factor(domain.space) if domain.hard_space else None

        def phi(x):
            t = x[..., -1]
            T = domain.t1 - domain.t0
            tau = (t - domain.t0) / T if domain.condition == "initial" else (domain.t1 - t) / T
            return tau if space is None else tau * space(x[..., :-1])

        return phi
    if isinstance(domain, Ball):
        return lambda x: 1 - jnp.sum(x * x, axis=-1) / domain.radius**2
    if isinstance(domain, Annulus):
        a2, b2 = domain.inner**2, domain.outer**2

        def phi(x):
            rho = jnp.sum(x * x, axis=-1)
            return 4 / (b2 - a2) ** 2 * (rho - a2) * (b2 - rho)

        return phi
    if isinstance(domain, Box):
        low, high = (jnp.broadcast_to(jnp.asarray(v), (D,)) for v in (domain.low, domain.high))
        return lambda x: jnp.prod(4 * (x - low) * (high - x) / (high - low) ** 2, axis=-1)
    raise AssertionError(domain)


def nested_jvp(fn, x, v, order):
    """(f, D f[v], D² f[v, v], ..., D^order f[v^order]) by nested jax.jvp."""
    jax = _jax()
    out, g = [fn(x)], fn
    for _ in range(order):
        g = (lambda f: lambda y: jax.jvp(f, (y,), (v,))[1])(g)
        out.append(g(x))
    return [np.asarray(o) for o in out]


def reference_jets(fn, x, tangents, order):
    """Per direction v (tangents (V, B, n)): the nested jvp terms, stacked to (V, B)."""
    per = [nested_jvp(fn, x, v, order) for v in tangents]
    return per[0][0], [np.stack([p[k] for p in per]) for k in range(1, order + 1)]


def points(domain, n=D):
    rng = np.random.default_rng(3)
    return 0.6 * rng.standard_normal((B, domain.input_dim(n)))


def direction_arrays(kind, n):
    """NumPy directions of a kind (indices with t's among them, or dense) and the
    (V, B, n) tangents they stand for."""
    if kind == "index":
        index = np.array([n - 1, 0, 1])
        return index, np.broadcast_to(np.eye(n)[index][:, None, :], (V, B, n))
    rng = np.random.default_rng(4)
    dense = rng.standard_normal((V, n) if kind == "shared" else (V, B, n))
    return dense, np.broadcast_to(dense.reshape(V, -1, n), (V, B, n))


def directions(b, kind, n):
    """Backend directions and the (V, B, n) tangents they stand for."""
    raw, tangents = direction_arrays(kind, n)
    dtype = b.index_dtype if kind == "index" else b.dtype
    return b.asarray(raw, dtype=dtype), tangents


@cache
def factor_reference(name, kind, order):
    """The nested-jvp jets of a domain case's φ (computed once for every backend)."""
    domain = DOMAIN_CASES[name]
    x = points(domain)
    tangents = direction_arrays(kind, x.shape[1])[1]
    return reference_jets(reference_factor(domain), x, tangents, order)


def check_jet(b, out, reference, order):
    primal, coeffs = reference
    assert out.order == order
    assert_close(host(b, out.primal), primal, RTOL64)
    for k in range(order):
        c = out.coeffs[k]
        assert_close(np.zeros(()) if c is None else host(b, c), coeffs[k], RTOL64)


@pytest.mark.parametrize("order", [2, 4])
@pytest.mark.parametrize("kind", ["index", "shared", "per-point"])
@pytest.mark.parametrize("name", list(DOMAIN_CASES))
def test_boundary_factor_jet_matches_nested_autodiff(backend, name, kind, order):
    b = f64(backend)
    domain = DOMAIN_CASES[name]
    x = points(domain)
    dirs, _ = directions(b, kind, x.shape[1])
    out = domain.factor_jet(b.asarray(x, dtype=b.dtype), dirs, order)
    check_jet(b, out, factor_reference(name, kind, order), order)


# -- closed forms -------------------------------------------------------------------------------


@cache
def laplacian_reference(name):
    """(Δφ, Δ²φ) at a domain case's points by nested jax.hessian (jitted: eager
    nested Hessians take seconds)."""
    jax = _jax()
    jnp = jax.numpy
    fn = reference_factor(DOMAIN_CASES[name])
    lap = lambda y: jnp.trace(jax.hessian(fn)(y))
    bilap = lambda y: jnp.trace(jax.hessian(lap)(y))
    x = points(DOMAIN_CASES[name])
    both = jax.jit(jax.vmap(lambda y: (lap(y), bilap(y))))
    return tuple(np.asarray(v) for v in both(x))


@pytest.mark.parametrize("name", ["ball", "annulus", "ball-x-time", "annulus-x-time"])
def test_closed_forms_match_autodiff(backend, name):
    b = f64(backend)
    domain = DOMAIN_CASES[name]
    x = points(domain)
    lap, bilap = laplacian_reference(name)
    xb = b.asarray(x, dtype=b.dtype)
    assert_close(host(b, domain.factor_laplacian(xb)), lap, RTOL64)
    assert_close(host(b, domain.factor_bilaplacian(xb)), bilap, RTOL64)


def test_radial_profile_is_the_factor(backend):
    """φ(x) = p(‖x‖²) with the profile's p, and its derivatives are p's."""
    b = f64(backend)
    for domain in (Ball(1.3), Annulus(0.5, 1.5)):
        x = points(domain)
        rho = b.asarray(np.sum(x * x, axis=1), dtype=b.dtype)
        p = domain.radial_profile(rho, 1)
        assert_close(host(b, p[0]), np.asarray(reference_factor(domain)(x)), RTOL64)
        assert len(domain.radial_profile(rho, 4)) == 5


@pytest.mark.parametrize(
    ("domain", "call", "words"),
    [
        (Box(), "factor_laplacian", ("Box", "Laplacian")),
        (Box(), "factor_bilaplacian", ("Box", "biharmonic")),
        (Box(), "radial_profile", ("Box", "radial profile")),
        (SpaceTime(Box(), hard_space=True), "factor_laplacian", ("SpaceTime", "Box", "Laplacian")),
        (SpaceTime(Ball()), "radial_profile", ("SpaceTime", "radial profile")),
        (WholeSpace(), "factor_laplacian", ("WholeSpace", "Laplacian")),
    ],
)
def test_a_missing_closed_form_raises_naming_domain_and_form(domain, call, words):
    x = np.zeros((2, domain.input_dim(3)))
    args = (np.zeros(2), 2) if call == "radial_profile" else (x,)
    with pytest.raises(MissingClosedFormError) as info:
        getattr(domain, call)(*args)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert isinstance(info.value, NotImplementedError)


def test_space_time_without_hard_space_has_zero_laplacians():
    x = points(SpaceTime(Box()))
    for domain in (SpaceTime(Box()), SpaceTime(WholeSpace())):
        np.testing.assert_array_equal(domain.factor_laplacian(x), 0.0)
        np.testing.assert_array_equal(domain.factor_bilaplacian(x), 0.0)


def test_no_boundary_raises():
    with pytest.raises(NoBoundaryError, match="WholeSpace.*no boundary"):
        WholeSpace().sample_boundary(None, key(0), 4, 2)
    with pytest.raises(NoBoundaryError, match="WholeSpace.*no boundary"):
        WholeSpace().factor(np.zeros((2, 2)))
    with pytest.raises(NoBoundaryError, match="SpaceTime"):
        HardConstraint(WholeSpace(), MLP((2, 4, 1)))
    with pytest.raises(NoBoundaryError, match="hard_space"):
        SpaceTime(WholeSpace(), hard_space=True)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Ball(0.0), "radius"),
        (lambda: Annulus(2.0, 1.0), "inner < outer"),
        (lambda: Box((0.0, 1.0), (1.0, 1.0)), "coordinate 1"),
        (lambda: Box((0.0, 0.0), (1.0, 1.0, 1.0)), "different lengths"),
        (lambda: WholeSpace(-1.0), "scale"),
        (lambda: SpaceTime(Ball(), 1.0, 0.0), "t0 < t1"),
        (lambda: SpaceTime(Ball(), condition="final"), "condition"),
        (lambda: SpaceTime(SpaceTime(Ball())), "spatial Domain"),
    ],
)
def test_invalid_domains_are_refused(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_box_dimension_must_match_its_bounds(backend):
    with pytest.raises(ValueError, match="3 coordinates, not dim = 2"):
        Box((0.0, 0.0, 0.0), 1.0).sample(backend, key(0), 4, 2)


# -- hard constraints ----------------------------------------------------------------------------

SIZES = (16, 16, 1)


def numpy_params(n):
    rng = np.random.default_rng(5)
    sizes = (n,) + SIZES
    return [
        {
            "W": rng.standard_normal((o, i)) * np.sqrt(2.0 / (i + o)),
            "b": 0.1 * rng.standard_normal(o),
        }
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def backend_params(b, n):
    return [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in numpy_params(n)]


def sine_lift(x_jet):
    """g(x) = sin(x_1) + x_2 x_n (a jet function: any smooth g works)."""
    first = jets.linear_map(x_jet, lambda y, p: y[..., 0])
    second = jets.linear_map(x_jet, lambda y, p: y[..., 1])
    last = jets.linear_map(x_jet, lambda y, p: y[..., -1])
    return jets.add(jets.sin(first), jets.mul(second, last))


def sum_lift(x_jet):
    """g(x, t) = Σ_i x_i (HJB-LIN's terminal data)."""
    return jets.linear_map(x_jet, lambda y, p: array_namespace(y).sum(y[..., :-1], axis=-1))


def reference_lift(lift):
    jnp = _jax().numpy
    if lift is None:
        return lambda x: 0.0
    if isinstance(lift, float):
        return lambda x: lift
    if lift is sine_lift:
        return lambda x: jnp.sin(x[..., 0]) + x[..., 1] * x[..., -1]
    return lambda x: jnp.sum(x[..., :-1], axis=-1)


def reference_model(domain, lift, n):
    jnp = _jax().numpy
    params = numpy_params(n)
    phi, g = reference_factor(domain), reference_lift(lift)

    def u(x):
        h = x
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            if layer < len(params) - 1:
                h = jnp.tanh(h)
        return g(x) + phi(x) * h[..., 0]

    return u


MODEL_CASES = {
    "ball-sine": (Ball(1.3), sine_lift),
    "annulus-constant": (Annulus(0.5, 1.5), 0.75),
    "box-none": (Box((-1.0, 0.0, 0.5), (1.0, 2.0, 1.5)), None),
    "box-x-time-sine": (SpaceTime(Box(-1.0, 1.0), hard_space=True), sine_lift),
    "whole-space-terminal-sum": (SpaceTime(WholeSpace(), 0.0, 1.0, "terminal"), sum_lift),
}


def model_for(name):
    domain, lift = MODEL_CASES[name]
    return HardConstraint(domain, MLP((domain.input_dim(D),) + SIZES), lift), domain, lift


@pytest.mark.parametrize("order", [2, 4])
@pytest.mark.parametrize("kind", ["index", "shared", "per-point"])
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_constrained_jet_matches_nested_autodiff(backend, name, kind, order):
    b = f64(backend)
    model, domain, lift = model_for(name)
    x = points(domain)
    n = x.shape[1]
    dirs, _ = directions(b, kind, n)
    out = model.jet(backend_params(b, n), b.asarray(x, dtype=b.dtype), dirs, order)
    check_jet(b, out, model_reference(name, kind, order), order)


@cache
def model_reference(name, kind, order):
    """The nested-jvp jets of a hard-constraint case (computed once for every backend)."""
    _, domain, lift = model_for(name)
    x = points(domain)
    n = x.shape[1]
    return reference_jets(reference_model(domain, lift, n), x, direction_arrays(kind, n)[1], order)


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_constrained_apply_is_the_jets_primal_and_collapse_sums(backend, name):
    b = f64(backend)
    model, domain, lift = model_for(name)
    x = points(domain)
    params, xb = backend_params(b, x.shape[1]), b.asarray(x, dtype=b.dtype)
    u = host(b, model.apply(params, xb))
    assert_close(u, np.asarray(reference_model(domain, lift, x.shape[1])(x)), RTOL64)
    dirs, _ = directions(b, "index", x.shape[1])
    full, summed = model.jet(params, xb, dirs, 2), model.jet(params, xb, dirs, 2, collapse=True)
    assert summed.collapsed
    assert_close(host(b, summed.coeffs[-1]), host(b, full.coeffs[-1]).sum(axis=0), RTOL64)


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_constrained_model_equals_the_data_on_the_boundary(backend, name):
    """u = g on the constrained boundary for any network: here a random one."""
    b = f64(backend)
    model, domain, lift = model_for(name)
    params = model.init(key(13), b)
    on = domain.sample_boundary(b, key(14), 32, D)
    u = host(b, model.apply(params, on))
    g = np.broadcast_to(np.asarray(reference_lift(lift)(host(b, on))), u.shape)
    assert_close(u, g, RTOL64)
    inside = domain.sample(b, key(15), 32, D)
    u_in = host(b, model.apply(params, inside))
    assert np.max(np.abs(u_in - np.asarray(reference_lift(lift)(host(b, inside))))) > 1e-6


def test_constrained_model_in_float32(backend):
    model, domain, _ = model_for("ball-sine")
    params = model.init(key(0), backend)
    x = domain.sample(backend, key(1), 8, D)
    assert model.apply(params, x).dtype == backend.dtype
    out = model.jet(params, x, backend.asarray(np.array([0, 2]), dtype=backend.index_dtype), 2)
    assert out.coeffs[1].dtype == backend.dtype and tuple(out.coeffs[1].shape) == (2, 8)


def test_the_activity_engine_can_swap_the_network(backend):
    """dataclasses.replace(model, network=...) keeps φ and g; they broadcast over the
    perturbed network's query axis, whose query 0 is the unperturbed model."""
    from sdze_core.activity import ActivityPerturbedNetwork, _perturbed_model

    b = f64(backend)
    model, domain, _ = model_for("box-x-time-sine")
    params = model.init(key(0), b)
    x = domain.sample(b, key(1), B, D)
    dirs, _ = directions(b, "index", domain.input_dim(D))
    perturbed = _perturbed_model(model, (key(2), (1e-3, -1e-3), (0, 1)))
    assert isinstance(perturbed, HardConstraint) and perturbed.domain is domain
    assert isinstance(perturbed.network, ActivityPerturbedNetwork)
    out, plain = perturbed.jet(params, x, dirs, 2), model.jet(params, x, dirs, 2)
    Q = perturbed.network.num_queries
    assert tuple(out.primal.shape) == (Q, B) and tuple(out.coeffs[1].shape) == (V, Q, B)
    assert_close(host(b, out.coeffs[1])[:, 0], host(b, plain.coeffs[1]), RTOL64)
    replaced = dataclasses.replace(model, network=MLP(model.network.sizes, "sin"))
    assert replaced.domain is domain and replaced.lift is model.lift


def test_a_bad_lift_is_refused(backend):
    b = f64(backend)
    net = MLP((3,) + SIZES)
    with pytest.raises(TypeError, match="lift"):
        HardConstraint(Ball(), net, lift="zero")
    x = b.asarray(points(Ball()), dtype=b.dtype)
    params = net.init(key(0), b)
    wrong_order = HardConstraint(Ball(), net, lambda j: jets.Jet(j.primal[..., 0], ()))
    with pytest.raises(TypeError, match="Jet of order 2"):
        wrong_order.jet(params, x, b.asarray(np.array([0]), dtype=b.index_dtype), 2)
    wrong_shape = HardConstraint(Ball(), net, lambda j: j)
    with pytest.raises(ValueError, match="primal shape"):
        wrong_shape.apply(params, x)
    with pytest.raises(ValueError, match="scalar output"):
        HardConstraint(Ball(), MLP((3, 4, 2)))


# -- the registry ------------------------------------------------------------------------------


def test_registry_has_the_built_ins_and_builds_them():
    assert {"ball", "annulus", "box", "whole-space", "space-time"} <= set(DOMAINS)
    assert make_domain("ball", radius=2.0) == Ball(2.0)
    assert make_domain("space-time", space=Box(), condition="terminal") == SpaceTime(
        Box(), condition="terminal"
    )
    with pytest.raises(ValueError, match="unknown domain 'disc'; known: annulus, ball"):
        make_domain("disc")


@dataclasses.dataclass(frozen=True)
class Slab(Domain):
    """|x_1| ≤ 1, the other coordinates Gaussian: a user's domain with φ = 1 − x_1²."""

    name = "slab"

    def sample(self, backend, key, num_points, dim):
        x = backend.normal(fold_in(key, "normal"), (num_points, dim))
        u = backend.uniform(fold_in(key, "slab"), (num_points, 1))
        return backend.xp.concat([2 * u - 1, x[:, 1:]], axis=1)

    def contains(self, x, atol=0.0):
        return array_namespace(x).abs(x[:, 0]) <= 1 + atol

    def boundary_factor(self, x_jet):
        first = jets.linear_map(x_jet, lambda y, p: y[..., 0])
        return jets.shift(jets.scale(jets.square(first), -1.0), 1.0)


def test_a_users_domain_registers_and_gets_the_defaults(backend, monkeypatch):
    from sdze_core import domains

    monkeypatch.setattr(domains, "DOMAINS", dict(DOMAINS))
    assert register_domain(Slab) is Slab and domains.DOMAINS["slab"] is Slab
    with pytest.raises(ValueError, match="already registered by Slab"):
        register_domain(type("Other", (Slab,), {}))
    with pytest.raises(TypeError, match="Domain subclass"):
        register_domain(dict)
    b = f64(backend)
    slab = domains.make_domain("slab")
    x = slab.sample(b, key(0), B, D)
    assert bool(b.xp.all(slab.contains(x)))
    dirs, tangents = directions(b, "index", D)  # the default factor_jet: one-hot directions
    reference = reference_jets(lambda y: 1 - y[..., 0] ** 2, host(b, x), tangents, 2)
    check_jet(b, slab.factor_jet(x, dirs, 2), reference, 2)
    with pytest.raises(MissingClosedFormError, match="Slab.*Laplacian"):
        slab.factor_laplacian(x)
    with pytest.raises(NoBoundaryError, match="Slab"):
        slab.sample_boundary(b, key(0), 2, D)


def test_the_built_in_problems_sample_the_same_points(backend):
    """problems.sample_ball / sample_annulus are the unit Ball's and the 1–2 Annulus'
    samplers: bit for bit, so a run's points do not change with the domain objects."""
    from sdze_core.problems import sample_annulus, sample_ball

    for domain, sampler in ((Ball(), sample_ball), (Annulus(), sample_annulus)):
        for dim in (3, 40):
            expected = host(backend, sampler(backend, key(16), 32, dim))
            np.testing.assert_array_equal(
                host(backend, domain.sample(backend, key(16), 32, dim)), expected
            )
