"""Property-based tests (hypothesis) over the public API's inputs.

Reproducible and fast, for CI: ``derandomize=True`` (the examples are a function of the test
alone, no database), few examples, no deadline (jax compiles each new shape once).
"""

import dataclasses
import json
import math
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sdze
from helpers import assert_close, f64, host
from sdze.checkpoint import load_checkpoint, save_checkpoint
from sdze.solver import ESTIMATORS, METHODS, SCHEDULES, SolverConfig
from sdze_core import oracles
from sdze_core.jets import ACTIVATIONS
from sdze_core.keys import Key
from sdze_core.models import MLP
from sdze_core.problems import PROBLEMS
from test_checkpoint import assert_tree_equal, host_tree


def examples(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


seeds = st.integers(0, 2**64 - 1)
words = st.integers(0, 2**32 - 1)
shapes = st.lists(st.integers(0, 3), min_size=0, max_size=2).map(tuple)  # jax compiles each


# -- keys and random draws ---------------------------------------------------------------------


@examples(30)
@given(seed=st.integers(0, 2**63 - 1), data=words, num=st.integers(1, 5))
def test_split_and_fold_in_match_jax(seed, data, num):
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)  # 64-bit seeds (test_models does it too)
    k, jk = sdze.key(seed), jax.random.key(seed)
    assert k.words == tuple(int(w) for w in jax.random.key_data(jk))
    theirs = np.asarray(jax.random.key_data(jax.random.split(jk, num)))
    assert [s.words for s in sdze.split(k, num)] == [tuple(int(w) for w in r) for r in theirs]
    folded = jax.random.key_data(jax.random.fold_in(jk, data))
    assert sdze.fold_in(k, data).words == tuple(int(w) for w in folded)


@examples(30)
@given(seed=seeds, roles=st.lists(st.one_of(words, st.text(max_size=8)), min_size=2, max_size=5,
                                  unique=True))
def test_fold_in_is_a_deterministic_function_of_key_and_role(seed, roles):
    k = sdze.key(seed)
    folded = [sdze.fold_in(k, r) for r in roles]
    assert folded == [sdze.fold_in(sdze.key(seed), r) for r in roles]
    words_of = {sdze.fold_in(k, r).words for r in roles if not isinstance(r, str)}
    ints = [r for r in roles if not isinstance(r, str)]
    assert len(words_of) == len(ints)  # distinct integer roles give distinct keys


@examples(6)
@given(seed=seeds, shape=shapes, low=st.integers(-5, 5), span=st.integers(1, 9))
def test_portable_draws_are_the_same_on_every_backend(backend, seed, shape, low, span):
    """rng="portable": the same bits, uniforms and integers as NumPy's portable draws."""
    b = backend.with_config(rng="portable")
    ref = _numpy_portable()
    k = sdze.key(seed)
    np.testing.assert_array_equal(host(b, b.random_bits(k, shape)).astype(np.uint64),
                                  host(ref, ref.random_bits(k, shape)).astype(np.uint64))
    u = host(b, b.uniform(k, shape))
    np.testing.assert_array_equal(u, host(ref, ref.uniform(k, shape)))
    assert u.shape == shape and np.all((0 <= u) & (u < 1))
    r = host(b, b.rademacher(k, shape))
    np.testing.assert_array_equal(r, host(ref, ref.rademacher(k, shape)))
    assert np.all(np.abs(r) == 1)
    i = host(b, b.integers(k, shape, low, low + span))
    np.testing.assert_array_equal(i, host(ref, ref.integers(k, shape, low, low + span)))
    assert np.all((low <= i) & (i < low + span))


def _numpy_portable():
    from sdze_core.registry import make_backend

    return make_backend("numpy", rng="portable")


@examples(15)
@given(seed=seeds, n=st.integers(1, 10**9), data=st.data())
def test_choice_draws_distinct_indices_in_range(backend, seed, n, data):
    k = data.draw(st.integers(1, min(n, 20)))
    c = host(backend, backend.choice(sdze.key(seed), n, k))
    assert c.shape == (k,) and len(set(c.tolist())) == k
    assert np.all((0 <= c) & (c < n))


# -- jets against jax.experimental.jet, for random shapes --------------------------------------


@examples(5)
@given(
    d=st.integers(1, 5),
    widths=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    batch=st.integers(1, 3),
    num=st.integers(1, 3),
    order=st.integers(1, 4),
    activation=st.sampled_from(sorted(set(ACTIVATIONS) & {"tanh", "sin", "sigmoid"})),
    seed=st.integers(0, 2**31),
)
def test_jets_match_jax_jet_for_random_shapes(backend, d, widths, batch, num, order, activation,
                                              seed):
    jax = pytest.importorskip("jax")
    from jax.experimental.jet import jet as jax_jet

    jax.config.update("jax_enable_x64", True)
    b = f64(backend)
    rng = np.random.default_rng(seed)
    sizes = (d, *widths, 1)
    params = [{"W": rng.standard_normal((o, i)) / math.sqrt(i), "b": 0.1 * rng.standard_normal(o)}
              for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    x = 0.5 * rng.standard_normal((batch, d))
    directions = rng.standard_normal((num, d))
    phi = {"tanh": jax.numpy.tanh, "sin": jax.numpy.sin, "sigmoid": jax.nn.sigmoid}[activation]

    def u(y):
        h = y
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            h = phi(h) if layer < len(params) - 1 else h
        return h[..., 0]

    zeros = (np.zeros((batch, d)),) * (order - 1)
    along = np.broadcast_to(directions[:, None, :], (num, batch, d))
    primal, coeffs = jax.jit(jax.vmap(lambda v: jax_jet(u, (x,), ((v,) + zeros,))))(along)
    ours = MLP(sizes, activation).jet(
        [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in params],
        b.asarray(x, dtype=b.dtype), b.asarray(directions, dtype=b.dtype), order,
    )
    assert_close(host(b, ours.primal), np.asarray(primal[0]), 1e-10)
    for k in range(order):
        assert_close(host(b, ours.coeffs[k]), np.asarray(coeffs[k]), 1e-9)


# -- oracle constructors ------------------------------------------------------------------------

COUNTED = {
    "SparseLaplacian": lambda n: oracles.SparseLaplacian(num_directions=n),
    "NestedAutodiffLaplacian": lambda n: oracles.NestedAutodiffLaplacian(num_directions=n),
    "SparseGradientNormSquared": lambda n: oracles.SparseGradientNormSquared(num_directions=n),
    "HutchinsonLaplacian": lambda n: oracles.HutchinsonLaplacian(num_directions=n),
    "DenseBiharmonic": lambda n: oracles.DenseBiharmonic(num_directions=n),
    "SparseBiharmonic": lambda n: oracles.SparseBiharmonic(num_pairs=n),
    "SparseDiagonal(k)": lambda n: oracles.SparseDiagonal(k=n),
    "SparseDiagonal(num_directions)": lambda n: oracles.SparseDiagonal(k=2, num_directions=n),
    "ExactDiagonal": lambda n: oracles.ExactDiagonal(k=n),
}
bad_counts = st.one_of(
    st.integers(max_value=0), st.booleans(), st.floats(), st.text(max_size=3), st.none(),
    st.integers(1, 9).map(float),
)


@pytest.mark.parametrize("name", COUNTED)
@examples(25)
@given(bad=bad_counts, good=st.integers(1, 10**6))
def test_oracle_constructors_reject_bad_counts(name, bad, good):
    with pytest.raises(ValueError, match="must be a positive int"):
        COUNTED[name](bad)
    COUNTED[name](good)


# -- checkpoints: random parameter trees and states round-trip exactly -------------------------


def float_arrays(dtype, shape):
    return hnp.arrays(dtype, shape, elements=st.floats(width=np.dtype(dtype).itemsize * 8))


@st.composite
def parameter_trees(draw, dtype):
    sizes = draw(st.lists(st.integers(1, 4), min_size=2, max_size=4))
    return [
        {"W": draw(float_arrays(dtype, (o, i))), "b": draw(float_arrays(dtype, (o,)))}
        for i, o in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def states(dtype):
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(), st.text(max_size=5),
        st.builds(Key, words, words),
        hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
                   elements=st.floats(width=np.dtype(dtype).itemsize * 8)),
    )
    names = st.text(st.characters(codec="ascii", categories=["L", "N"]), min_size=1, max_size=4)
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3),
            st.lists(inner, max_size=3).map(tuple),
            st.dictionaries(names, inner, max_size=3),
        ),
        max_leaves=8,
    )


@examples(15)
@given(data=st.data())
def test_checkpoint_round_trip_of_random_trees(backend, data):
    dtype = host(backend, backend.zeros((0,))).dtype
    params = data.draw(parameter_trees(dtype))
    state = data.draw(states(dtype))

    def to_backend(x):
        if isinstance(x, np.ndarray):
            return backend.asarray(x, dtype=backend.dtype)
        if isinstance(x, (list, tuple)):
            return type(x)(to_backend(v) for v in x)
        if isinstance(x, dict):
            return {k: to_backend(v) for k, v in x.items()}
        return x

    params, state = to_backend(params), to_backend(state)
    with tempfile.TemporaryDirectory() as directory:
        path = save_checkpoint(f"{directory}/run.npz", params=params, state=state, config={})
        loaded = load_checkpoint(path, backend)
    assert_tree_equal(host_tree(params), host_tree(loaded.params), "params")
    assert_tree_equal(host_tree(state), host_tree(loaded.state), "state")


# -- SolverConfig ---------------------------------------------------------------------------------


def solver_configs():
    maybe = lambda s: st.one_of(st.none(), s)  # noqa: E731
    positive = st.integers(1, 10**6)
    rate = st.floats(1e-12, 1e3)  # valid settings only: the round trip, not the checks
    return st.builds(
        SolverConfig,
        problem=st.sampled_from(sorted(PROBLEMS)), dim=positive,
        method=st.sampled_from(METHODS), backend=maybe(st.sampled_from(["numpy", "torch", "jax"])),
        dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**63),
        steps=maybe(positive), width=positive, depth=positive, batch_size=positive,
        num_directions=positive, unbiased=st.booleans(), learning_rate=maybe(rate),
        schedule=maybe(st.sampled_from(SCHEDULES)), adam_b2=maybe(st.floats(0.0, 0.9999)),
        num_queries=positive, eps=maybe(st.floats(1e-8, 1.0)),
        estimator=st.sampled_from(ESTIMATORS), rank=positive, refresh_every=positive,
        layerwise=st.booleans(), residual_aligned=st.booleans(),
        input_memory=st.floats(0.1, 100.0), eval_every=maybe(positive),
        test_points=maybe(positive), checkpoint_every=maybe(positive), blowup=st.floats(1.5, 1e6),
    )


@examples(40)
@given(config=solver_configs())
def test_solver_config_json_round_trip(config):
    text = json.dumps(config.to_json())
    again = SolverConfig.from_json(json.loads(text))
    assert again == config
    assert dataclasses.asdict(again) == dataclasses.asdict(config)
