"""Guarantee: CRNS cancels the O(1/ε²) variance of zeroth-order estimates (docs/method.md#crns).

On a small Allen–Cahn-type PINN (d = 8, a 16-16 tanh ansatz, B = 8 points,
a sparse Laplacian with V = 2 sampled dimensions, so the spatial noise is
large) the estimate ĝ = (1/q) Σ g_i z_i is drawn for N = 64 steps of q = 8
queries (512 projected gradients) at ε = 1e-1, 1e-2, 1e-3, 1e-4, and its
second moment M2(ε) = mean_i g_i² ‖z_i‖² is compared:

* with CRNS (ξ shared by the ± sides) M2 is flat: M2(ε) = M2(0) + O(ε²), so
  within 1% of the forward-gradient value M2(0) for ε ≤ 1e-2 and within a
  factor 2.5 at ε = 1e-1, where the perturbation is ~40% of the weights
  (‖εZ‖_F = ε sqrt(m n)); the projected gradients converge to the exact
  directional derivatives of the forward-gradient estimator at rate ε²;
* without CRNS (independent ξ⁺, ξ⁻) M2 grows as ε⁻²: the factor per decade
  is within [50, 200] for ε ≤ 1e-2 and the log-log slope within
  [−2.1, −1.9].

Every ε uses the same step keys (the same ξ and z: common random numbers
across ε), so these ratios carry no Monte Carlo noise from M2 itself; the
bounds leave a margin around the values measured in float64 on numpy,
array_api_strict, torch and jax (each backend draws its own native random
numbers): CRNS M2(1e-1)/M2(0) = 1.33–2.07, |M2(ε)/M2(0) − 1| ≤ 2e-3 for
ε ≤ 1e-2; naive decade factors 98–100, slope −2.00.
"""

import math

import pytest

from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import LowRankSubspace

np = pytest.importorskip("numpy")

EPSILONS = (1e-1, 1e-2, 1e-3, 1e-4)
D, B, Q, STEPS = 8, 8, 8, 64


def make_problem(backend):
    xp = backend.xp
    model = Ansatz(MLP((D, 16, 16, 1)))
    params = model.init(key(0), backend)

    def points(k):
        x = backend.normal(k, (B, D))
        radius = backend.uniform(fold_in(k, 1), (B, 1))
        return x / xp.sqrt(xp.sum(x * x, axis=1, keepdims=True)) * radius

    def rhs(u, x):
        return xp.sum(xp.sin(x), axis=-1) + u - u**3

    return params, ResidualLoss(model, SparseLaplacian(num_directions=2), rhs, points)


def estimates(backend, params, loss, perturber):
    """(g of all 512 queries, ‖z‖² of each) with the same step keys for every perturber."""
    xp = backend.xp
    sampler = LowRankSubspace(rank=4)
    state = sampler.init(key(1), params)
    gs, norms = [], []
    for t in range(STEPS):
        step_key = fold_in(key(2), t)
        z = sampler.draw(state, params, fold_in(step_key, "param"), Q)
        g = perturber.estimate(loss, params, sampler, state, z, fold_in(step_key, "spatial")).g
        norm2 = sum(
            c * c * xp.sum(S * S, axis=(1, 2)) + xp.sum(zb * zb, axis=1)
            for S, c, zb in zip(z.S, z.scale, z.bias, strict=True)
        )
        gs.append(backend.to_host(g))
        norms.append(backend.to_host(norm2))
    return np.concatenate(gs), np.concatenate(norms)


@pytest.fixture
def measured(backend):
    b = backend.with_config(dtype="float64")
    params, loss = make_problem(b)
    forward, norms = estimates(b, params, loss, CRNSPerturber(num_queries=Q, estimator="forward"))
    out = {"forward": forward, "norms": norms}
    for crns in (True, False):
        for eps in EPSILONS:
            g, _ = estimates(b, params, loss, CRNSPerturber(eps=eps, num_queries=Q, crns=crns))
            out[crns, eps] = g
    return out


def second_moment(g, norms):
    return float(np.mean(g * g * norms))


def test_crns_second_moment_is_flat_in_eps(measured):
    exact = second_moment(measured["forward"], measured["norms"])
    ratios = [second_moment(measured[True, eps], measured["norms"]) / exact for eps in EPSILONS]
    assert 1 / 2.5 <= ratios[0] <= 2.5, ratios
    assert all(abs(r - 1) <= 1e-2 for r in ratios[1:]), ratios


def test_crns_converges_to_the_forward_gradient(measured):
    exact = measured["forward"]
    scale = np.mean(np.abs(exact))
    errors = [np.max(np.abs(measured[True, eps] - exact)) / scale for eps in EPSILONS]
    assert errors[-1] <= 1e-4, errors
    # Central differences: the error shrinks as ε² (100x per decade) until round-off.
    assert 50 <= errors[1] / errors[2] <= 200, errors
    m2_exact = second_moment(exact, measured["norms"])
    m2_small = second_moment(measured[True, EPSILONS[-1]], measured["norms"])
    assert abs(m2_small / m2_exact - 1) <= 1e-3


def test_naive_second_moment_grows_as_inverse_eps_squared(measured):
    m2 = [second_moment(measured[False, eps], measured["norms"]) for eps in EPSILONS]
    small = EPSILONS[1:]
    factors = [m2[i + 1] / m2[i] for i in range(1, len(EPSILONS) - 1)]
    assert all(50 <= f <= 200 for f in factors), factors
    slope = np.polyfit(np.log10(small), np.log10(m2[1:]), 1)[0]
    assert -2.1 <= slope <= -1.9, slope
    crns = second_moment(measured[True, EPSILONS[-1]], measured["norms"])
    assert m2[-1] / crns >= 1e4, (m2[-1], crns)
    assert math.isfinite(slope)
