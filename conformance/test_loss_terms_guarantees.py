"""Guarantees of the weighted loss terms under the activity engine (docs/losses.md).

On a small space-time problem (d = 2, points (x, t) in R³, a plain 8-8 tanh
MLP, float64) with all four terms, unequal weights and unequal batch sizes
(interior B = 6, lateral Dirichlet B = 4, initial slice B = 5, data 3 of 7
observations per step):

* **exact factorisation**: the engine's own complex-step estimate, with ζ set
  in turn to every basis vector of every jet call's pre-activation
  coefficients, summed, equals ∇_W ℓ of the WEIGHTED loss (autodiff on torch
  and jax, central differences elsewhere) to 1e-7 relative;
* **unbiased**: the mean of 300 central-difference estimates (ε = 1e-5, CRNS)
  lies within z* standard errors of ∇_W ℓ entrywise, z* the two-sided 99.9 %
  quantile Bonferroni-corrected over all entries; for the plain and the
  unbiased (product-form) interior term.

The mutation test drops the √(N w_j / B_j) scaling of the per-point residuals
and requires the unbiasedness check to fail.
"""

import pytest

from sdze_core import activity, loss_terms
from sdze_core.activity import ActivityPerturbation, activity_sgd
from sdze_core.domains import Ball, SpaceTime
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
from sdze_core.oracles import SparseLaplacian
from test_activity_perturbation import check_unbiased, host, reference_gradient

np = pytest.importorskip("numpy")

D, WIDTH, DRAWS = 2, 8, 300


def make_problem(backend, unbiased=False):
    b = backend.with_config(dtype="float64")
    xp = b.xp
    domain = SpaceTime(Ball())
    model = MLP((D + 1, WIDTH, WIDTH, 1))
    params = model.init(key(0), b)
    params = [
        {"W": p["W"], "b": b.normal(fold_in(key(1), i), p["b"].shape) * 0.3}
        for i, p in enumerate(params)
    ]

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
            forcing, unbiased=unbiased,
        ),
        DirichletTerm(g, domain_points(domain, b, 4, D, "lateral"), weight=3.0),
        TimeSliceTerm(g, domain, b, 5, D, weight=0.5),
        DataTerm(data_x, xp.sin(data_x[:, 0]), batch_size=3, weight=2.0),
    )
    return b, params, WeightedLoss(model, terms)


def probe_calls(loss, params, xi, scales, layers):
    probe = activity._perturbed_model(loss.model, (fold_in(key(9), 0), scales, layers))
    activity._per_point_losses(loss, params, xi, probe)
    net = probe if isinstance(probe, activity.ActivityPerturbedNetwork) else probe.network
    return net.calls


def basis_sum(b, loss, params, xi, monkeypatch):
    """Σ over basis ζ of the engine's complex-step Ĝ, per layer (host): (1/N) Σ_b Σ_k δ ⊗ in."""
    engine = ActivityPerturbation(activity_sgd(1.0), estimator="forward")
    scales, _ = engine._scales(params)
    layers = tuple(range(len(params)))
    calls = probe_calls(loss, params, xi, scales, layers)
    total = [0.0] * len(params)
    for call in calls:
        for k in range(len(call.zeta_shapes[0])):
            shapes = [s[k] for s in call.zeta_shapes if s[k] is not None]
            if not shapes:
                continue
            for idx in np.ndindex(*shapes[0][:-2], max(s[-1] for s in shapes)):

                def basis(call_key, lay, shapes, like, k=k, idx=idx, target=call.key):
                    out = []
                    for kk, sh in enumerate(shapes):
                        z = None if sh is None else np.zeros(sh)
                        hit = call_key == target and kk == k and idx[-1] < (sh or (0,))[-1]
                        if hit:
                            z[idx[:-1] + (slice(None), idx[-1])] = 1.0
                        out.append(None if z is None else b.asarray(z))
                    return out

                monkeypatch.setattr(activity, "draw_zeta", basis)
                grads, _, _ = engine.estimate(loss, params, key(3), key(9))
                total = [t + host(b, g.dense()) for t, g in zip(total, grads, strict=True)]
                monkeypatch.undo()
    return total


def draws(b, loss, params, count=DRAWS):
    engine = ActivityPerturbation(activity_sgd(1.0), eps=1e-5)
    out = []
    for i in range(count):
        grads, _, _ = engine.estimate(loss, params, key(3), fold_in(key(100), i))
        out.append([host(b, g.dense()) for g in grads])
    return out


@pytest.mark.parametrize("unbiased", [False, True])
def test_basis_estimates_sum_to_the_weighted_gradient(backend, monkeypatch, unbiased):
    b, params, loss = make_problem(backend, unbiased)
    xi = loss.sample(key(3))
    ref = reference_gradient(b, loss, params, xi)
    got = basis_sum(b, loss, params, xi, monkeypatch)
    for G, G_ref in zip(got, ref, strict=True):
        scale = np.abs(G_ref).max()
        assert np.abs(G - G_ref).max() <= 1e-7 * scale, np.abs(G - G_ref).max() / scale


@pytest.mark.parametrize("unbiased", [False, True])
def test_activity_estimate_is_unbiased_for_the_weighted_loss(backend, unbiased):
    b, params, loss = make_problem(backend, unbiased)
    xi = loss.sample(key(3))
    check_unbiased(reference_gradient(b, loss, params, xi), draws(b, loss, params))


def test_the_engine_reports_the_weighted_loss(backend):
    b, params, loss = make_problem(backend)
    xi = loss.sample(key(3))
    engine = ActivityPerturbation(activity_sgd(1.0))
    _, value, losses = engine.estimate(loss, params, key(3), key(4))
    assert losses.shape[-1] == 6 + 4 + 5 + 3
    np.testing.assert_allclose(float(value), float(loss(params, xi)), rtol=1e-12)


def test_mutation_unscaled_residuals_break_unbiasedness(backend, monkeypatch):
    """Per-point residuals concatenated without √(N w_j / B_j): the engine then
    estimates the gradient of the unweighted mean over all points."""
    b, params, loss = make_problem(backend)
    xi = loss.sample(key(3))
    ref = reference_gradient(b, loss, params, xi)

    def unscaled(self, params, xi):
        pairs = self._pairs(params, xi)
        return (b.xp.concat([r1 for r1, _ in pairs], axis=-1),)

    monkeypatch.setattr(loss_terms.WeightedLoss, "residuals", unscaled)
    with pytest.raises(AssertionError):
        check_unbiased(ref, draws(b, loss, params, 200))
