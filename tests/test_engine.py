"""The SDZE training step (docs/method.md#crns, #subspace-perturbations): keys, CRNS
estimates, NaN safety, merging, and a short training run, on every backend in float64.

The problem: u = (1 − ‖x‖²) N(x) on the ball in d = 6, the residual
Δu − F(u, x) with F = u²/2 + x₁ − 2d, Δu by a sparse Laplacian on 4 coordinates.
"""

import dataclasses
import gc

import numpy as np
import pytest

from helpers import assert_close, copy_params, dense_params, host, host_params
from sdze_core.engine import SDZE, SDZEState, StepInfo
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz, with_layer_map
from sdze_core.objectives import ResidualLoss, with_model
from sdze_core.optimizers import zo_adam, zo_sgd
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber, NonFiniteLossError
from sdze_core.samplers import FullGaussian, LowRankSubspace

D = 6
BATCH = 8
RTOL64 = 1e-12


# -- helpers -------------------------------------------------------------------------------


def assert_params_equal(a, b):
    assert len(a) == len(b)
    for p, q in zip(a, b, strict=True):
        for name in ("W", "b"):
            np.testing.assert_array_equal(p[name], q[name])


def problem(backend, batch=BATCH):
    """(float64 backend, model, loss, params, switch): ``switch["nan"] = True`` makes the
    right-hand side NaN."""
    b = backend.with_config(dtype="float64")
    switch = {"nan": False}

    def rhs(u, x):
        f = 0.5 * u * u + x[:, 0] - 2.0 * D
        return f * float("nan") if switch["nan"] else f

    def points(k):
        return 0.8 * (b.uniform(k, (batch, D)) - 0.5)  # inside the unit ball

    model = Ansatz(MLP((D, 16, 16, 1)))
    loss = ResidualLoss(model, SparseLaplacian(num_directions=4), rhs, points)
    return b, model, loss, model.init(key(0), b), switch


def evaluation_points(b):
    return 0.8 * (b.uniform(key(99), (5, D)) - 0.5)


def network(b, model, engine, params, state, x):
    """The current network at x (the pending low-rank update included), on the host."""
    return host(b, engine.evaluation_model(model, params, state).apply(params, x))


def run(engine, loss, params, seed, steps):
    state = engine.init(key(seed), params)
    losses = []
    for _ in range(steps):
        params, state, info = engine.step(loss, params, state)
        losses.append(info.loss)
    return params, state, losses


# -- a step ----------------------------------------------------------------------------------


def test_steps_run(backend):
    b, model, loss, params, _ = problem(backend)
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=4, refresh_every=3), zo_adam(1e-2)
    )
    state = engine.init(key(1), params)
    assert isinstance(state, SDZEState)
    assert state.step == 0 and state.key == fold_in(key(1), "steps")
    x = evaluation_points(b)
    start = network(b, model, engine, params, state, x)
    for t in range(5):
        params, state, info = engine.step(loss, params, state)
        assert isinstance(info, StepInfo)
        assert isinstance(info.loss, float) and np.isfinite(info.loss)
        g = host(b, info.g)
        assert g.shape == (2,) and np.all(np.isfinite(g))
        assert state.step == t + 1
        assert state.optimizer.count == (t + 1 if t < 3 else t - 2)  # reset at the refresh
        assert state.sampler.epoch == t // 3
    moved = network(b, model, engine, params, state, x)
    assert np.all(np.isfinite(moved))
    assert np.max(np.abs(moved - start)) > 1e-6


ENGINES = {
    "lowrank-adam": lambda: SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=3, refresh_every=3), zo_adam(1e-2)
    ),
    "lowrank-regenerated-step": lambda: SDZE(
        CRNSPerturber(num_queries=2, estimator="forward"),
        LowRankSubspace(rank=3, refresh_every=3, store_bases=False, merge_every="step"),
        zo_sgd(1e-4, momentum=0.5),
    ),
    "full-sgd": lambda: SDZE(CRNSPerturber(num_queries=2), FullGaussian(), zo_sgd(1e-6)),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_runs_are_deterministic(backend, name):
    b, model, loss, params, _ = problem(backend)
    engine = ENGINES[name]()

    def final(seed):
        p, state, losses = run(engine, loss, copy_params(b, params), seed, 5)
        _, p = engine.merge(p, state)
        return host_params(b, p), losses

    first, first_losses = final(1)
    again, again_losses = final(1)
    other, other_losses = final(2)
    assert_params_equal(first, again)
    assert first_losses == again_losses
    assert all(np.isfinite(first_losses))
    assert max(np.max(np.abs(p["W"] - q["W"])) for p, q in zip(first, other, strict=True)) > 1e-8
    assert first_losses != other_losses


@dataclasses.dataclass(frozen=True)
class RecordingLoss(ResidualLoss):
    """A loss that records the keys its spatial samples are drawn from (in a list
    shared with the copies the perturber makes with a perturbed model)."""

    keys: list = dataclasses.field(default_factory=list)

    def sample(self, k):
        self.keys.append(k)
        return super().sample(k)


def test_spatial_sample_depends_only_on_the_spatial_key(backend):
    b, model, loss, params, _ = problem(backend)
    engines = [
        SDZE(CRNSPerturber(num_queries=1), LowRankSubspace(rank=2), zo_sgd(1e-4)),
        SDZE(CRNSPerturber(num_queries=5), FullGaussian(), zo_sgd(1e-6)),
        SDZE(
            CRNSPerturber(num_queries=3, estimator="forward"),
            LowRankSubspace(rank=6, store_bases=False),
            zo_adam(1e-3),
        ),
    ]
    run_key = key(5)
    expected = [fold_in(fold_in(fold_in(run_key, "steps"), t), "spatial") for t in range(3)]
    samples = []
    for engine in engines:
        recording = RecordingLoss(**{f.name: getattr(loss, f.name)
                                     for f in dataclasses.fields(loss)})
        p = copy_params(b, params)
        state = engine.init(run_key, p)
        for t in range(3):
            spatial, param = engine.step_keys(state)
            assert spatial == expected[t]
            assert param == fold_in(fold_in(state.key, t), "param") != spatial
            # The reported loss is ℓ(θ; ξ) at ξ = loss.sample(spatial key), up to O(ε²).
            xi = loss.sample(spatial)
            current_loss = with_model(loss, engine.evaluation_model(model, p, state))
            current = float(host(b, current_loss(p, xi)))
            recording.keys.clear()
            p, state, info = engine.step(recording, p, state)
            assert recording.keys == [expected[t]]
            assert info.loss == pytest.approx(current, rel=1e-6)
        samples.append(host(b, loss.sample(expected[2]).x))
    for x in samples[1:]:
        np.testing.assert_array_equal(x, samples[0])


# -- the estimate ----------------------------------------------------------------------------


def estimate_setup(b, kind, params):
    """(sampler, state, params, directions (q = 3)); ``lowrank-pending`` has A != 0."""
    if kind == "full":
        sampler = FullGaussian()
        state = sampler.init(key(1), params)
        return sampler, state, params, sampler.draw(state, params, key(2), 3)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    if kind == "lowrank-pending":
        earlier = sampler.draw(state, params, key(7), 2)
        g = 0.01 * b.normal(key(8), (2,))
        state, params = sampler.apply(state, params, earlier, sampler.project(earlier, g))
    return sampler, state, params, sampler.draw(state, params, key(2), 3)


@pytest.mark.parametrize("kind", ["lowrank", "lowrank-pending", "full"])
def test_forward_and_central_estimates_equal_the_dense_derivative(backend, kind):
    b, model, loss, params, _ = problem(backend)
    sampler, state, params, directions = estimate_setup(b, kind, params)
    q, spatial = 3, key(11)
    forward = CRNSPerturber(num_queries=q, estimator="forward").estimate(
        loss, params, sampler, state, directions, spatial
    )
    central = CRNSPerturber(num_queries=q, eps=1e-6).estimate(
        loss, params, sampler, state, directions, spatial
    )
    gf, gc = host(b, forward.g), host(b, central.g)
    assert gf.shape == gc.shape == (q,)
    assert not np.iscomplexobj(gf)
    scale = float(np.max(np.abs(gf)))
    assert scale > 1e-3
    np.testing.assert_allclose(gc, gf, rtol=0, atol=1e-6 * scale)
    assert host(b, forward.losses).shape == (q,)
    assert host(b, central.losses).shape == (2 * q,)

    # The dense directional derivative: explicit θ ± ε z_i, the same ξ.
    xi = loss.sample(spatial)
    current_model = model
    if sampler.evaluation_layer_map(state, params) is not None:
        current_model = with_layer_map(model, sampler.evaluation_layer_map(state, params))
    plain = float(host(b, with_model(loss, current_model)(params, xi)))
    eps = 1e-5
    for i in range(q):
        plus = float(host(b, loss(dense_params(b, sampler, state, directions, params, i, eps), xi)))
        minus = float(
            host(b, loss(dense_params(b, sampler, state, directions, params, i, -eps), xi))
        )
        assert abs((plus - minus) / (2 * eps) - gf[i]) <= 1e-6 * scale
    # Each central evaluation is the loss at the explicitly perturbed parameters.
    losses = host(b, central.losses)
    for i in range(q):
        for side, s in ((0, 1e-6), (q, -1e-6)):
            dense = dense_params(b, sampler, state, directions, params, i, s)
            assert losses[side + i] == pytest.approx(float(host(b, loss(dense, xi))), rel=1e-12)
    assert float(host(b, forward.loss)) == pytest.approx(plain, rel=1e-12)
    assert float(host(b, central.loss)) == pytest.approx(plain, rel=1e-9)


def test_naive_estimator_has_the_one_over_eps_term(backend):
    """crns=False: g = (ℓ(θ+εz; ξ⁺) − ℓ(θ−εz; ξ⁻)) / 2ε
    = (ℓ(θ; ξ⁺) − ℓ(θ; ξ⁻)) / 2ε + (a⁺ + a⁻) / 2 + O(ε), with a± = zᵀ∇ℓ(θ; ξ±):
    (g_naive − g_crns) ε tends to the constant (ℓ(θ; ξ⁺) − ℓ(θ; ξ⁻)) / 2, while
    g_crns stays O(1). Two points per batch make ℓ(θ; ξ) vary a lot with ξ."""
    b, model, loss, params, _ = problem(backend, batch=2)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 2)
    spatial = key(13)
    plus = float(host(b, loss(params, loss.sample(fold_in(spatial, "plus")))))
    minus = float(host(b, loss(params, loss.sample(fold_in(spatial, "minus")))))
    shared = float(host(b, loss(params, loss.sample(spatial))))
    half = (plus - minus) / 2
    assert abs(half) > 0.02 * shared  # ξ⁺ and ξ⁻ are different draws
    forward = CRNSPerturber(num_queries=2, estimator="forward")
    a_plus, a_minus = (
        host(b, forward.estimate(loss, params, sampler, state, directions, fold_in(spatial, s)).g)
        for s in ("plus", "minus")
    )
    slope = max(np.max(np.abs(a_plus)), np.max(np.abs(a_minus)))

    scaled, crns_g = {}, {}
    for eps in (1e-2, 1e-3, 1e-4):
        crns, naive = (
            CRNSPerturber(eps=eps, num_queries=2, crns=c).estimate(
                loss, params, sampler, state, directions, spatial
            )
            for c in (True, False)
        )
        g_crns, g_naive = host(b, crns.g), host(b, naive.g)
        predicted = half / eps + (a_plus + a_minus) / 2
        np.testing.assert_allclose(g_naive, predicted, rtol=0, atol=20 * eps * slope)
        scaled[eps] = (g_naive - g_crns) * eps
        np.testing.assert_allclose(scaled[eps], [half, half], rtol=50 * eps)
        crns_g[eps] = g_crns
        # The mean losses: the shared ξ for CRNS, half ξ⁺ and half ξ⁻ without.
        assert float(host(b, crns.loss)) == pytest.approx(shared, rel=100 * eps**2)
        assert abs(float(host(b, naive.loss)) - (plus + minus) / 2) <= 2 * eps * slope
    # (g_naive − g_crns) ε is roughly constant in ε (up to the O(ε) drift): the
    # difference grows as 1/ε (a constant difference would change it 10× per decade).
    np.testing.assert_allclose(scaled[1e-2], scaled[1e-3], rtol=0.5)
    np.testing.assert_allclose(scaled[1e-3], scaled[1e-4], rtol=0.05)
    scale = np.max(np.abs(crns_g[1e-4]))
    np.testing.assert_allclose(crns_g[1e-2], crns_g[1e-4], rtol=0, atol=1e-2 * scale)


# -- non-finite losses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "estimator, crns", [("central", True), ("central", False), ("forward", True)]
)
def test_nonfinite_loss_raises_and_changes_nothing(backend, estimator, crns):
    b, model, loss, params, switch = problem(backend)
    engine = SDZE(
        CRNSPerturber(num_queries=2, estimator=estimator, crns=crns),
        LowRankSubspace(rank=3, refresh_every=10),
        zo_adam(1e-2),
    )
    state = engine.init(key(1), params)
    for _ in range(2):
        params, state, _ = engine.step(loss, params, state)
    saved = host_params(b, params)
    pending = [host(b, A) for A in state.sampler.pending]
    mu = [host(b, m["W"]) for m in state.optimizer.mu]
    switch["nan"] = True
    with pytest.raises(NonFiniteLossError, match=r"^step 2:") as raised:
        engine.step(loss, params, state)
    assert raised.value.step == 2
    assert len(raised.value.losses) == (2 if estimator == "forward" else 4)
    assert not np.all(np.isfinite(np.asarray(raised.value.losses)))
    # Nothing was applied: parameters and state are as they were.
    assert_params_equal(host_params(b, params), saved)
    assert state.step == 2 and state.optimizer.count == 2
    for A, saved_A in zip(state.sampler.pending, pending, strict=True):
        np.testing.assert_array_equal(host(b, A), saved_A)
    for m, saved_m in zip(state.optimizer.mu, mu, strict=True):
        np.testing.assert_array_equal(host(b, m["W"]), saved_m)
    # Going on from the same (params, state) is the run that never failed.
    switch["nan"] = False
    params, state, _ = engine.step(loss, params, state)
    _, _, _, fresh, _ = problem(backend)
    reference, reference_state, _ = run(engine, loss, fresh, 1, 3)
    assert state.step == reference_state.step == 3
    assert_params_equal(host_params(b, params), host_params(b, reference))


def test_nonfinite_loss_at_a_refresh_step_leaves_the_network_unchanged(backend):
    """At a basis refresh the pending update is folded into W before the losses are
    evaluated; when the step then fails, the error's (params, state) describe the
    network before the step (NonFiniteLossError's contract, engine.step docstring)."""
    b, model, loss, params, switch = problem(backend)
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=3, refresh_every=3), zo_adam(1e-2)
    )
    state = engine.init(key(1), params)
    for _ in range(3):
        params, state, _ = engine.step(loss, params, state)
    assert max(np.max(np.abs(host(b, A))) for A in state.sampler.pending) > 1e-6
    x = evaluation_points(b)
    before = network(b, model, engine, params, state, x)
    switch["nan"] = True
    with pytest.raises(NonFiniteLossError, match=r"^step 3:") as raised:
        engine.step(loss, params, state)
    params, state = raised.value.params, raised.value.state
    assert state.step == 3
    assert max(np.max(np.abs(host(b, A))) for A in state.sampler.pending) == 0.0  # merged
    assert_close(network(b, model, engine, params, state, x), before, RTOL64)
    # Going on from the error's (params, state) is the run that never failed.
    switch["nan"] = False
    params, state, _ = engine.step(loss, params, state)
    _, _, _, fresh, _ = problem(backend)
    reference, reference_state, _ = run(engine, loss, fresh, 1, 4)
    assert_close(
        network(b, model, engine, params, state, x),
        network(b, model, engine, reference, reference_state, x),
        RTOL64,
    )


# -- configuration errors --------------------------------------------------------------------


def test_invalid_configurations():
    with pytest.raises(ValueError, match="FullGaussian has no small coordinates"):
        SDZE(sampler=FullGaussian(), optimizer=zo_adam())
    with pytest.raises(ValueError, match="FullGaussian has no small coordinates"):
        SDZE(sampler=FullGaussian(), optimizer=zo_sgd(momentum=0.9))
    SDZE(sampler=FullGaussian(), optimizer=zo_sgd())  # plain ZO-SGD is fine
    SDZE(sampler=LowRankSubspace(), optimizer=zo_adam())
    with pytest.raises(ValueError, match="crns=False does not apply"):
        CRNSPerturber(estimator="forward", crns=False)
    with pytest.raises(ValueError, match="unknown estimator 'backward'"):
        CRNSPerturber(estimator="backward")
    for eps in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            CRNSPerturber(eps=eps)
    for q in (0, True, 1.5):
        with pytest.raises(ValueError, match="num_queries must be an int >= 1"):
            CRNSPerturber(num_queries=q)


# -- merging ---------------------------------------------------------------------------------


def test_merge_equals_the_evaluation_model(backend):
    b, model, loss, params, _ = problem(backend)
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=3, refresh_every=10), zo_adam(1e-2)
    )
    params, state, _ = run(engine, loss, params, 1, 4)
    x = evaluation_points(b)
    unmerged = copy_params(b, params)
    current = host(b, engine.evaluation_model(model, unmerged, state).apply(unmerged, x))
    assert np.max(np.abs(current - host(b, model.apply(unmerged, x)))) > 1e-6  # A matters
    merged_state, merged = engine.merge(params, state)
    assert merged_state.step == state.step
    for A in merged_state.sampler.pending:
        np.testing.assert_array_equal(host(b, A), np.zeros(A.shape))
    assert_close(host(b, model.apply(merged, x)), current, RTOL64)
    after = host(b, engine.evaluation_model(model, merged, merged_state).apply(merged, x))
    assert_close(after, current, RTOL64)


def test_merge_is_a_no_op_for_the_full_gaussian(backend):
    b, model, loss, params, _ = problem(backend)
    engine = SDZE(CRNSPerturber(num_queries=2), FullGaussian(), zo_sgd(1e-6))
    params, state, _ = run(engine, loss, params, 1, 2)
    assert engine.evaluation_model(model, params, state) is model
    before = host_params(b, params)
    merged_state, merged = engine.merge(params, state)
    assert merged_state == state
    assert_params_equal(host_params(b, merged), before)


# -- training --------------------------------------------------------------------------------


def test_training_reduces_the_loss(backend):
    b, model, loss, params, _ = problem(backend, batch=16)
    engine = SDZE(
        CRNSPerturber(num_queries=2), LowRankSubspace(rank=4, refresh_every=20), zo_adam(1e-2)
    )
    params, state, losses = run(engine, loss, params, 3, 200)
    assert state.step == 200
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.25 * first, (first, last)
    state, params = engine.merge(params, state)
    xi = loss.sample(key(1234))  # a fresh sample: the merged network fits it too
    fresh = float(host(b, loss(params, xi)))
    assert fresh < 0.25 * first


@pytest.mark.parametrize("estimator", ["central", "forward"])
def test_steps_leave_no_reference_cycles(backend, estimator):
    """Arrays caught in reference cycles live until the garbage collector runs, so
    memory would grow from step to step (a recursive closure in the jets did this)."""
    if backend.name not in ("numpy", "array_api_strict"):
        pytest.skip("only NumPy-based arrays are free of the library's own caches")
    b, model, loss, params, _ = problem(backend)
    engine = SDZE(CRNSPerturber(num_queries=2, estimator=estimator), LowRankSubspace(rank=3))
    state = engine.init(key(1), params)
    params, state, _ = engine.step(loss, params, state)
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            params, state, _ = engine.step(loss, params, state)
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_residual_aligned_engine_observes_the_residuals_at_theta(backend):
    """The perturber hands the sampler the mean of the 2q evaluations' residuals:
    the residuals at θ up to O(ε²); the losses are the same as without observing."""
    from sdze_core.engine import SDZE
    from sdze_core.models import MLP, Ansatz
    from sdze_core.objectives import ResidualLoss
    from sdze_core.oracles import SparseLaplacian
    from sdze_core.perturbers import CRNSPerturber
    from sdze_core.samplers import LowRankSubspace

    b = backend.with_config(dtype="float64")
    d = 5
    model = Ansatz(MLP((d, 8, 8, 1)), "ball")
    x = 0.3 * b.normal(key(5), (6, d))
    loss = ResidualLoss(model, SparseLaplacian(3), lambda u, y: u * u, lambda k: x)
    params = model.init(key(1), b)
    perturber = CRNSPerturber(eps=1e-4, num_queries=3)
    aligned = LowRankSubspace(rank=2, residual_aligned=True)
    plain = LowRankSubspace(rank=2)
    state = aligned.init(key(2), params)
    directions = aligned.draw(state, params, key(3), 3)
    got = perturber.estimate(loss, params, aligned, state, directions, key(4))
    ref = perturber.estimate(loss, params, plain, state, directions, key(4))
    assert ref.observation is None
    np.testing.assert_array_equal(np.asarray(b.to_host(got.losses)),
                                  np.asarray(b.to_host(ref.losses)))
    xs, r = got.observation
    (r_theta,) = loss.residuals(params, loss.sample(key(4)))
    scale = float(np.max(np.abs(np.asarray(b.to_host(r_theta)))))
    np.testing.assert_allclose(np.asarray(b.to_host(r)), np.asarray(b.to_host(r_theta)),
                               rtol=0, atol=1e-6 * scale)
    # The engine stores h = (1/B) Σ_b r_b x_b after its first step.
    engine = SDZE(perturber, aligned)
    s0 = engine.init(key(2), params)
    _, s1, _ = engine.step(loss, [dict(p) for p in params], s0)
    assert s1.sampler.inputs is not None and tuple(s1.sampler.inputs.shape) == (d,)
