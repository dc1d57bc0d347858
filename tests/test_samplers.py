"""Perturbation samplers (docs/method.md#subspace-perturbations): bases, draws, the
matrix-free layer map, updates.

Every test runs on every installed backend (the ``backend`` fixture). The
references are dense computations on NumPy copies: the perturbed parameters
W + s Z_k formed explicitly and evaluated by the plain model.
"""

from math import sqrt

import array_api_compat
import numpy as np
import pytest

import sdze_core.samplers as samplers_module
from helpers import assert_close, copy_params, dense_params, f64, host, host_params
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz, with_layer_map
from sdze_core.oracles import HutchinsonLaplacian, SparseLaplacian
from sdze_core.samplers import FullGaussian, LowRankState, LowRankSubspace, add_low_rank

SIZES = (6, 10, 5, 1)  # weights (10, 6), (5, 10), (1, 5)
B = 4  # points
Q_INDEX = [0, 2, 1, 1, 0]  # the direction of each query (q = 3 directions)
Q_SCALES = [0.3, -0.2, 0.1, -0.15, -0.3]
RTOL64 = 1e-12
RTOL32 = 1e-5


# -- helpers -------------------------------------------------------------------------------


def to_backend(b, params):
    return [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in params]


def points(b, d=SIZES[0], n=B):
    return 0.4 * b.normal(key(123), (n, d))


def make_model(kind):
    if kind == "mlp":
        return MLP(SIZES, "sin")
    return Ansatz(MLP(SIZES, "tanh"), "ball")


def random_updates(b, sampler, directions, seed):
    """Coordinates of a step: the projection of random g (sampler.project)."""
    q = directions.S[0].shape[0] if hasattr(directions, "S") else directions.W[0].shape[0]
    g = 0.3 * b.normal(key(seed), (q,))
    return sampler.project(directions, g)


# -- the low-rank subspace: bases and draws -------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("float32", RTOL32), ("float64", RTOL64)])
@pytest.mark.parametrize("rank", [3, 8])
@pytest.mark.parametrize("store_bases", [True, False])
def test_lowrank_bases_are_orthonormal(backend, dtype, tol, rank, store_bases):
    b = backend.with_config(dtype=dtype)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=rank, store_bases=store_bases)
    state = sampler.init(key(1), params)
    assert (state.bases is None) == (not store_bases)
    bases = sampler.bases(state, params)
    assert len(bases) == len(params)
    for p, (U, V) in zip(params, bases, strict=True):
        m, n = p["W"].shape
        r = sampler.layer_rank((m, n))
        assert r == min(rank, m, n)
        assert U.shape == (m, r) and V.shape == (n, r)
        assert U.dtype == p["W"].dtype and V.dtype == p["W"].dtype
        U, V = host(b, U), host(b, V)
        assert_close(U.T @ U, np.eye(r), tol)
        assert_close(V.T @ V, np.eye(r), tol)
    expected_k = sum(min(rank, *p["W"].shape) ** 2 + p["b"].shape[0] for p in params)
    assert sampler.subspace_dimension(params) == expected_k


def test_layer_rank_and_epochs():
    sampler = LowRankSubspace(rank=4, refresh_every=3)
    assert sampler.layer_rank((10, 6)) == 4
    assert sampler.layer_rank((3, 100)) == 3
    assert sampler.layer_rank((100, 2)) == 2
    assert sampler.layer_rank((1, 5)) == 1
    assert [sampler.epoch_of(t) for t in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("dtype, tol", [("float32", RTOL32), ("float64", RTOL64)])
def test_lowrank_perturbation_lies_in_subspace(backend, dtype, tol):
    b = backend.with_config(dtype=dtype)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    q = 3
    directions = sampler.draw(state, params, key(2), q)
    for layer, p in enumerate(params):
        m, n = p["W"].shape
        r = sampler.layer_rank((m, n))
        assert directions.S[layer].shape == (q, r, r)
        assert directions.bias[layer].shape == (q, m)
        assert directions.scale[layer] == pytest.approx(sqrt(m * n) / r, rel=1e-15)
        U, V = (host(b, a) for a in directions.bases[layer])
        S = host(b, directions.S[layer])
        for i in range(q):
            Z = host(b, sampler.perturbation(directions, layer, i))
            assert Z.shape == (m, n)
            scale = max(1.0, float(np.max(np.abs(Z))))
            assert np.max(np.abs(Z)) > 1e-3  # not trivially zero
            assert_close((np.eye(m) - U @ U.T) @ Z, np.zeros((m, n)), tol * scale)
            assert_close(Z @ (np.eye(n) - V @ V.T), np.zeros((m, n)), tol * scale)
            # Z = c U S_i Vᵀ with c = sqrt(mn) / r, hence ‖Z‖_F = c ‖S_i‖_F.
            assert_close(Z, sqrt(m * n) / r * U @ S[i] @ V.T, tol)
            np.testing.assert_allclose(
                np.linalg.norm(Z), sqrt(m * n) / r * np.linalg.norm(S[i]), rtol=10 * tol
            )


def test_lowrank_perturbation_norm_matches_full_gaussian(backend):
    """E‖Z‖_F² = c² E‖S‖_F² = m n (a 5σ bound on the mean of 4000 draws)."""
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    q = 4000
    directions = sampler.draw(state, params, key(2), q)
    for layer, p in enumerate(params):
        m, n = p["W"].shape
        r = sampler.layer_rank((m, n))
        S = host(b, directions.S[layer])
        norms = directions.scale[layer] ** 2 * np.sum(S * S, axis=(1, 2))
        # ‖S‖² ~ χ²(r²): relative standard deviation of the mean sqrt(2 / r²) / sqrt(q).
        assert abs(np.mean(norms) / (m * n) - 1) < 5 * sqrt(2 / r**2) / sqrt(q)
        zb = host(b, directions.bias[layer])
        assert abs(np.mean(np.sum(zb * zb, axis=1)) / m - 1) < 5 * sqrt(2 / m) / sqrt(q)


@pytest.mark.parametrize("store_bases", [True, False])
def test_lowrank_draws_are_reproducible(backend, store_bases):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3, store_bases=store_bases)
    state = sampler.init(key(1), params)
    first = sampler.draw(state, params, key(2), 3)
    again = sampler.draw(sampler.init(key(1), params), params, key(2), 3)
    other = sampler.draw(state, params, key(3), 3)
    for layer in range(len(params)):
        for name in ("S", "bias"):
            a = host(b, getattr(first, name)[layer])
            np.testing.assert_array_equal(a, host(b, getattr(again, name)[layer]))
            assert np.max(np.abs(a - host(b, getattr(other, name)[layer]))) > 1e-3
        Z = host(b, sampler.perturbation(first, layer, 1))
        np.testing.assert_array_equal(Z, host(b, sampler.perturbation(again, layer, 1)))
        assert np.max(np.abs(Z - host(b, sampler.perturbation(other, layer, 1)))) > 1e-3
    # A different sampler key gives different bases.
    bases = sampler.bases(state, params)
    other_bases = sampler.bases(sampler.init(key(9), params), params)
    for (U, V), (U2, V2) in zip(bases, other_bases, strict=True):
        if U.shape[1] > 1 or U.shape[0] > 1:
            assert np.max(np.abs(host(b, U) - host(b, U2))) > 1e-3
        assert np.max(np.abs(host(b, V) - host(b, V2))) > 1e-3


@pytest.mark.parametrize("store_bases", [True, False])
def test_lowrank_refresh_every_t_steps(backend, store_bases):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    T = 3
    sampler = LowRankSubspace(rank=3, refresh_every=T, store_bases=store_bases)
    state = sampler.init(key(1), params)
    assert state.epoch == 0
    original = [tuple(host(b, a) for a in UV) for UV in sampler.bases(state, params)]
    current = original
    for step in range(3 * T):
        state, params, transition = sampler.refresh(state, params, step)
        bases = [tuple(host(b, a) for a in UV) for UV in sampler.bases(state, params)]
        assert state.epoch == step // T
        if step % T or step == 0:
            assert transition is None
            for (U, V), (U0, V0) in zip(bases, current, strict=True):
                np.testing.assert_array_equal(U, U0)
                np.testing.assert_array_equal(V, V0)
        else:
            assert transition is not None and len(transition) == len(params)
            for (U, V), (Uo, Vo), (RU, RV) in zip(bases, current, transition, strict=True):
                assert np.max(np.abs(V - Vo)) > 1e-3  # new bases
                assert_close(host(b, RU), U.T @ Uo, RTOL64)
                assert_close(host(b, RV), V.T @ Vo, RTOL64)
                # Still orthonormal.
                assert_close(U.T @ U, np.eye(U.shape[1]), RTOL64)
                assert_close(V.T @ V, np.eye(V.shape[1]), RTOL64)
            current = bases
    assert state.epoch == 2


def test_store_bases_false_regenerates_the_same_bases(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    stored = LowRankSubspace(rank=3, refresh_every=2, store_bases=True)
    regenerated = LowRankSubspace(rank=3, refresh_every=2, store_bases=False)
    s1, s2 = stored.init(key(1), params), regenerated.init(key(1), params)
    assert s1.bases is not None and s2.bases is None
    for step in range(5):
        s1, _, t1 = stored.refresh(s1, params, step)
        s2, _, t2 = regenerated.refresh(s2, params, step)
        assert s2.bases is None
        assert (t1 is None) == (t2 is None)
        for (U1, V1), (U2, V2) in zip(
            stored.bases(s1, params), regenerated.bases(s2, params), strict=True
        ):
            np.testing.assert_array_equal(host(b, U1), host(b, U2))
            np.testing.assert_array_equal(host(b, V1), host(b, V2))
        d1 = stored.draw(s1, params, fold_in(key(5), step), 2)
        d2 = regenerated.draw(s2, params, fold_in(key(5), step), 2)
        for layer in range(len(params)):
            np.testing.assert_array_equal(
                host(b, stored.perturbation(d1, layer, 1)),
                host(b, regenerated.perturbation(d2, layer, 1)),
            )


def test_refresh_folds_the_pending_update_into_w_in_the_old_bases(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3, refresh_every=2)
    state = sampler.init(key(1), params)
    ref = host_params(b, params)
    for step in range(2):
        state, params, _ = sampler.refresh(state, params, step)
        directions = sampler.draw(state, params, fold_in(key(4), step), 2)
        state, params = sampler.apply(
            state, params, directions, random_updates(b, sampler, directions, step)
        )
    # Within the epoch W is untouched: the update is pending.
    for p, r in zip(params, ref, strict=True):
        np.testing.assert_array_equal(host(b, p["W"]), r["W"])
    old = [tuple(host(b, a) for a in UV) for UV in sampler.bases(state, params)]
    pending = [host(b, A) for A in state.pending]
    assert max(np.max(np.abs(A)) for A in pending) > 1e-3
    state, params, transition = sampler.refresh(state, params, 2)
    assert transition is not None
    for p, r, (U, V), A in zip(params, ref, old, pending, strict=True):
        assert_close(host(b, p["W"]), r["W"] + U @ A @ V.T, RTOL64)
    for A in state.pending:
        np.testing.assert_array_equal(host(b, A), np.zeros(A.shape))


# -- the matrix-free layer map against the dense computation --------------------------------


def sampler_setup(b, kind, params):
    """(sampler, state, params, directions) with q = 3; ``lowrank-pending`` has a
    non-zero pending A (and updated biases)."""
    if kind == "full":
        sampler = FullGaussian()
        state = sampler.init(key(1), params)
        return sampler, state, params, sampler.draw(state, params, key(2), 3)
    merge_every = "step" if kind == "lowrank-step" else "refresh"
    sampler = LowRankSubspace(rank=3, merge_every=merge_every)
    state = sampler.init(key(1), params)
    if kind == "lowrank-pending":
        earlier = sampler.draw(state, params, key(7), 2)
        state, params = sampler.apply(
            state, params, earlier, random_updates(b, sampler, earlier, 8)
        )
        assert max(float(np.max(np.abs(host(b, A)))) for A in state.pending) > 1e-3
    return sampler, state, params, sampler.draw(state, params, key(2), 3)


SAMPLERS = ["lowrank", "lowrank-step", "lowrank-pending", "full"]


@pytest.mark.parametrize("model_kind", ["mlp", "ansatz"])
@pytest.mark.parametrize("kind", SAMPLERS)
def test_layer_map_apply_equals_dense(backend, model_kind, kind):
    b = f64(backend)
    model = make_model(model_kind)
    params = model.init(key(0), b)
    sampler, state, params, directions = sampler_setup(b, kind, params)
    x = points(b)
    layers = sampler.layer_map(state, directions, Q_INDEX, Q_SCALES)
    out = host(b, with_layer_map(model, layers).apply(params, x))
    assert out.shape == (len(Q_INDEX), B)
    plain = host(b, model.apply(params, x))
    for k, (i, s) in enumerate(zip(Q_INDEX, Q_SCALES, strict=True)):
        ref = host(b, model.apply(dense_params(b, sampler, state, directions, params, i, s), x))
        assert_close(out[k], ref, RTOL64)
        assert np.max(np.abs(ref - plain)) > 1e-4  # the perturbation matters
    # Without queries the map evaluates the current network (pending update included).
    current = host(b, with_layer_map(model, sampler.layer_map(state, directions)).apply(params, x))
    ref = host(b, model.apply(dense_params(b, sampler, state, directions, params, 0, 0.0), x))
    assert current.shape == (B,)
    assert_close(current, ref, RTOL64)


def assert_jets_close(mapped, refs):
    """mapped: primal (Q, B), coefficients (V, Q, B); refs: one jet per query."""
    primal = np.asarray(mapped[0])
    assert primal.shape == (len(refs), B)
    for k, ref in enumerate(refs):
        assert_close(primal[k], ref[0], RTOL64)
        for c, r in zip(mapped[1:], ref[1:], strict=True):
            assert (c is None) == (r is None)
            if c is not None:
                assert_close(np.asarray(c)[:, k, :], r, RTOL64)


def jet_terms(b, jet):
    return [host(b, jet.primal)] + [None if c is None else host(b, c) for c in jet.coeffs]


@pytest.mark.parametrize("model_kind", ["mlp", "ansatz"])
@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("directions_kind", ["index", "dense"])
def test_layer_map_jet_equals_dense(backend, model_kind, kind, directions_kind):
    b = f64(backend)
    model = make_model(model_kind)
    params = model.init(key(0), b)
    sampler, state, params, directions = sampler_setup(b, kind, params)
    x = points(b)
    if directions_kind == "index":
        v = b.asarray([4, 0, 2], dtype=b.index_dtype)
    else:
        v = b.normal(key(31), (3, SIZES[0]))
    perturbed = with_layer_map(model, sampler.layer_map(state, directions, Q_INDEX, Q_SCALES))
    mapped = jet_terms(b, perturbed.jet(params, x, v, 3))
    refs = [
        jet_terms(b, model.jet(dense_params(b, sampler, state, directions, params, i, s), x, v, 3))
        for i, s in zip(Q_INDEX, Q_SCALES, strict=True)
    ]
    assert_jets_close(mapped, refs)


@pytest.mark.parametrize("model_kind", ["mlp", "ansatz"])
@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize(
    "oracle", [SparseLaplacian(3), HutchinsonLaplacian(2)], ids=["sparse", "hutchinson"]
)
def test_layer_map_oracle_equals_dense(backend, model_kind, kind, oracle):
    b = f64(backend)
    model = make_model(model_kind)
    params = model.init(key(0), b)
    sampler, state, params, directions = sampler_setup(b, kind, params)
    x = points(b)
    sample = oracle.sample(key(17), x)
    perturbed = with_layer_map(model, sampler.layer_map(state, directions, Q_INDEX, Q_SCALES))
    estimate = oracle.estimate(perturbed, params, x, sample)
    u, value = host(b, estimate.u), host(b, estimate.value)
    assert u.shape == value.shape == (len(Q_INDEX), B)
    for k, (i, s) in enumerate(zip(Q_INDEX, Q_SCALES, strict=True)):
        dense = dense_params(b, sampler, state, directions, params, i, s)
        ref = oracle.estimate(model, dense, x, sample)
        assert_close(u[k], host(b, ref.u), RTOL64)
        assert_close(value[k], host(b, ref.value), RTOL64)


def test_layer_map_float32_equals_dense(backend):
    """The layer map in the default float32 (the default dtype of training)."""
    model = make_model("ansatz")
    x = points(backend)
    for kind in ("lowrank-pending", "full"):
        params = model.init(key(0), backend)
        sampler, state, params, directions = sampler_setup(backend, kind, params)
        perturbed = with_layer_map(model, sampler.layer_map(state, directions, [2], [0.5]))
        out = host(backend, perturbed.apply(params, x))
        dense = dense_params(backend, sampler, state, directions, params, 2, 0.5)
        ref = host(backend, model.apply(dense, x))
        assert out.dtype == np.float32
        assert_close(out[0], ref, 1e-5)


# -- merge_every: "refresh" (pending A) against "step" (W updated every step) ----------------


def test_merge_every_refresh_equals_merge_every_step(backend):
    b = f64(backend)
    model = make_model("ansatz")
    params = model.init(key(0), b)
    x = points(b)
    lazy = LowRankSubspace(rank=3, refresh_every=3, merge_every="refresh")
    eager = LowRankSubspace(rank=3, refresh_every=3, merge_every="step")
    p_lazy, p_eager = copy_params(b, params), copy_params(b, params)
    s_lazy, s_eager = lazy.init(key(1), p_lazy), eager.init(key(1), p_eager)
    assert s_eager.pending is None and s_lazy.pending is not None
    for step in range(8):
        s_lazy, p_lazy, t_lazy = lazy.refresh(s_lazy, p_lazy, step)
        s_eager, p_eager, t_eager = eager.refresh(s_eager, p_eager, step)
        assert (t_lazy is None) == (t_eager is None)
        d_lazy = lazy.draw(s_lazy, p_lazy, fold_in(key(3), step), 2)
        d_eager = eager.draw(s_eager, p_eager, fold_in(key(3), step), 2)
        s_lazy, p_lazy = lazy.apply(
            s_lazy, p_lazy, d_lazy, random_updates(b, lazy, d_lazy, 100 + step)
        )
        s_eager, p_eager = eager.apply(
            s_eager, p_eager, d_eager, random_updates(b, eager, d_eager, 100 + step)
        )
        assert eager.evaluation_layer_map(s_eager, p_eager) is None
        current = with_layer_map(model, lazy.evaluation_layer_map(s_lazy, p_lazy))
        out_lazy = host(b, current.apply(p_lazy, x))
        out_eager = host(b, model.apply(p_eager, x))
        assert_close(out_lazy, out_eager, RTOL64)
    # The last step (7) left a pending update: the lazy weights lag until merged.
    assert max(np.max(np.abs(host(b, A))) for A in s_lazy.pending) > 1e-3
    s_lazy, p_lazy = lazy.merge(s_lazy, p_lazy)
    for A in s_lazy.pending:
        np.testing.assert_array_equal(host(b, A), np.zeros(A.shape))
    for a, e in zip(host_params(b, p_lazy), host_params(b, p_eager), strict=True):
        assert_close(a["W"], e["W"], RTOL64)
        assert_close(a["b"], e["b"], RTOL64)
    assert_close(host(b, model.apply(p_lazy, x)), host(b, model.apply(p_eager, x)), RTOL64)
    # After the merge the evaluation layer map is the plain network.
    current = with_layer_map(model, lazy.evaluation_layer_map(s_lazy, p_lazy))
    out = host(b, current.apply(p_lazy, x))
    assert_close(out, host(b, model.apply(p_lazy, x)), RTOL64)


def test_merge_every_step_moves_w_at_every_step(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3, merge_every="step")
    state = sampler.init(key(1), params)
    before = host_params(b, params)
    directions = sampler.draw(state, params, key(2), 2)
    updates = random_updates(b, sampler, directions, 5)
    state, params = sampler.apply(state, params, directions, updates)
    for layer, (p, r) in enumerate(zip(params, before, strict=True)):
        U, V = (host(b, a) for a in directions.bases[layer])
        D = host(b, updates[layer]["W"])
        assert_close(host(b, p["W"]), r["W"] + U @ D @ V.T, RTOL64)
        assert_close(host(b, p["b"]), r["b"] + host(b, updates[layer]["b"]), RTOL64)


# -- add_low_rank ----------------------------------------------------------------------------


def data_pointer(W):
    if array_api_compat.is_torch_array(W):
        return W.data_ptr()
    if array_api_compat.is_numpy_array(W):
        return W.__array_interface__["data"][0]
    return None


@pytest.mark.parametrize("chunk_elements", [None, 7])
def test_add_low_rank(backend, monkeypatch, chunk_elements):
    b = f64(backend)
    m, n, r = 3, 11, 2
    if chunk_elements is not None:
        # 7 // 3 = 2 columns per chunk: 6 chunks, the last one ragged.
        monkeypatch.setattr(samplers_module, "_CHUNK_ELEMENTS", chunk_elements)
    W = b.normal(key(0), (m, n))
    U, M, V = b.normal(key(1), (m, r)), b.normal(key(2), (r, r)), b.normal(key(3), (n, r))
    W0 = host(b, W)
    expected = W0 + host(b, U) @ host(b, M) @ host(b, V).T
    pointer = data_pointer(W)
    out = add_low_rank(W, U, M, V)
    assert_close(host(b, out), expected, RTOL64)
    if array_api_compat.is_writeable_array(W):
        assert out is W
        assert_close(host(b, W), expected, RTOL64)
        if pointer is not None:
            assert data_pointer(out) == pointer
    # Immutable arrays (JAX) are updated functionally with W's buffer donated:
    # the input may no longer be readable, only the returned array counts.
    if backend.name in ("numpy", "torch"):
        assert array_api_compat.is_writeable_array(W)


def test_add_low_rank_in_place_when_chunked(backend, monkeypatch):
    """n much larger than the chunk: in place, correct, whatever the chunking."""
    b = f64(backend)
    monkeypatch.setattr(samplers_module, "_CHUNK_ELEMENTS", 16)
    m, n, r = 4, 1000, 3  # 4 columns per chunk: 250 chunks
    W = b.normal(key(0), (m, n))
    U, M, V = b.normal(key(1), (m, r)), b.normal(key(2), (r, r)), b.normal(key(3), (n, r))
    expected = host(b, W) + host(b, U) @ host(b, M) @ host(b, V).T
    out = add_low_rank(W, U, M, V)
    assert_close(host(b, out), expected, RTOL64)
    if array_api_compat.is_writeable_array(W):
        assert out is W


# -- full Gaussian ---------------------------------------------------------------------------


def test_full_gaussian_draws(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = FullGaussian()
    assert sampler.init(key(1), params) is None
    assert not sampler.has_coordinates
    first = sampler.draw(None, params, key(2), 3)
    again = sampler.draw(None, params, key(2), 3)
    other = sampler.draw(None, params, key(3), 3)
    fewer = sampler.draw(None, params, key(2), 2)
    for layer, p in enumerate(params):
        m, n = p["W"].shape
        Z = host(b, first.W[layer])
        assert Z.shape == (3, m, n)
        assert host(b, first.bias[layer]).shape == (3, m)
        np.testing.assert_array_equal(Z, host(b, again.W[layer]))
        np.testing.assert_array_equal(host(b, first.bias[layer]), host(b, again.bias[layer]))
        assert np.max(np.abs(Z - host(b, other.W[layer]))) > 1e-3
        # Each Z_i comes from its own key: the first two do not depend on q.
        np.testing.assert_array_equal(Z[:2], host(b, fewer.W[layer]))
        # The queries are distinct draws.
        assert np.max(np.abs(Z[0] - Z[1])) > 1e-3
    assert sampler.subspace_dimension(params) == sum(
        p["W"].shape[0] * p["W"].shape[1] + p["b"].shape[0] for p in params
    )


def test_full_gaussian_apply_regenerates_z(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = FullGaussian()
    directions = sampler.draw(None, params, key(2), 3)
    before = host_params(b, params)
    coefficients = [0.3, -0.7, 0.2]
    updates = [
        {"W": b.asarray(coefficients, dtype=b.dtype), "b": 0.1 * b.normal(key(5 + layer), (m,))}
        for layer, m in enumerate(p["b"].shape[0] for p in params)
    ]
    state, params = sampler.apply(None, params, directions, updates)
    assert state is None
    for layer, (p, r) in enumerate(zip(params, before, strict=True)):
        Z = host(b, directions.W[layer])
        expected = r["W"] + sum(c * Z[i] for i, c in enumerate(coefficients))
        assert_close(host(b, p["W"]), expected, RTOL64)
        assert_close(host(b, p["b"]), r["b"] + host(b, updates[layer]["b"]), RTOL64)


def test_full_gaussian_project(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = FullGaussian()
    directions = sampler.draw(None, params, key(2), 2)
    g = b.asarray([2.0, -4.0], dtype=b.dtype)
    coords = sampler.project(directions, g)
    for layer, c in enumerate(coords):
        assert_close(host(b, c["W"]), np.array([1.0, -2.0]), RTOL64)
        zb = host(b, directions.bias[layer])
        assert_close(host(b, c["b"]), (2.0 * zb[0] - 4.0 * zb[1]) / 2, RTOL64)


def test_lowrank_project(backend):
    """coords = (c / q) Σ g_i S_i, (1/q) Σ g_i z_b,i: U G Vᵀ = (1/q) Σ g_i Z_i."""
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 3)
    g = np.array([2.0, -4.0, 0.5])
    coords = sampler.project(directions, b.asarray(g, dtype=b.dtype))
    for layer, c in enumerate(coords):
        U, V = (host(b, a) for a in directions.bases[layer])
        full = sum(g[i] * host(b, sampler.perturbation(directions, layer, i)) for i in range(3))
        assert_close(U @ host(b, c["W"]) @ V.T, full / 3, RTOL64)
        zb = host(b, directions.bias[layer])
        assert_close(host(b, c["b"]), g @ zb / 3, RTOL64)


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "rank must be an int >= 1"),
        ({"rank": -2}, "rank must be an int >= 1"),
        ({"rank": 2.0}, "rank must be an int >= 1"),
        ({"rank": True}, "rank must be an int >= 1"),
        ({"refresh_every": 0}, "refresh_every must be an int >= 1"),
        ({"merge_every": "never"}, "merge_every must be 'refresh' or 'step'"),
    ],
)
def test_lowrank_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankSubspace(**kwargs)


@pytest.mark.parametrize("sampler", [LowRankSubspace(rank=2), FullGaussian()], ids=repr)
def test_samplers_reject_bad_params(backend, sampler):
    params = MLP(SIZES).init(key(0), backend)
    with pytest.raises(TypeError, match="non-empty list"):
        sampler.init(key(1), params[0])
    with pytest.raises(TypeError, match="non-empty list"):
        sampler.init(key(1), [])
    with pytest.raises(TypeError, match="layer 1: expected a dict with keys 'W' and 'b'"):
        sampler.init(key(1), [params[0], {"W": params[1]["W"]}])
    with pytest.raises(TypeError, match="layer 0: expected a dict"):
        sampler.init(key(1), [(params[0]["W"], params[0]["b"])])
    wrong_bias = [params[0], {"W": params[1]["W"], "b": params[0]["b"]}]
    with pytest.raises(ValueError, match=r"layer 1: W must be \(m, n\) and b \(m,\)"):
        sampler.init(key(1), wrong_bias)
    vector_W = [{"W": params[0]["b"], "b": params[0]["b"]}]
    with pytest.raises(ValueError, match=r"layer 0: W must be \(m, n\)"):
        sampler.init(key(1), vector_W)


@pytest.mark.parametrize("sampler", [LowRankSubspace(rank=2), FullGaussian()], ids=repr)
def test_samplers_reject_bad_queries(backend, sampler):
    params = MLP(SIZES).init(key(0), backend)
    state = sampler.init(key(1), params)
    for q in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_queries must be an int >= 1"):
            sampler.draw(state, params, key(2), q)
    directions = sampler.draw(state, params, key(2), 2)
    with pytest.raises(ValueError, match=r"query_index and scales must both have shape \(Q,\)"):
        sampler.layer_map(state, directions, [0, 1], [0.1])
    with pytest.raises(ValueError, match=r"query_index and scales must both have shape \(Q,\)"):
        sampler.layer_map(state, directions, [0], [0.1, -0.1])


def test_lowrank_state_is_a_namedtuple(backend):
    params = MLP(SIZES).init(key(0), backend)
    state = LowRankSubspace(rank=2).init(key(1), params)
    assert isinstance(state, LowRankState)
    assert state.key == fold_in(key(1), "bases")
    for p, A in zip(params, state.pending, strict=True):
        r = min(2, *p["W"].shape)
        assert A.shape == (r, r)
        np.testing.assert_array_equal(host(backend, A), np.zeros((r, r)))


def test_layer_map_query_errors(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3)
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 2)
    with pytest.raises(ValueError, match="needs scales"):
        sampler.layer_map(state, directions, [0], None)
    with pytest.raises(ValueError, match=r"must lie in range\(2\)"):
        sampler.layer_map(state, directions, [0, 2], [1e-3, 1e-3])


# -- one layer per query, residual-aligned input bases -----------------------------------------


def test_layerwise_draws_perturb_one_layer_per_query(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    L = len(params)
    plain, layerwise = LowRankSubspace(rank=3), LowRankSubspace(rank=3, layerwise=True)
    state = plain.init(key(1), params)
    seen = set()
    previous = None
    for step in range(12):
        full = plain.draw(state, params, key(100 + step), 5)
        one = layerwise.draw(state, params, key(100 + step), 5)
        for i in range(5):
            active = [
                layer for layer in range(L)
                if np.any(host(b, one.S[layer])[i] != 0) or np.any(host(b, one.bias[layer])[i] != 0)
            ]
            assert len(active) == 1  # exactly one layer per query ...
            layer = active[0]
            seen.add(layer)
            # ... the plain draw's S and z_b times sqrt(L)
            np.testing.assert_allclose(host(b, one.S[layer])[i],
                                       sqrt(L) * host(b, full.S[layer])[i], rtol=1e-14)
            np.testing.assert_allclose(host(b, one.bias[layer])[i],
                                       sqrt(L) * host(b, full.bias[layer])[i], rtol=1e-14)
            if i > 0:  # consecutive queries take consecutive layers
                assert previous is not None and layer == (previous + 1) % L
            previous = layer
    assert seen == set(range(L))  # the offset is drawn from the key


def test_residual_aligned_first_basis_follows_the_residual_weighted_inputs(backend):
    b = f64(backend)
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3, refresh_every=2, residual_aligned=True, input_decay=0.5)
    state = sampler.init(key(1), params)
    assert state.inputs is None
    x1, x2 = points(b), 2.0 * points(b)
    r1 = b.asarray(np.array([1.0, -2.0, 0.5, 3.0]), dtype=b.dtype)
    r2 = b.asarray(np.array([0.0, 1.0, 1.0, -1.0]), dtype=b.dtype)
    state = sampler.observe(state, x1, r1)
    def term(r, x):
        r = host(b, r)
        return r @ host(b, x) / (B * np.sqrt(np.mean(r * r)))

    h1 = term(r1, x1)
    np.testing.assert_allclose(host(b, state.inputs), h1, rtol=1e-13)
    state = sampler.observe(state, x2, r2)
    h2 = 0.5 * h1 + 0.5 * term(r2, x2)
    np.testing.assert_allclose(host(b, state.inputs), h2, rtol=1e-13)
    # At the refresh, V of the first layer spans h (its first column is ±h/|h|),
    # and every basis stays orthonormal.
    state, params, transition = sampler.refresh(state, params, 2)
    assert transition is not None
    U0, V0 = (host(b, a) for a in state.bases[0])
    unit = h2 / np.linalg.norm(h2)
    assert abs(abs(V0[:, 0] @ unit) - 1.0) < 1e-12
    for U, V in state.bases:
        for M in (host(b, U), host(b, V)):
            np.testing.assert_allclose(M.T @ M, np.eye(M.shape[1]), atol=1e-12)
    # The other layers' bases are the plain sampler's.
    plain_state = LowRankSubspace(rank=3, refresh_every=2).init(key(1), params)
    plain_state, _, _ = LowRankSubspace(rank=3, refresh_every=2).refresh(plain_state, params, 2)
    for (_, V), (_, V2) in list(zip(state.bases, plain_state.bases, strict=True))[1:]:
        np.testing.assert_array_equal(host(b, V), host(b, V2))


def test_residual_aligned_needs_stored_bases_and_a_decay_in_range():
    with pytest.raises(ValueError, match="store_bases=True"):
        LowRankSubspace(residual_aligned=True, store_bases=False)
    with pytest.raises(ValueError, match="input_decay"):
        LowRankSubspace(residual_aligned=True, input_decay=1.0)
