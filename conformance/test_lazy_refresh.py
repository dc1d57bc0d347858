"""Guarantee: lazy basis refresh, seed replay and exact restore (docs/method.md#crns,
#subspace-perturbations).

All checks are exact (bitwise, ``assert_array_equal`` on host copies) unless a
tolerance is stated, on a small PINN: an MLP (3, 8, 8, 1) (weights 8 × 3,
8 × 8, 1 × 8; rank 4, so r_l = 3, 4, 1), a sparse-Laplacian residual loss on
B = 4 points, refresh period T = 3, q = 2 queries, fixed keys.

* **Lazy refresh**: through ``sampler.refresh(state, params, t)`` for
  t = 0 .. 2T the bases (U, V) of every layer are bitwise identical for
  t < T, change at t = T (every V by more than 1e-3 entrywise, and every U
  with more than one row), are bitwise identical again for T ≤ t < 2T and
  change at t = 2T; ``transition`` is reported exactly at t = T and t = 2T
  and equals (U_newᵀ U_old, V_newᵀ V_old) to 1e-12 (float64). A step's draws
  carry the current bases bitwise. In the engine, ``optimizer.rebase`` is
  called exactly at the refresh steps T and 2T of a 2T + 1 step run.
* **Seed replay**: the same key gives the bitwise identical directions S, z_b
  and dense Z = c U S Vᵀ on a second draw, bitwise identical perturbed
  losses, and the same Z whether the bases are stored or regenerated from
  their key (``store_bases=False``): regenerated bases are bitwise equal to
  the stored ones at every epoch. For the full-space Gaussian, the update
  regenerates each Z_i from its key: applying the coordinate e_i to zero
  weights reproduces the drawn Z_i bitwise.
* **Exact restore**: a perturbed evaluation (``CRNSPerturber.estimate``,
  central differences with CRNS and the complex-step forward gradient, for the
  low-rank layer map with and without a pending update and for the full
  Gaussian) leaves the parameters bitwise unchanged — the layer map computes
  W x ± ε c U (S (Vᵀ x)) and never writes W ± εZ into W — and the
  unperturbed loss is bitwise the same before and after. An engine run of
  2T + 1 steps (crossing two refreshes) with learning rate 0 leaves the
  merged parameters bitwise unchanged for zo_sgd (with and without
  momentum) and zo_adam, low-rank updates merged at refresh or at every
  step, and for the full Gaussian: the update is −0 · ĝ, and W + U (−0) Vᵀ
  = W, b + (−0) = b exactly in IEEE arithmetic. (The rate must be the
  schedule ``constant(0.0)``: ``zo_sgd(0.0)`` is rejected, as a float
  learning rate must be positive.)

Measured on numpy, array_api_strict, torch and jax: all bitwise checks hold;
max |R − U_newᵀ U_old| (and for V) ≤ 3.4e-16.
"""

import pytest

from sdze_core.engine import SDZE
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP
from sdze_core.objectives import ResidualLoss
from sdze_core.optimizers import Optimizer, constant, zo_adam, zo_sgd
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import FullGaussian, LowRankSubspace

np = pytest.importorskip("numpy")

SIZES = (3, 8, 8, 1)
RANK, T, Q, B = 4, 3, 2, 4


def host(b, x):
    return np.array(b.to_host(x))


def host_params(b, params):
    return [{name: host(b, a) for name, a in p.items()} for p in params]


def host_bases(b, bases):
    return [tuple(host(b, a) for a in UV) for UV in bases]


def assert_params_equal(b, params, reference):
    for p, ref in zip(host_params(b, params), reference, strict=True):
        for name in ("W", "b"):
            np.testing.assert_array_equal(p[name], ref[name])


def problem(backend):
    """float64 parameters and a sparse-Laplacian residual loss."""
    b = backend.with_config(dtype="float64")
    xp = b.xp
    model = MLP(SIZES)
    params = model.init(key(0), b)

    def rhs(u, x):
        return xp.sum(x, axis=-1) + u - u**3

    def points(k):
        return 0.5 * b.normal(k, (B, SIZES[0]))

    return b, params, ResidualLoss(model, SparseLaplacian(num_directions=2), rhs, points)


# -- lazy refresh ---------------------------------------------------------------------------


@pytest.mark.parametrize("store_bases", [True, False])
def test_bases_are_fixed_for_t_steps_and_change_after(backend, store_bases):
    b, params, _ = problem(backend)
    sampler = LowRankSubspace(rank=RANK, refresh_every=T, store_bases=store_bases)
    state = sampler.init(key(1), params)
    current = host_bases(b, sampler.bases(state, params))
    for t in range(2 * T + 1):
        state, params, transition = sampler.refresh(state, params, t)
        bases = host_bases(b, sampler.bases(state, params))
        assert state.epoch == t // T
        if t % T or t == 0:
            assert transition is None, t
            for (U, V), (U0, V0) in zip(bases, current, strict=True):
                np.testing.assert_array_equal(U, U0)
                np.testing.assert_array_equal(V, V0)
        else:
            assert transition is not None and len(transition) == len(params), t
            for (U, V), (Uo, Vo), (RU, RV) in zip(bases, current, transition, strict=True):
                assert np.max(np.abs(V - Vo)) > 1e-3
                if U.shape[0] > 1:  # a 1 × r basis is ±1: it cannot change
                    assert np.max(np.abs(U - Uo)) > 1e-3
                np.testing.assert_allclose(host(b, RU), U.T @ Uo, rtol=0, atol=1e-12)
                np.testing.assert_allclose(host(b, RV), V.T @ Vo, rtol=0, atol=1e-12)
            current = bases
        # The step's draws use exactly the current bases.
        directions = sampler.draw(state, params, fold_in(key(2), t), Q)
        for (U, V), (Ud, Vd) in zip(bases, host_bases(b, directions.bases), strict=True):
            np.testing.assert_array_equal(U, Ud)
            np.testing.assert_array_equal(V, Vd)
    assert state.epoch == 2


def recording(optimizer, calls):
    """The optimizer, recording for every ``rebase`` call whether ``transition`` is None."""

    def rebase(state, transition):
        calls.append(transition is None)
        return optimizer.rebase(state, transition)

    return Optimizer(optimizer.init, optimizer.update, rebase, optimizer.needs_coordinates)


def test_engine_rebases_exactly_at_the_refresh_steps(backend):
    b, params, loss = problem(backend)
    calls = []
    engine = SDZE(
        CRNSPerturber(num_queries=Q),
        LowRankSubspace(rank=RANK, refresh_every=T),
        recording(zo_sgd(1e-3, momentum=0.9), calls),
    )
    state = engine.init(key(3), params)
    rebased_at = []
    for t in range(2 * T + 1):
        before = len(calls)
        params, state, _ = engine.step(loss, params, state)
        if len(calls) > before:
            rebased_at.append(t)
        assert state.sampler.epoch == t // T
    assert rebased_at == [T, 2 * T]
    assert calls == [False, False]  # always with the transition


# -- seed replay ----------------------------------------------------------------------------


def test_same_key_same_perturbation(backend):
    b, params, loss = problem(backend)
    stored = LowRankSubspace(rank=RANK, refresh_every=T, store_bases=True)
    regenerated = LowRankSubspace(rank=RANK, refresh_every=T, store_bases=False)
    s1, s2 = stored.init(key(4), params), regenerated.init(key(4), params)
    assert s1.bases is not None and s2.bases is None
    perturber = CRNSPerturber(num_queries=Q)
    for t in range(2 * T + 1):
        s1, params, t1 = stored.refresh(s1, params, t)
        s2, params, t2 = regenerated.refresh(s2, params, t)
        assert s2.bases is None and (t1 is None) == (t2 is None)
        # Regenerated bases equal the stored ones bitwise.
        for (U1, V1), (U2, V2) in zip(
            host_bases(b, stored.bases(s1, params)),
            host_bases(b, regenerated.bases(s2, params)),
            strict=True,
        ):
            np.testing.assert_array_equal(U1, U2)
            np.testing.assert_array_equal(V1, V2)
        param_key = fold_in(key(5), t)
        first = stored.draw(s1, params, param_key, Q)
        again = stored.draw(s1, params, param_key, Q)
        replayed = regenerated.draw(s2, params, param_key, Q)
        for layer in range(len(params)):
            for name in ("S", "bias"):
                a = host(b, getattr(first, name)[layer])
                np.testing.assert_array_equal(a, host(b, getattr(again, name)[layer]))
                np.testing.assert_array_equal(a, host(b, getattr(replayed, name)[layer]))
            for i in range(Q):
                Z = host(b, stored.perturbation(first, layer, i))
                np.testing.assert_array_equal(Z, host(b, stored.perturbation(again, layer, i)))
                np.testing.assert_array_equal(
                    Z, host(b, regenerated.perturbation(replayed, layer, i))
                )
        # The same keys give the same perturbed losses.
        spatial = fold_in(key(6), t)
        e1 = perturber.estimate(loss, params, stored, s1, first, spatial)
        e2 = perturber.estimate(loss, params, stored, s1, again, spatial)
        e3 = perturber.estimate(loss, params, regenerated, s2, replayed, spatial)
        np.testing.assert_array_equal(host(b, e1.losses), host(b, e2.losses))
        np.testing.assert_array_equal(host(b, e1.losses), host(b, e3.losses))


def test_full_gaussian_update_regenerates_the_drawn_directions(backend):
    b, params, _ = problem(backend)
    sampler = FullGaussian()
    state = sampler.init(key(7), params)
    directions = sampler.draw(state, params, key(8), Q)
    again = sampler.draw(state, params, key(8), Q)
    for i in range(Q):
        # Applying the coordinate e_i to zero weights writes the regenerated Z_i.
        zero = [{name: b.zeros(tuple(a.shape)) for name, a in p.items()} for p in params]
        one_hot = [1.0 if j == i else 0.0 for j in range(Q)]
        updates = [
            {"W": b.asarray(one_hot, dtype=b.dtype), "b": b.zeros(tuple(p["b"].shape))}
            for p in params
        ]
        _, replayed = sampler.apply(state, zero, directions, updates)
        for layer in range(len(params)):
            Z = host(b, directions.W[layer])[i]
            np.testing.assert_array_equal(Z, host(b, again.W[layer])[i])
            np.testing.assert_array_equal(host(b, replayed[layer]["W"]), Z)


# -- exact restore --------------------------------------------------------------------------


PERTURBERS = {
    "central": CRNSPerturber(eps=1e-2, num_queries=Q),
    "forward": CRNSPerturber(num_queries=Q, estimator="forward"),
}


@pytest.mark.parametrize("estimator", sorted(PERTURBERS))
@pytest.mark.parametrize("sampler_name", ["lowrank", "lowrank-pending", "full"])
def test_perturbed_evaluation_leaves_the_parameters_unchanged(backend, estimator, sampler_name):
    b, params, loss = problem(backend)
    perturber = PERTURBERS[estimator]
    if sampler_name == "full":
        sampler = FullGaussian()
    else:
        sampler = LowRankSubspace(rank=RANK, refresh_every=T)
    state = sampler.init(key(9), params)
    if sampler_name == "lowrank-pending":  # a pending r × r update A ≠ 0 in the layer map
        directions = sampler.draw(state, params, key(10), Q)
        coords = sampler.project(directions, b.asarray([0.3, -0.2], dtype=b.dtype))
        state, params = sampler.apply(state, params, directions, coords)
        assert max(float(np.max(np.abs(host(b, A)))) for A in state.pending) > 1e-3
    reference = host_params(b, params)
    xi = loss.sample(key(11))
    value = host(b, loss(params, xi))
    directions = sampler.draw(state, params, key(12), Q)
    estimate = perturber.estimate(loss, params, sampler, state, directions, key(11))
    assert np.max(np.abs(host(b, estimate.g))) > 0
    assert_params_equal(b, params, reference)
    np.testing.assert_array_equal(host(b, loss(params, xi)), value)


OPTIMIZERS = {
    "sgd": lambda: zo_sgd(constant(0.0)),
    "momentum": lambda: zo_sgd(constant(0.0), momentum=0.9),
    "adam": lambda: zo_adam(constant(0.0)),
}
SAMPLERS = {
    "merge-at-refresh": lambda: LowRankSubspace(rank=RANK, refresh_every=T),
    "merge-every-step": lambda: LowRankSubspace(rank=RANK, refresh_every=T, merge_every="step"),
    "full": FullGaussian,
}


@pytest.mark.parametrize(
    "sampler_name, optimizer_name",
    [(s, o) for s in SAMPLERS for o in OPTIMIZERS if s != "full" or o == "sgd"],
)
def test_zero_learning_rate_steps_leave_the_parameters_unchanged(
    backend, sampler_name, optimizer_name
):
    b, params, loss = problem(backend)
    reference = host_params(b, params)
    engine = SDZE(
        CRNSPerturber(num_queries=Q), SAMPLERS[sampler_name](), OPTIMIZERS[optimizer_name]()
    )
    state = engine.init(key(13), params)
    for _ in range(2 * T + 1):  # crosses the refreshes at T and 2T
        params, state, info = engine.step(loss, params, state)
        assert np.max(np.abs(host(b, info.g))) > 0  # the estimates are not zero
        assert_params_equal(b, params, reference)
    state, params = engine.merge(params, state)
    assert_params_equal(b, params, reference)
