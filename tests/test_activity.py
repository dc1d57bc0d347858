"""Unit tests of the activity-perturbation engine's pieces: factored gradients and optimizers."""

import math

import numpy as np
import pytest

from helpers import host
from sdze_core import activity
from sdze_core.activity import (
    ActivityPerturbation,
    LayerGradient,
    NonFiniteUpdateError,
    activity_adafactor,
    activity_adam,
    activity_sgd,
)
from sdze_core.keys import key
from sdze_core.optimizers import state_nbytes


def random_gradient(b, m, n, rank=3, index=None, seed=0):
    rng = np.random.default_rng(seed)
    left = [b.asarray(rng.standard_normal((rank, m)))]
    right = [b.asarray(rng.standard_normal((rank, n)))]
    bias = b.asarray(rng.standard_normal(m))
    columns = None
    if index is not None:
        columns = b.asarray(rng.standard_normal((m, len(index))))
        index = b.asarray(index, dtype=b.index_dtype)
    return LayerGradient(left, right, bias, index, columns)


def dense_reference(b, g):
    G = host(b, g.left[0]).T @ host(b, g.right[0])
    if g.index is not None:
        for v, j in enumerate(np.asarray(b.to_host(g.index))):
            G[:, j] += host(b, g.columns)[:, v]
    return G


def test_blocks_assemble_the_dense_gradient(backend):
    b = backend.with_config(dtype="float64")
    g = random_gradient(b, 4, 11, index=[2, 7, 10])
    reference = dense_reference(b, g)
    np.testing.assert_allclose(host(b, g.dense()), reference, rtol=1e-12)
    np.testing.assert_allclose(host(b, g.block(3, 9)), reference[:, 3:9], rtol=1e-12)


def params_like(b, shapes, seed=1):
    rng = np.random.default_rng(seed)
    return [{"W": b.asarray(rng.standard_normal(s)), "b": b.asarray(rng.standard_normal(s[0]))}
            for s in shapes]


def run_steps(opt, b, params, grads_per_step):
    state = opt.init(params)
    for t, grads in enumerate(grads_per_step):
        plan, state = opt.plan(params, grads, state, t)
        params, state = opt.commit(params, grads, plan, state)
    return params, state


@pytest.mark.parametrize("momentum_max_size", [0, 1 << 20])
@pytest.mark.parametrize("chunk_elements", [None, 12])
def test_adafactor_matches_a_reference(backend, momentum_max_size, chunk_elements, monkeypatch):
    """Streamed (lagged statistics, no momentum) and dense (momentum) paths against NumPy;
    with ``chunk_elements`` the first layer is streamed in chunks of 3 columns (the last
    one short), with gathered columns (one repeated) in some chunks and not in others."""
    if chunk_elements is not None:
        monkeypatch.setattr(activity, "_CHUNK_ELEMENTS", chunk_elements)
    b = backend.with_config(dtype="float64")
    shapes = [(4, 11), (3, 4)]
    lr, b1, b2 = 0.1, 0.9, 0.99
    steps = [[random_gradient(b, m, n, seed=10 * t + i, index=[2, 7, 7] if i == 0 else None)
              for i, (m, n) in enumerate(shapes)] for t in range(4)]
    opt = activity_adafactor(lr, b1=b1, b2=b2, momentum_max_size=momentum_max_size)
    params, _ = run_steps(opt, b, params_like(b, shapes), steps)

    ref = [{k: host(b, v) for k, v in p.items()} for p in params_like(b, shapes)]
    R = [np.zeros(m) for m, _ in shapes]
    C = [np.zeros(n) for _, n in shapes]
    mu = [np.zeros(s) for s in shapes]
    mb = [np.zeros(m) for m, _ in shapes]
    nb = [np.zeros(m) for m, _ in shapes]
    for t, grads in enumerate(steps, start=1):
        for layer, g in enumerate(grads):
            G, gb = dense_reference(b, g), host(b, g.bias)
            if momentum_max_size:
                R[layer] = b2 * R[layer] + (1 - b2) * np.mean(G**2, axis=1)
                C[layer] = b2 * C[layer] + (1 - b2) * np.mean(G**2, axis=0)
                mu[layer] = b1 * mu[layer] + (1 - b1) * G
                v = np.outer(R[layer], C[layer]) / R[layer].mean() / (1 - b2**t)
                step = -lr / (1 - b1**t) * mu[layer] / (np.sqrt(v) + 1e-8)
            else:
                if t == 1:
                    R[layer] = (1 - b2) * np.mean(G**2, axis=1)
                    C[layer] = (1 - b2) * np.mean(G**2, axis=0)
                    corr = 1 - b2
                else:
                    corr = 1 - b2 ** (t - 1)
                v = np.outer(R[layer], C[layer]) / R[layer].mean() / corr
                step = -lr * G / np.sqrt(v)
                if t > 1:
                    R[layer] = b2 * R[layer] + (1 - b2) * np.mean(G**2, axis=1)
                    C[layer] = b2 * C[layer] + (1 - b2) * np.mean(G**2, axis=0)
            mb[layer] = b1 * mb[layer] + (1 - b1) * gb
            nb[layer] = b2 * nb[layer] + (1 - b2) * gb**2
            ref[layer]["W"] = ref[layer]["W"] + step
            ref[layer]["b"] = ref[layer]["b"] - lr / (1 - b1**t) * mb[layer] / (
                np.sqrt(nb[layer] / (1 - b2**t)) + 1e-8
            )
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_allclose(host(b, p["W"]), r["W"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(host(b, p["b"]), r["b"], rtol=1e-10, atol=1e-12)


def test_the_streamed_update_holds_two_chunks_at_most(backend):
    """The first layer's streamed update (Adafactor's both passes, SGD's) forms each
    column chunk of Ĝ and its square in two buffers allocated once: its peak above
    what it started with is two (m × chunk) arrays, never the four and more that
    allocating every product and scaling per chunk held (NumPy's allocations are
    traced by tracemalloc; at d = 10⁶ PyTorch's RSS was 1.9 × parameters + batch)."""
    import tracemalloc

    if backend.name != "numpy":
        pytest.skip("tracemalloc sees NumPy's allocations only")
    b = backend.with_config(dtype="float32")
    m, n = 64, 1 << 15  # chunks of 16384 columns, 4 MiB
    chunk_bytes = 4 * activity._CHUNK_ELEMENTS
    params = params_like(b, [(m, n)])
    params = [{k: b.asarray(v, dtype=b.xp.float32) for k, v in p.items()} for p in params]
    grads = [[random_gradient(b, m, n, rank=10, index=[5, 20000], seed=t)] for t in range(3)]
    grads = [[LayerGradient([b.asarray(L, dtype=b.xp.float32) for L in g.left],
                            [b.asarray(R, dtype=b.xp.float32) for R in g.right],
                            b.asarray(g.bias, dtype=b.xp.float32), g.index,
                            b.asarray(g.columns, dtype=b.xp.float32))] for (g,) in grads]
    for opt in (activity_adafactor(1e-3, momentum_max_size=0), activity_sgd(1e-3)):
        state = opt.init(params)
        for t, g in enumerate(grads):  # step 0: Adafactor's two passes; then one
            tracemalloc.start()
            start = tracemalloc.get_traced_memory()[0]
            plan, state = opt.plan(params, g, state, t)
            params, state = opt.commit(params, g, plan, state)
            peak = tracemalloc.get_traced_memory()[1] - start
            tracemalloc.stop()
            assert peak < 2.5 * chunk_bytes, (t, peak / chunk_bytes)


def test_adam_and_sgd_match_a_reference(backend):
    b = backend.with_config(dtype="float64")
    shapes = [(4, 9)]
    grads = [[random_gradient(b, 4, 9, seed=t)] for t in range(3)]
    params, _ = run_steps(activity_sgd(0.5), b, params_like(b, shapes), grads)
    expected = host(b, params_like(b, shapes)[0]["W"]) - 0.5 * sum(
        dense_reference(b, g[0]) for g in grads
    )
    np.testing.assert_allclose(host(b, params[0]["W"]), expected, rtol=1e-12)
    params, _ = run_steps(activity_adam(0.1, b1=0.9, b2=0.99), b, params_like(b, shapes), grads)
    m = v = 0.0
    W = host(b, params_like(b, shapes)[0]["W"])
    for t, g in enumerate(grads, start=1):
        G = dense_reference(b, g[0])
        m, v = 0.9 * m + 0.1 * G, 0.99 * v + 0.01 * G**2
        W = W - 0.1 / (1 - 0.9**t) * m / (np.sqrt(v / (1 - 0.99**t)) + 1e-8)
    np.testing.assert_allclose(host(b, params[0]["W"]), W, rtol=1e-10)


def test_factored_state_is_m_plus_n_for_a_large_matrix(backend):
    """Adafactor keeps m + n numbers for the first layer (plus biases and small layers'
    momentum); Adam keeps 2 P."""
    b = backend.with_config(dtype="float32")
    m, n = 8, 200_000
    params = [
        {"W": b.zeros((m, n)), "b": b.zeros((m,))},
        {"W": b.zeros((1, m)), "b": b.zeros((1,))},
    ]
    factored = state_nbytes(activity_adafactor(1e-3).init(params))
    floats = (m + n + 2 * m) + (1 + m + 2 * 1 + 1 * m)  # R, C, bias moments; small: + momentum
    assert factored == 4 * floats
    assert state_nbytes(activity_adam(1e-3).init(params)) == 4 * 2 * (m * n + m + m + 1)


def test_a_non_finite_gradient_is_refused_before_anything_changes(backend):
    b = backend.with_config(dtype="float64")
    params = params_like(b, [(3, 5)])
    before = host(b, params[0]["W"])
    g = random_gradient(b, 3, 5)
    g.bias = g.bias * math.inf
    for opt in (activity_sgd(0.1), activity_adam(0.1), activity_adafactor(0.1)):
        with pytest.raises(NonFiniteUpdateError):
            opt.plan(params, [g], opt.init(params), 0)
    np.testing.assert_array_equal(host(b, params[0]["W"]), before)


@pytest.mark.parametrize("momentum_max_size", [0, 1 << 20])
def test_a_layer_left_out_of_training_stays_as_it_is(backend, momentum_max_size):
    """``ActivityPerturbation(layers=...)`` hands the others a zero gradient: their
    statistics stay 0, and the step must be 0, not 0/0 (it was NaN)."""
    from sdze_core.activity import _zero_gradient

    b = backend.with_config(dtype="float64")
    params = params_like(b, [(4, 9), (3, 4)])
    before = [{k: host(b, v) for k, v in p.items()} for p in params]
    opt = activity_adafactor(0.1, momentum_max_size=momentum_max_size)
    steps = [[_zero_gradient(params[0]), random_gradient(b, 3, 4, seed=t)] for t in range(3)]
    params, _ = run_steps(opt, b, params, steps)
    for k in ("W", "b"):
        np.testing.assert_array_equal(host(b, params[0][k]), before[0][k])
        moved = host(b, params[1][k]) - before[1][k]
        assert np.all(np.isfinite(moved)) and np.all(moved != 0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_queries"):
        ActivityPerturbation(num_queries=0)
    with pytest.raises(ValueError, match="eps"):
        ActivityPerturbation(eps=-1.0)
    with pytest.raises(ValueError, match="estimator"):
        ActivityPerturbation(estimator="backward")
    with pytest.raises(ValueError, match="crns"):
        ActivityPerturbation(estimator="forward", crns=False)


def test_solver_records_the_activity_settings(tmp_path):
    import sdze

    result = sdze.solve("poisson-two-body", 5, steps=3, out=None, quiet=True, plots=False,
                        width=8, depth=2, batch_size=4, num_directions=2, test_points=10)
    config = result.run.config
    assert (config.perturbation, config.optimizer, config.num_queries) == ("activity",
                                                                           "adafactor", 1)
    assert isinstance(result.run.method, ActivityPerturbation)
    # settings the run does not use are recorded as None, not as defaults it ignored
    assert (config.rank, config.refresh_every, config.layerwise, config.residual_aligned,
            config.input_memory) == (None,) * 5
    subspace = sdze.solver.SolverConfig("poisson-two-body", 5, perturbation="subspace").resolved()
    assert (subspace.rank, subspace.refresh_every, subspace.residual_aligned) == (8, 100, True)
    first = sdze.solver.SolverConfig("poisson-two-body", 5, method="first-order").resolved()
    assert (first.perturbation, first.num_queries, first.rank) == (None, None, None)
    with pytest.raises(ValueError, match="rank must be"):
        sdze.solver.SolverConfig("poisson-two-body", 5, rank=0).resolved()
    _ = key


def test_adafactor_steps_with_gradients_of_order_1e12_in_float32(backend):
    """Losses ~1e24 at d = 1e6 give gradients ~1e12: R_i C_j (~1e48) must not be formed."""
    b = backend.with_config(dtype="float32")
    params = params_like(b, [(4, 9)])
    params = [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in params]
    g = random_gradient(b, 4, 9)
    g = LayerGradient([b.asarray(x * 1e6, dtype=b.dtype) for x in g.left],
                      [b.asarray(x * 1e6, dtype=b.dtype) for x in g.right],
                      b.asarray(g.bias * 1e12, dtype=b.dtype))
    before = host(b, params[0]["W"])
    opt = activity_adafactor(1e-3)
    plan, state = opt.plan(params, [g], opt.init(params), 0)
    params, state = opt.commit(params, [g], plan, state)
    step = host(b, params[0]["W"]) - before
    assert np.all(np.isfinite(step))
    # a normalised first step: about the learning rate per entry, not 0 (v̂ = inf)
    assert 1e-4 < np.median(np.abs(step)) < 1e-2
