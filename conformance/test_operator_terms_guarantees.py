"""Guarantee: the operator terms equal nested autodiff, and the sampled ones are unbiased.

Terms of :mod:`sdze_core.operator_terms` (docs/operators.md#operator-terms) on a
space-time point (x_0, x_1, x_2, t), time last, and a tanh MLP in float64.

* Exact terms (and sampled ones with every coordinate) match references
  computed by nested ``jax.jacfwd`` in float64 on NumPy copies of the
  parameters, whatever the backend under test, to 1e-10 relative to
  max(1, |reference|).
* Unbiasedness: N = 1000 estimates from the keys fold_in(key(seed), n); at
  each of the B points

      |mean − exact| <= z · s / √N + 1e-9 · max(1, |exact|),

  s the sample standard deviation, z = Φ⁻¹(1 − α / (2B)), α = 0.001: a
  two-sided 99.9 % bound, Bonferroni-corrected over the B points (the floor
  covers terms whose s is ~0 to round-off). Seeds are fixed: deterministic.
"""

from functools import cache
from math import sqrt
from statistics import NormalDist

import numpy as np
import pytest
from array_api_compat import array_namespace

from mlp_references import derivative_tensors, reference_params
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, PLAIN_LAYERS, with_layer_map
from sdze_core.operator_terms import (
    Drift,
    GradientNormPower,
    LinearCombination,
    MixedPartial,
    SubsetDiagonal,
    SubsetLaplacian,
)
from sdze_core.oracles import FirstDerivative, HutchinsonLaplacian, TraceOperator

jax = pytest.importorskip("jax", reason="the references are nested jax.jacfwd")
jax.config.update("jax_enable_x64", True)

D = 4  # three space coordinates and time, last
SPACE = (0, 1, 2)
B = 3
SIZES = (D, 12, 12, 1)
ALPHA = 1e-3
N_KEYS = 1000
RTOL = 1e-10


@cache
def numpy_params():
    return reference_params(SIZES, 21)


@cache
def points():
    return 0.5 * np.random.default_rng(2).standard_normal((B, D))


@cache
def tensors():
    """[u, ∇u, ∇²u, ∇³u, ∇⁴u] at the points, by nested jax.jacfwd."""
    return derivative_tensors(jax, numpy_params(), points(), 4)


def partial(index):
    """∂^k u/∂x_{i_1}⋯∂x_{i_k} at the points, from the nested-jacfwd tensor."""
    return tensors()[len(index)][(slice(None),) + tuple(j % D for j in index)]


def subset_diagonal(k, coordinates):
    return sum(partial((i,) * k) for i in coordinates)


def gradient_norm_power(c, coordinates=range(D)):
    return np.sum(tensors()[1][:, list(coordinates)] ** 2, axis=1) ** (c / 2)


def drift_field(x):
    """b(x) = (sin x_1, x_0 x_2, 1 + x_0, 0): a per-point drift with no time component."""
    xp = array_namespace(x)
    return xp.stack([xp.sin(x[:, 1]), x[:, 0] * x[:, 2], 1 + x[:, 0], 0 * x[:, 0]], axis=1)


def drift_reference(field=None):
    x = points()
    b = np.asarray(drift_field(x)) if field is None else np.broadcast_to(field, x.shape)
    return np.sum(b * tensors()[1], axis=1)


def sigma():
    """The factor of the diffusion matrix σσᵀ on space only (zero time row)."""
    s = np.random.default_rng(5).standard_normal((D, 2)) / 2
    s[-1] = 0
    return s


def setup(backend):
    b = backend.with_config(dtype="float64")
    params = [{k: b.asarray(a, dtype=b.dtype) for k, a in p.items()} for p in numpy_params()]
    return b, MLP(SIZES, "tanh"), params, b.asarray(points(), dtype=b.dtype)


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def hjb(b, sampled):
    """u_t + ½ tr(σσᵀ ∇²u) + b·∇u − ‖∇_x u‖^1.5 + 0.3 Δ_x u, and its reference."""
    s = b.asarray(sigma(), dtype=b.dtype)
    oracle = LinearCombination(
        (
            (1.0, FirstDerivative(-1)),
            (0.5, TraceOperator(sigma=s, num_directions=2 if sampled else None)),
            (1.0, Drift(drift_field)),
            (-1.0, GradientNormPower(1.5, SPACE)),
            (0.3, SubsetLaplacian(SPACE, 1 if sampled else None)),
        )
    )
    reference = (
        partial((-1,))
        + 0.5 * np.einsum("ij,bij->b", sigma() @ sigma().T, tensors()[2])
        + drift_reference()
        - gradient_norm_power(1.5, SPACE)
        + 0.3 * subset_diagonal(2, SPACE)
    )
    return oracle, reference


MIXED = [(1,), (-1,), (0, 2), (3, 3), (-1, 0), (0, 1, 2), (0, 0, 1), (2, 2, 2),
         (0, 1, 2, 3), (1, 1, 2, 2), (0, 0, 0, 3), (3, 1, 3, 1)]  # fmt: skip


def exact_terms(b):
    """name -> (deterministic oracle, reference at the points)."""
    constant = np.array([0.3, -1.2, 0.7, 0.0])
    cases = {
        "subset-laplacian": (SubsetLaplacian(SPACE), subset_diagonal(2, SPACE)),
        "subset-laplacian-all-sampled": (SubsetLaplacian(SPACE, 3), subset_diagonal(2, SPACE)),
        "subset-diagonal-3": (SubsetDiagonal(3, (0, -1)), subset_diagonal(3, (0, 3))),
        "subset-diagonal-4-all-sampled": (SubsetDiagonal(4, (2, 1), 2), subset_diagonal(4, (1, 2))),
        "drift-field": (Drift(drift_field), drift_reference()),
        "drift-constant": (Drift(b.asarray(constant, dtype=b.dtype)), drift_reference(constant)),
        "gradient-norm-2": (GradientNormPower(2.0), gradient_norm_power(2.0)),
        "gradient-norm-1.5-space": (GradientNormPower(1.5, SPACE), gradient_norm_power(1.5, SPACE)),
        "gradient-norm-3": (GradientNormPower(3), gradient_norm_power(3)),
        "hjb": hjb(b, sampled=False),
    }
    cases.update({f"mixed-{index}": (MixedPartial(index), partial(index)) for index in MIXED})
    return cases


EXACT = [
    "subset-laplacian", "subset-laplacian-all-sampled", "subset-diagonal-3",
    "subset-diagonal-4-all-sampled", "drift-field", "drift-constant", "gradient-norm-2",
    "gradient-norm-1.5-space", "gradient-norm-3", "hjb",
] + [f"mixed-{index}" for index in MIXED]  # fmt: skip


@pytest.mark.parametrize("name", EXACT)
def test_exact_terms_match_nested_autodiff(backend, name):
    b, model, params, x = setup(backend)
    oracle, reference = exact_terms(b)[name]
    out = oracle(model, params, x, key(0))
    assert_close(b.to_host(out.u), tensors()[0])
    assert_close(b.to_host(out.value), reference)


# -- unbiasedness -----------------------------------------------------------------------------


def sampled_terms(b):
    """name -> (random oracle, exact value at the points)."""
    hjb_oracle, hjb_reference = hjb(b, sampled=True)
    return {
        "subset-laplacian-1": (SubsetLaplacian(SPACE, 1), subset_diagonal(2, SPACE)),
        "subset-diagonal-4-2": (SubsetDiagonal(4, (0, 1, -1), 2), subset_diagonal(4, (0, 1, 3))),
        "hjb-sampled": (hjb_oracle, hjb_reference),
        "laplacian-minus-hutchinson": (
            LinearCombination(
                ((2.0, SubsetLaplacian(range(D), 2)), (-1.0, HutchinsonLaplacian(1)))
            ),
            subset_diagonal(2, range(D)),
        ),
    }


def run_keys(b, oracle, model, params, x, keys):
    """One estimate per key, (N, B) on the host; on jax under jit (eager dispatch is slow)."""

    def value(p, y, s):
        return oracle.estimate(model, p, y, s).value

    if b.name == "jax":
        value = b.jit(value)
    return np.stack([b.to_host(value(params, x, oracle.sample(k, x))) for k in keys])


@pytest.mark.parametrize(
    "name",
    ["subset-laplacian-1", "subset-diagonal-4-2", "hjb-sampled", "laplacian-minus-hutchinson"],
)
def test_sampled_terms_are_unbiased(backend, name):
    b, model, params, x = setup(backend)
    oracle, exact = sampled_terms(b)[name]
    keys = [fold_in(key(40), n) for n in range(N_KEYS)]
    values = run_keys(b, oracle, model, params, x, keys)
    assert values.std(axis=0, ddof=1).min() > 0, "the estimator should be random here"
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * B))
    bound = z * values.std(axis=0, ddof=1) / sqrt(N_KEYS) + 1e-9 * np.maximum(1, np.abs(exact))
    error = np.abs(values.mean(axis=0) - exact)
    assert np.all(error <= bound), f"mean misses the exact value: |error| {error} > bound {bound}"


def test_subset_samples_stay_in_the_subset(backend):
    b, _, _, x = setup(backend)
    oracle = SubsetLaplacian((0, -1), 1)
    drawn = {int(b.to_host(oracle.sample(fold_in(key(8), n), x))[0]) for n in range(64)}
    assert drawn == {0, D - 1}


def test_same_key_same_estimate_and_sample_then_estimate(backend):
    b, model, params, x = setup(backend)
    oracle, _ = hjb(b, sampled=True)
    first = oracle(model, params, x, key(9))
    again = oracle(model, params, x, key(9))
    split_up = oracle.estimate(model, params, x, oracle.sample(key(9), x))
    np.testing.assert_array_equal(b.to_host(first.value), b.to_host(again.value))
    np.testing.assert_array_equal(b.to_host(first.value), b.to_host(split_up.value))
    other = oracle(model, params, x, key(11))  # key(10)'s ξ equals key(9)'s up to sign
    assert not np.array_equal(b.to_host(first.value), b.to_host(other.value))


# -- a perturbed network is evaluated like any other ---------------------------------------


class AddDelta:
    """Layer map computing x (W + Δ)ᵀ without forming W + Δ, as a perturbation's would."""

    def __init__(self, deltas):
        self.deltas = deltas

    def affine(self, layer, p, x, is_primal):
        return PLAIN_LAYERS.affine(layer, p, x, is_primal) + x @ self.deltas[layer].T

    def columns(self, layer, p, index):
        delta = self.deltas[layer]
        return PLAIN_LAYERS.columns(layer, p, index) + array_namespace(delta).take(
            delta, index, axis=1
        )


@pytest.mark.parametrize("name", ["hjb-sampled", "subset-diagonal-4-2"])
def test_the_models_layer_map_reaches_the_terms(backend, name):
    b, model, params, x = setup(backend)
    oracle = sampled_terms(b)[name][0]
    rng = np.random.default_rng(7)
    deltas = [0.1 * rng.standard_normal(p["W"].shape) for p in numpy_params()]
    perturbed = with_layer_map(model, AddDelta([b.asarray(dl, dtype=b.dtype) for dl in deltas]))
    moved = [
        {"W": b.asarray(p["W"] + dl, dtype=b.dtype), "b": b.asarray(p["b"], dtype=b.dtype)}
        for p, dl in zip(numpy_params(), deltas, strict=True)
    ]
    sample = oracle.sample(key(4), x)
    mapped = oracle.estimate(perturbed, params, x, sample)
    direct = oracle.estimate(model, moved, x, sample)
    assert_close(b.to_host(mapped.value), b.to_host(direct.value), 1e-12)
    assert_close(b.to_host(mapped.u), b.to_host(direct.u), 1e-12)
