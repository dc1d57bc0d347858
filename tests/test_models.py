"""MLP and PINN ansatz: parameters, forward pass, jets, layer maps.

References: jax.experimental.jet (orders 1-6) and torch.func nested jvp
(orders 1-6), both in float64 on NumPy copies of the same parameters.
"""

import tracemalloc
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from array_api_compat import array_namespace
from jax.experimental.jet import jet as jax_jet

from sdze.testing import SpyLayers, get_test_backend
from sdze_core import jets
from sdze_core.keys import fold_in, key
from sdze_core.models import (
    MLP,
    PLAIN_LAYERS,
    Ansatz,
    LayerMapNetwork,
    with_layer_map,
    with_network,
)

jax.config.update("jax_enable_x64", True)

ORDERS = range(1, 7)
RTOL64 = 1e-12  # relative to max(1, largest reference entry)
RTOL32 = 1e-4
D, B, V = 5, 4, 3
SIZES = (D, 16, 16, 16, 1)
INDEX = np.array([3, 0, 4])

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "sin": jnp.sin,
    "softplus": lambda x: jnp.log1p(jnp.exp(x)),  # jet cannot trace jax.nn.softplus
    "sigmoid": jax.nn.sigmoid,
}


def terms(j):
    """(f_0, f_1, ..., f_K) of a jet."""
    return (j.primal,) + tuple(j.coeffs)


def assert_close(actual, expected, rtol):
    """max |actual - expected| <= rtol · max(1, max |expected|)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(
        actual, np.broadcast_to(expected, actual.shape), rtol=0, atol=rtol * scale
    )


@cache
def numpy_params(seed=0, sizes=SIZES):
    rng = np.random.default_rng(seed)
    return tuple(
        {
            "W": rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / (n_in + n_out)),
            "b": 0.1 * rng.standard_normal(n_out),
        }
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    )


def points():
    return 0.4 * np.random.default_rng(1).standard_normal((B, D))


def dense_directions(kind):
    rng = np.random.default_rng(2)
    return rng.standard_normal((V, D) if kind == "shared" else (V, B, D))


def directions_for(b, kind):
    if kind == "index":
        return b.asarray(INDEX, dtype=b.index_dtype)
    return b.asarray(dense_directions(kind), dtype=b.dtype)


def backend_params(b, sizes=SIZES, seed=0):
    return [
        {k: b.asarray(a, dtype=b.dtype) for k, a in p.items()} for p in numpy_params(seed, sizes)
    ]


def jax_network(activation, boundary=None):
    params = numpy_params()
    phi = ACTIVATIONS[activation]

    def u(x):
        h = x
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            if layer < len(params) - 1:
                h = phi(h)
        out = h[..., 0]
        if boundary is None:
            return out
        r2 = jnp.sum(x * x, axis=-1)
        g = 1 - r2 if boundary == "ball" else (1 - r2) * (4 - r2)
        return g * out

    return u


@cache
def reference(activation, kind, order, boundary=None):
    """jax.experimental.jet of the network along each direction, stacked: (V, B) per order."""
    u = jax_network(activation, boundary)
    x = points()
    if kind == "index":
        dirs = np.broadcast_to(np.eye(D)[INDEX][:, None, :], (V, B, D))
    else:
        dirs = np.broadcast_to(dense_directions(kind).reshape(V, -1, D), (V, B, D))
    zeros = (np.zeros((B, D)),) * (order - 1)
    primal, coeffs = jax.vmap(lambda v: jax_jet(u, (x,), ((v,) + zeros,)))(dirs)
    return np.asarray(primal[0]), [np.asarray(c) for c in coeffs]


def check_against_reference(b, out, activation, kind, order, rtol, boundary=None):
    primal, coeffs = reference(activation, kind, order, boundary)
    assert tuple(out.primal.shape) == (B,) and out.order == order
    assert_close(b.to_host(out.primal), primal, rtol)
    for k in range(order):
        assert tuple(out.coeffs[k].shape) == (V, B)
        assert_close(b.to_host(out.coeffs[k]), coeffs[k], rtol)


# -- jets against jax.experimental.jet and torch.func ----------------------------


@pytest.mark.parametrize("kind", ["index", "shared", "per-point"])
@pytest.mark.parametrize("activation", ["tanh", "sin", "softplus"])
def test_mlp_jet_matches_jax_jet(backend, activation, kind):
    b = backend.with_config(dtype="float64")
    net = MLP(SIZES, activation)
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    for order in ORDERS:
        out = net.jet(params, x, directions_for(b, kind), order)
        check_against_reference(b, out, activation, kind, order, RTOL64)


@pytest.mark.parametrize("kind", ["index", "shared"])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
def test_mlp_jet_float32(backend, activation, kind):
    """float32 jets agree with the float64 reference to RTOL32 (relative to the largest entry)."""
    net = MLP(SIZES, activation)
    params, x = backend_params(backend), backend.asarray(points(), dtype=backend.dtype)
    for order in ORDERS:
        out = net.jet(params, x, directions_for(backend, kind), order)
        assert out.coeffs[-1].dtype == backend.xp.float32
        check_against_reference(backend, out, activation, kind, order, RTOL32)


@cache
def torch_nested_jvp(max_order):
    """D^k u(x)[v, ..., v] for k = 1..max_order by torch.func.jvp nested k times."""
    params = [{k: torch.tensor(a) for k, a in p.items()} for p in numpy_params()]

    def u(x):
        h = x
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            if layer < len(params) - 1:
                h = torch.tanh(h)
        return h[..., 0]

    def along(fn, v):
        return lambda y: torch.func.jvp(fn, (y,), (v,))[1]

    x = torch.tensor(points())
    result = []
    for v in torch.tensor(dense_directions("shared")):
        fn, per_order = u, []
        for _ in range(max_order):
            fn = along(fn, v.expand(B, D))
            per_order.append(fn(x).numpy())
        result.append(per_order)
    return [np.stack([r[k] for r in result]) for k in range(max_order)]


# torch.func.jvp calls torch.jit.script internally, which torch itself deprecates.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_mlp_jet_matches_torch_nested_jvp(backend):
    b = backend.with_config(dtype="float64")
    out = MLP(SIZES).jet(
        backend_params(b), b.asarray(points(), dtype=b.dtype), directions_for(b, "shared"), 6
    )
    for k, expected in enumerate(torch_nested_jvp(6)):
        assert_close(b.to_host(out.coeffs[k]), expected, RTOL64)


@pytest.mark.parametrize("kind", ["index", "shared"])
@pytest.mark.parametrize("boundary", ["ball", "annulus"])
def test_ansatz_jet_matches_jax_jet(backend, boundary, kind):
    b = backend.with_config(dtype="float64")
    model = Ansatz(MLP(SIZES), boundary)
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    for order in ORDERS:
        out = model.jet(params, x, directions_for(b, kind), order)
        check_against_reference(b, out, "tanh", kind, order, RTOL64, boundary)


# -- forward pass ---------------------------------------------------------------


@pytest.mark.parametrize("boundary", [None, "ball", "annulus"])
def test_apply_matches_reference_and_jet_primal(backend, boundary):
    b = backend.with_config(dtype="float64")
    model = MLP(SIZES, "sin") if boundary is None else Ansatz(MLP(SIZES, "sin"), boundary)
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    y = model.apply(params, x)
    assert tuple(y.shape) == (B,)
    assert_close(b.to_host(y), np.asarray(jax_network("sin", boundary)(points())), RTOL64)
    primal = model.jet(params, x, directions_for(b, "index"), 2).primal
    assert_close(b.to_host(primal), b.to_host(y), RTOL64)


def test_vector_output_is_not_squeezed(backend):
    b = backend.with_config(dtype="float64")
    sizes = (D, 8, 3)
    net = MLP(sizes)
    params, x = backend_params(b, sizes), b.asarray(points(), dtype=b.dtype)
    assert tuple(net.apply(params, x).shape) == (B, 3)
    out = net.jet(params, x, directions_for(b, "index"), 2)
    assert tuple(out.coeffs[1].shape) == (V, B, 3)


# -- sparse coordinate directions ------------------------------------------------------


@pytest.mark.parametrize("model", ["mlp", "ball", "annulus"])
def test_coordinate_jets_equal_one_hot_jets(backend, model):
    b = backend.with_config(dtype="float64")
    net = MLP(SIZES, "softplus")
    net = net if model == "mlp" else Ansatz(net, model)
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    one_hot = b.asarray(np.eye(D)[INDEX], dtype=b.dtype)
    for order in ORDERS:
        sparse = net.jet(params, x, directions_for(b, "index"), order)
        dense = net.jet(params, x, one_hot, order)
        for s, d in zip(terms(sparse), terms(dense), strict=True):
            assert_close(b.to_host(s), b.to_host(d), RTOL64)


def test_coordinate_first_layer_is_a_gather(backend):
    """Along e_j the first layer is only a column gather: no product with a (V, d) array."""
    b = backend.with_config(dtype="float64")
    spy = SpyLayers()
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    out = with_layer_map(MLP(SIZES), spy).jet(params, x, directions_for(b, "index"), 3)
    assert spy.column_calls == [(0, (V,))]
    assert [c for c in spy.calls if c[0] == 0] == [(0, True, (B, D))]
    # Deeper layers see the direction axis, nothing of size d.
    assert (1, False, (V, B, 16)) in spy.calls
    assert all(D not in shape[:-1] for _, _, shape in spy.calls)
    reference_out = MLP(SIZES).jet(params, x, directions_for(b, "index"), 3)
    assert_close(b.to_host(out.coeffs[2]), b.to_host(reference_out.coeffs[2]), RTOL64)


def test_coordinate_jets_at_a_million_dimensions():
    """d = 10**6, 64 directions: a one-hot would be 256 MB; the jet allocates a few MB."""
    b = get_test_backend("numpy")
    d, width, n_dirs = 10**6, 8, 64
    sizes = (d, width, width, 1)
    model = Ansatz(MLP(sizes))
    params = model.init(key(0), b)
    x = (0.5 / d**0.5) * b.normal(key(1), (2, d))
    index = b.choice(key(2), d, n_dirs)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = model.jet(params, x, index, 2)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    one_hot_bytes = n_dirs * d * 4
    assert peak < 32 * 2**20 < one_hot_bytes
    # One direction checked against the dense path (a single (1, d) one-hot is affordable).
    j = int(b.to_host(index)[0])
    e_j = b.asarray(np.eye(1, d, j), dtype=b.dtype)
    dense = model.jet(params, x, e_j, 2)
    for k in range(2):
        np.testing.assert_allclose(out.coeffs[k][0], dense.coeffs[k][0], rtol=1e-5, atol=1e-6)


# -- collapsed top order ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["index", "shared", "per-point"])
@pytest.mark.parametrize("model", ["mlp", "ball", "annulus"])
def test_collapsed_top_is_sum_of_uncollapsed_top(backend, model, kind):
    b = backend.with_config(dtype="float64")
    net = MLP(SIZES)
    net = net if model == "mlp" else Ansatz(net, model)
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    for order in range(1, 5):
        full = net.jet(params, x, directions_for(b, kind), order)
        summed = net.jet(params, x, directions_for(b, kind), order, collapse=True)
        assert summed.collapsed and not full.collapsed
        assert tuple(summed.coeffs[-1].shape) == (B,)
        assert_close(b.to_host(summed.coeffs[-1]), b.to_host(full.coeffs[-1]).sum(0), RTOL64)
        for s, f in zip(terms(summed)[:-1], terms(full)[:-1], strict=True):
            assert_close(b.to_host(s), b.to_host(f), RTOL64)


# -- layer maps: the perturbation belongs to the model ----------------------------


class AddDelta:
    """Layer map computing x (W + Δ)ᵀ without forming W + Δ, as a perturbation's would."""

    def __init__(self, deltas):
        self.deltas = deltas

    def affine(self, layer, p, x, is_primal):
        return PLAIN_LAYERS.affine(layer, p, x, is_primal) + x @ self.deltas[layer].T

    def columns(self, layer, p, index):
        delta = self.deltas[layer]
        xp = array_namespace(delta)
        return PLAIN_LAYERS.columns(layer, p, index) + xp.take(delta, index, axis=1)


@pytest.mark.parametrize("kind", ["index", "shared"])
def test_layer_map_replaces_the_affine_map(backend, kind):
    b = backend.with_config(dtype="float64")
    model = Ansatz(MLP(SIZES))
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    rng = np.random.default_rng(7)
    deltas = [0.1 * rng.standard_normal(tuple(p["W"].shape)) for p in numpy_params()]
    mapped = with_layer_map(model, AddDelta([b.asarray(dl, dtype=b.dtype) for dl in deltas]))
    assert isinstance(mapped, Ansatz) and isinstance(mapped.network, LayerMapNetwork)
    moved = [
        {"W": b.asarray(p["W"] + dl, dtype=b.dtype), "b": b.asarray(p["b"], dtype=b.dtype)}
        for p, dl in zip(numpy_params(), deltas, strict=True)
    ]
    assert_close(b.to_host(mapped.apply(params, x)), b.to_host(model.apply(moved, x)), RTOL64)
    through_map = mapped.jet(params, x, directions_for(b, kind), 3)
    plain = model.jet(moved, x, directions_for(b, kind), 3)
    for h, p in zip(terms(through_map), terms(plain), strict=True):
        assert_close(b.to_host(h), b.to_host(p), RTOL64)


class AffineOnly:
    """A layer map without ``columns``."""

    def affine(self, layer, p, x, is_primal):
        return PLAIN_LAYERS.affine(layer, p, x, is_primal)


def test_coordinate_directions_need_a_columns_method(backend):
    b = backend.with_config(dtype="float64")
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    with pytest.raises(TypeError, match="columns"):
        with_layer_map(MLP(SIZES), AffineOnly()).jet(params, x, directions_for(b, "index"), 2)


def test_plain_layer_map_is_the_network(backend):
    """The plain map through the wrapper gives the network's numbers bit for bit."""
    b = backend.with_config(dtype="float64")
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    for model in (MLP(SIZES), Ansatz(MLP(SIZES), "annulus")):
        mapped = with_layer_map(model, PLAIN_LAYERS)
        np.testing.assert_array_equal(
            b.to_host(mapped.apply(params, x)), b.to_host(model.apply(params, x))
        )
        for kind in ("index", "shared"):
            ours = mapped.jet(params, x, directions_for(b, kind), 2, collapse=True)
            theirs = model.jet(params, x, directions_for(b, kind), 2, collapse=True)
            for m, p in zip(terms(ours), terms(theirs), strict=True):
                np.testing.assert_array_equal(b.to_host(m), b.to_host(p))


def test_with_network_needs_an_mlp_network():
    class NotAModel:
        network = MLP(SIZES)  # not a dataclass: nothing to replace the field of

    wrapped = with_network(MLP(SIZES), lambda n: ("wrapped", n))
    assert wrapped == ("wrapped", MLP(SIZES))
    with pytest.raises(TypeError, match="a layer map needs an MLP or a model dataclass"):
        with_layer_map(NotAModel(), PLAIN_LAYERS)
    with pytest.raises(TypeError, match="got NoneType"):
        with_layer_map(None, PLAIN_LAYERS)


# -- parameters and validation ---------------------------------------------------------


def test_init_glorot_normal_from_layer_keys(backend):
    net = MLP((200, 300, 1))
    params = net.init(key(3), backend)
    assert [tuple(p["W"].shape) for p in params] == [(300, 200), (1, 300)]
    assert [tuple(p["b"].shape) for p in params] == [(300,), (1,)]
    assert all(p["W"].dtype == backend.dtype and p["b"].dtype == backend.dtype for p in params)
    W = backend.to_host(params[0]["W"])
    assert abs(W.std() / np.sqrt(2 / 500) - 1) < 0.03
    assert not np.any(backend.to_host(params[0]["b"]))
    again = net.init(key(3), backend)
    np.testing.assert_array_equal(backend.to_host(again[1]["W"]), backend.to_host(params[1]["W"]))
    drawn = np.sqrt(2 / 301) * backend.to_host(backend.normal(fold_in(key(3), 1), (1, 300)))
    np.testing.assert_allclose(backend.to_host(params[1]["W"]), drawn, rtol=1e-6)
    other = net.init(key(4), backend)
    assert not np.allclose(backend.to_host(other[0]["W"]), W)


def test_validation(backend):
    with pytest.raises(ValueError, match="activation"):
        MLP(SIZES, "relu")
    with pytest.raises(ValueError, match="two positive sizes"):
        MLP((3,))
    with pytest.raises(ValueError, match="boundary"):
        Ansatz(MLP(SIZES), "cube")
    with pytest.raises(ValueError, match="scalar output"):
        Ansatz(MLP((D, 4, 2)))
    b = backend.with_config(dtype="float64")
    params, x = backend_params(b), b.asarray(points(), dtype=b.dtype)
    with pytest.raises(ValueError, match="layers"):
        MLP(SIZES).apply(params[:-1], x)
    with pytest.raises(ValueError, match="shape"):
        MLP((D + 1,) + SIZES[1:]).apply(params, x)
    assert jets.ACTIVATIONS == tuple(sorted(jets.ACTIVATIONS))
