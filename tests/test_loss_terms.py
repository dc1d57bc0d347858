"""Weighted loss terms (docs/losses.md): values against a hand computation, the
weights, argument errors, the per-point scaling, first-order training and the
subspace engine, on every backend in float64.

The problem: a plain 3-8-8-1 tanh MLP on the space-time ball (d = 2, points
(x, t)), an Allen–Cahn-type interior residual with a sparse Laplacian on two
coordinates, u = g on the lateral boundary, the initial slice, and 3 of 7
observations per step.
"""

import numpy as np
import pytest

from helpers import host
from sdze_core.domains import Ball, SpaceTime
from sdze_core.engine import SDZE
from sdze_core.first_order import FirstOrderAdam
from sdze_core.keys import fold_in, key
from sdze_core.loss_terms import (
    DataTerm,
    DirichletTerm,
    InteriorTerm,
    TimeSliceTerm,
    WeightedLoss,
    domain_points,
)
from sdze_core.models import MLP
from sdze_core.objectives import ResidualLoss
from sdze_core.optimizers import zo_adam
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import FullGaussian, LowRankSubspace

D = 2
WEIGHTS = (1.0, 3.0, 0.5, 2.0)


def problem(backend, weights=WEIGHTS, unbiased=False):
    b = backend.with_config(dtype="float64")
    xp = b.xp
    domain = SpaceTime(Ball())
    model = MLP((D + 1, 8, 8, 1))
    params = model.init(key(0), b)

    def rhs(u, x):
        return u - u**3

    def forcing(x):
        return xp.sum(xp.sin(x), axis=-1)

    def g(x):
        return xp.cos(xp.sum(x, axis=-1))

    data_x = domain.sample(b, key(5), 7, D)
    terms = (
        InteriorTerm(
            SparseLaplacian(num_directions=2), rhs, domain_points(domain, b, 6, D),
            forcing, unbiased=unbiased, weight=weights[0],
        ),
        DirichletTerm(g, domain_points(domain, b, 4, D, "lateral"), weight=weights[1]),
        TimeSliceTerm(g, domain, b, 5, D, weight=weights[2]),
        DataTerm(data_x, xp.sin(data_x[:, 0]), batch_size=3, weight=weights[3]),
    )
    return b, params, WeightedLoss(model, terms)


def hand_terms(b, params, loss, xi):
    """mean_b r_{j,b}² per term, from the model's apply and ResidualLoss directly."""
    interior, dirichlet, initial, data = loss.terms
    res = ResidualLoss(
        loss.model, interior.oracle, interior.rhs, interior.points, forcing=interior.forcing
    )
    r0 = host(b, res.residuals(params, xi.terms[0])[0])
    out = [np.mean(r0**2)]
    for term, (x, _) in zip((dirichlet, initial), xi.terms[1:3], strict=True):
        r = host(b, loss.model.apply(params, x)) - host(b, term.g(x))
        out.append(np.mean(r**2))
    x, y = xi.terms[3]
    out.append(np.mean((host(b, loss.model.apply(params, x)) - host(b, y)) ** 2))
    return out


def test_value_is_the_weighted_sum_of_mean_squares(backend):
    b, params, loss = problem(backend)
    xi = loss.sample(key(3))
    expected = sum(w * m for w, m in zip(WEIGHTS, hand_terms(b, params, loss, xi), strict=True))
    np.testing.assert_allclose(float(loss(params, xi)), expected, rtol=1e-12)


def test_weights_scale_their_own_term(backend):
    b, params, loss = problem(backend)
    xi = loss.sample(key(3))
    means = hand_terms(b, params, loss, xi)
    for j in range(4):
        weights = list(WEIGHTS)
        weights[j] += 1.5
        _, _, heavier = problem(backend, tuple(weights))
        gap = float(heavier(params, xi)) - float(loss(params, xi))
        np.testing.assert_allclose(gap, 1.5 * means[j], rtol=1e-10)
    _, _, off = problem(backend, (1.0, 0.0, 0.0, 0.0))
    np.testing.assert_allclose(float(off(params, xi)), means[0], rtol=1e-12)


@pytest.mark.parametrize("unbiased", [False, True])
def test_per_point_losses_average_to_the_loss(backend, unbiased):
    b, params, loss = problem(backend, unbiased=unbiased)
    xi = loss.sample(key(3))
    r = loss.residuals(params, xi)
    assert len(r) == (2 if unbiased else 1)
    per_point = host(b, r[0] * r[-1])
    assert per_point.shape == (6 + 4 + 5 + 3,)
    np.testing.assert_allclose(per_point.mean(), float(loss(params, xi)), rtol=1e-12)
    # term by term: ℓ_b = (N / B_j) w_j r_b²
    np.testing.assert_allclose(
        per_point[6:10].mean() * 4 / 18, WEIGHTS[1] * hand_terms(b, params, loss, xi)[1],
        rtol=1e-12,
    )


def test_samples_follow_their_keys_and_domains(backend):
    b, params, loss = problem(backend)
    xi = loss.sample(key(3))
    again = loss.sample(key(3))
    for part, same in zip(xi.terms[1:], again.terms[1:], strict=True):
        np.testing.assert_array_equal(host(b, part[0]), host(b, same[0]))
    x_data, y_data = xi.terms[3]
    lateral = host(b, xi.terms[1][0])
    np.testing.assert_allclose(np.sum(lateral[:, :D] ** 2, axis=1), 1.0, rtol=1e-12)
    initial = host(b, xi.terms[2][0])
    np.testing.assert_array_equal(initial[:, -1], 0.0)
    terminal = TimeSliceTerm(lambda x: x[:, 0], SpaceTime(Ball(), 0.0, 2.0), b, 4, D, "terminal")
    np.testing.assert_array_equal(host(b, terminal.sample(key(1))[0])[:, -1], 2.0)
    rows = host(b, loss.terms[3].x)
    picked = host(b, x_data)
    assert len({tuple(p) for p in picked}) == 3
    assert all(any(np.array_equal(p, row) for row in rows) for p in picked)
    np.testing.assert_array_equal(host(b, y_data), np.sin(picked[:, 0]))


def test_bad_arguments_name_themselves(backend):
    b = backend.with_config(dtype="float64")
    x = b.normal(key(0), (5, 2))
    g = lambda x: x[:, 0]  # noqa: E731
    with pytest.raises(ValueError, match="DirichletTerm: weight must be .* >= 0, got -1"):
        DirichletTerm(g, lambda k: x, weight=-1.0)
    with pytest.raises(TypeError, match="InteriorTerm: weight must be a number"):
        InteriorTerm(None, None, lambda k: x, weight="2")
    with pytest.raises(ValueError, match="DataTerm: weight"):
        DataTerm(x, x[:, 0], weight=float("nan"))
    with pytest.raises(ValueError, match=r"DataTerm: y must have shape \(N,\) = \(5,\)"):
        DataTerm(x, x[:4, 0])
    with pytest.raises(ValueError, match="DataTerm: x must have shape"):
        DataTerm(x[:, 0], x[:, 0])
    with pytest.raises(ValueError, match="DataTerm: batch_size must be an int in 1..5"):
        DataTerm(x, x[:, 0], batch_size=6)
    with pytest.raises(TypeError, match="TimeSliceTerm: domain must be a SpaceTime"):
        TimeSliceTerm(g, Ball(), b, 4, 2)
    with pytest.raises(ValueError, match="TimeSliceTerm: end must be"):
        TimeSliceTerm(g, SpaceTime(Ball()), b, 4, 2, end="middle")
    with pytest.raises(TypeError, match="part='lateral' needs a SpaceTime"):
        domain_points(Ball(), b, 4, 2, "lateral")
    with pytest.raises(ValueError, match="part must be one of"):
        domain_points(Ball(), b, 4, 2, "surface")
    with pytest.raises(ValueError, match="WeightedLoss: terms must hold"):
        WeightedLoss(MLP((2, 8, 1)), ())


def autodiff_or_skip(b):
    try:
        b.value_and_grad(lambda p: p)
    except TypeError as error:
        pytest.skip(f"{b.name} has no autodiff: {error}")


def test_first_order_training_reduces_the_weighted_loss(backend):
    b, params, loss = problem(backend)
    autodiff_or_skip(b)
    xi = loss.sample(key(3))
    value, grads = b.value_and_grad(loss)(params, xi)
    assert all(np.all(np.isfinite(host(b, g["W"]))) for g in grads)
    start = float(loss(params, xi))
    np.testing.assert_allclose(float(value), start, rtol=1e-12)
    method = FirstOrderAdam(learning_rate=1e-2)
    state = method.init(key(1), params)
    for _ in range(40):
        params, state, info = method.step(loss, params, state)
        assert np.isfinite(info.loss)
    assert float(loss(params, xi)) < 0.8 * start


def test_subspace_engine_accepts_the_loss(backend):
    b, params, loss = problem(backend)
    sampler = FullGaussian()
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 3)
    forward = CRNSPerturber(num_queries=3, estimator="forward").estimate(
        loss, params, sampler, state, directions, key(11)
    )
    central = CRNSPerturber(num_queries=3, eps=1e-6).estimate(
        loss, params, sampler, state, directions, key(11)
    )
    assert host(b, forward.losses).shape == (3,)
    assert host(b, central.losses).shape == (6,)
    gf, gc = host(b, forward.g), host(b, central.g)
    np.testing.assert_allclose(gc, gf, rtol=0, atol=1e-6 * np.max(np.abs(gf)))
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=2, refresh_every=3), zo_adam(1e-2)
    )
    run = engine.init(key(4), params)
    for _ in range(3):
        params, run, info = engine.step(loss, params, run)
        assert np.isfinite(info.loss) and host(b, info.g).shape == (2,)


def test_residual_aligned_subspace_is_refused_with_several_point_sets(backend):
    """Its basis follows one residual per point; several point sets have no such rows."""
    b, params, loss = problem(backend)
    engine = SDZE(CRNSPerturber(num_queries=2),
                  LowRankSubspace(rank=2, refresh_every=3, residual_aligned=True), zo_adam(1e-2))
    with pytest.raises(TypeError, match="residual_aligned=True.*use residual_aligned=False"):
        engine.step(loss, params, engine.init(key(4), params))


def test_activity_engine_steps_on_the_loss(backend):
    from sdze_core.activity import ActivityPerturbation, activity_adam

    b, params, loss = problem(backend)
    engine = ActivityPerturbation(activity_adam(1e-2))
    state = engine.init(key(4), params)
    xi = loss.sample(fold_in(key(4), 0))
    for _ in range(3):
        params, state, info = engine.step(loss, params, state)
        assert np.isfinite(info.loss)
    assert np.isfinite(float(loss(params, xi)))
