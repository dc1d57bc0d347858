"""k-sparse directions (``jets.SparseDirections``) and the sparse biharmonic that uses them.

Along v = Σ_j w_j e_{i_j} a model's first layer gathers k columns of W per
direction (docs/method.md#jets, sparse tangents). Checked here, in float64 on
every backend:

* the jets equal the jets along the same directions given densely (1e-12),
  for the MLP, the ansatz, the subspace engine's layer maps and the activity
  engine's network (whose first-layer update must also be the same);
* the sparse biharmonic builds no d-sized tangent and makes one primal pass;
* so does the mixed partial's polarization;
* a model that does not take sparse directions gets the dense ones.
"""

import numpy as np
import pytest

from helpers import assert_close, f64, host
from sdze.testing import SpyLayers
from sdze_core import activity, jets
from sdze_core.keys import key
from sdze_core.models import MLP, Ansatz, with_layer_map
from sdze_core.operator_terms import MixedPartial
from sdze_core.oracles import ExactBiharmonic, SparseBiharmonic
from sdze_core.samplers import FullGaussian, LowRankSubspace

D, B, WIDTH = 7, 4, 9
SIZES = (D, WIDTH, WIDTH, 1)
RTOL64 = 1e-12
#: Three 2-sparse directions (e_i ± e_k, a weighted pair) and a 3-sparse one with a repeat.
INDEX = [[3, 0, 0], [3, 0, 0], [6, 2, 2], [1, 5, 1]]
WEIGHTS = [[1.0, 1.0, 0.0], [1.0, -1.0, 0.0], [0.5, -2.0, 0.0], [0.7, 1.3, -0.4]]


def sparse(b):
    index = b.asarray(INDEX, dtype=b.index_dtype)
    return jets.SparseDirections(index, b.asarray(WEIGHTS, dtype=b.dtype))


def dense(b):
    """The same directions as a (V, d) array, summed on the host."""
    out = np.zeros((len(INDEX), D))
    for row, (idx, w) in enumerate(zip(INDEX, WEIGHTS, strict=True)):
        for i, wi in zip(idx, w, strict=True):
            out[row, i] += wi
    return b.asarray(out, dtype=b.dtype)


def setup(backend, model_kind):
    b = f64(backend)
    net = MLP(SIZES, "tanh")
    model = net if model_kind == "mlp" else Ansatz(net, model_kind)
    return b, model, model.init(key(0), b), 0.4 * b.normal(key(1), (B, D))


def terms(b, jet):
    return [host(b, jet.primal)] + [None if c is None else host(b, c) for c in jet.coeffs]


def assert_jets_close(ours, theirs):
    for o, t in zip(ours, theirs, strict=True):
        assert (o is None) == (t is None)
        if o is not None:
            assert_close(np.broadcast_to(o, np.broadcast_shapes(o.shape, t.shape)), t, RTOL64)


def test_dense_form_of_sparse_directions(backend):
    b = f64(backend)
    assert_close(host(b, sparse(b).dense(D)), host(b, dense(b)), 0.0)


@pytest.mark.parametrize("collapse", [False, True])
@pytest.mark.parametrize("model_kind", ["mlp", "ball", "annulus"])
def test_sparse_jets_equal_dense_jets(backend, model_kind, collapse):
    b, model, params, x = setup(backend, model_kind)
    for order in range(1, 5):
        ours = model.jet(params, x, sparse(b), order, collapse=collapse)
        theirs = model.jet(params, x, dense(b), order, collapse=collapse)
        assert ours.collapsed == collapse
        assert_jets_close(terms(b, ours), terms(b, theirs))


def test_sparse_squared_norm_counts_repeated_indices(backend):
    """‖v‖² of v = 0.7 e_1 + 1.3 e_5 − 0.4 e_1 is 0.3² + 1.3², not 0.7² + 1.3² + 0.4²."""
    b, _, _, x = setup(backend, "mlp")
    out = jets.sparse_squared_norm(x, sparse(b), 3)
    assert out.coeffs[2] is None
    assert_close(host(b, out.coeffs[1])[3], np.array([2 * (0.3**2 + 1.3**2)]), RTOL64)
    reference = jets.squared_norm(jets.input_jet(x, dense(b), 3))
    assert_jets_close(terms(b, out), terms(b, reference))


SAMPLERS = {
    "lowrank": lambda: LowRankSubspace(rank=3),
    "full": lambda: FullGaussian(),
}


@pytest.mark.parametrize("sampler_kind", sorted(SAMPLERS))
@pytest.mark.parametrize("model_kind", ["mlp", "ball"])
def test_sparse_jets_through_the_subspace_layer_map(backend, sampler_kind, model_kind):
    """The sampler's columns (W + Δ_q)[:, i], weighted, equal x_1 (W + Δ_q)ᵀ for dense v."""
    b, model, params, x = setup(backend, model_kind)
    sampler = SAMPLERS[sampler_kind]()
    state = sampler.init(key(1), params)
    draw = sampler.draw(state, params, key(2), 3)
    perturbed = with_layer_map(
        model, sampler.layer_map(state, draw, [0, 2, 1], [0.3, -0.2, 0.1]), "test"
    )
    ours = perturbed.jet(params, x, sparse(b), 4)
    theirs = perturbed.jet(params, x, dense(b), 4)
    assert tuple(ours.primal.shape) == (3, B)
    assert_jets_close(terms(b, ours), terms(b, theirs))


@pytest.mark.parametrize("model_kind", ["mlp", "ball"])
def test_sparse_jets_through_the_activity_network(backend, model_kind):
    """Same ζ (same key, same coefficient shapes), same jets, same first-layer update Ĝ_0."""
    b, model, params, x = setup(backend, model_kind)
    wrapper = (key(9), (1e-3, -1e-3), (0, 1, 2))
    outs, grads = [], []
    g = b.normal(key(4), (B,))
    for directions in (sparse(b), dense(b)):
        probe = activity._perturbed_model(model, wrapper)
        outs.append(terms(b, probe.jet(params, x, directions, 4)))
        network = probe if model_kind == "mlp" else probe.network
        grads.append(host(b, activity._layer_gradient(network.calls, params, 0, 0, g).dense()))
    assert outs[0][0].shape == (7, B)
    assert_jets_close(outs[0], outs[1])
    assert np.max(np.abs(grads[1])) > 1e-3
    assert_close(grads[0], grads[1], RTOL64)


# -- the sparse biharmonic ----------------------------------------------------------------


@pytest.mark.parametrize("collapse", [False, True])
def test_sparse_biharmonic_builds_no_dense_tangent(backend, collapse):
    """The first layer meets the pair directions only as gathered columns (an old
    version built (2P, d) directions e_i ± e_k and pushed them through x Wᵀ)."""
    b, model, params, x = setup(backend, "annulus")
    spy = SpyLayers()
    P = 5
    oracle = SparseBiharmonic(num_pairs=P, collapse=collapse)
    sample = oracle.sample(key(3), x)
    ours = oracle.estimate(with_layer_map(model, spy), params, x, sample)
    first_layer = [c for c in spy.calls if c[0] == 0]
    # Uncollapsed: the 4P directions share one jet, hence one primal pass.
    assert first_layer == [(0, True, (B, D))] * (2 if collapse else 1)
    assert spy.column_calls == ([(0, (2 * P,)), (0, (4 * P,))] if collapse else [(0, (8 * P,))])
    assert all(D not in shape[:-1] for _, _, shape in spy.calls)
    theirs = oracle.estimate(model, params, x, sample)
    assert_close(host(b, ours.value), host(b, theirs.value), RTOL64)


class DenseOnly:
    """A model whose jet takes index and dense directions only (no ``sparse_directions``)."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def jet(self, params, x, directions, order, collapse=False):
        self.seen.append(type(directions).__name__ if isinstance(directions, tuple) else "array")
        return self.model.jet(params, x, directions, order, collapse)


@pytest.mark.parametrize("oracle", [SparseBiharmonic(6), SparseBiharmonic(6, collapse=True)])
def test_models_without_sparse_directions_get_dense_ones(backend, oracle):
    b, model, params, x = setup(backend, "ball")
    fallback = DenseOnly(model)
    sample = oracle.sample(key(5), x)
    ours = oracle.estimate(fallback, params, x, sample)
    assert "SparseDirections" not in fallback.seen
    theirs = oracle.estimate(model, params, x, sample)
    assert_close(host(b, ours.value), host(b, theirs.value), RTOL64)
    assert_close(host(b, ours.u), host(b, theirs.u), RTOL64)


@pytest.mark.parametrize("index", [(0, 3), (0, 0, 1), (2, 5, 5, 1)])
def test_mixed_partial_gathers_its_directions(backend, index):
    b, model, params, x = setup(backend, "ball")
    spy = SpyLayers()
    ours = MixedPartial(index).estimate(with_layer_map(model, spy), params, x)
    k = len(index)
    assert [c for c in spy.calls if c[0] == 0] == [(0, True, (B, D))]
    assert spy.column_calls == [(0, (2 ** (k - 1) * k,))]
    theirs = MixedPartial(index).estimate(DenseOnly(model), params, x)
    assert_close(host(b, ours.value), host(b, theirs.value), RTOL64)


def test_shared_and_collapsed_biharmonic_agree(backend):
    b, model, params, x = setup(backend, "annulus")
    sample = SparseBiharmonic(8).sample(key(6), x)
    shared = SparseBiharmonic(8).estimate(model, params, x, sample)
    collapsed = SparseBiharmonic(8, collapse=True).estimate(model, params, x, sample)
    assert_close(host(b, shared.value), host(b, collapsed.value), RTOL64)
    every = SparseBiharmonic(D * (D - 1) // 2)(model, params, x, key(7))
    assert_close(
        host(b, every.value), host(b, ExactBiharmonic()(model, params, x, key(0)).value), 1e-10
    )


def test_sparse_directions_are_checked(backend):
    b = f64(backend)
    model = MLP(SIZES)
    params, x = model.init(key(0), b), b.normal(key(1), (B, D))
    index = b.asarray(INDEX, dtype=b.index_dtype)
    with pytest.raises(ValueError, match=r"one shape \(V, k\)"):
        model.jet(params, x, jets.SparseDirections(index, b.xp.ones((4, 2), dtype=b.xp.float64)), 2)
    with pytest.raises(TypeError, match="SparseDirections.index must be an integer array"):
        model.jet(params, x, jets.SparseDirections(b.xp.ones((4, 3)), b.xp.ones((4, 3))), 2)
