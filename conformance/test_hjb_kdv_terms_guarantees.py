"""Guarantee: HJB-LIN's and KdV's operator terms equal nested autodiff; the sampled one is unbiased.

The terms :class:`~sdze_core.operator_terms.PartialPowerSum` (Σ_{i∈S} |∂_i u|^c)
and :class:`~sdze_core.operator_terms.Convection` (u ∂_j u), alone and in
the operators of the built-ins ``hjb-lin`` and ``kdv``
(:mod:`sdze_core.hjb_kdv_problems`), on a space-time point (x_0, x_1, x_2, t),
time last, and a tanh MLP in float64; the rules of
conformance/test_operator_terms_guarantees.py:

* exact values match nested ``jax.jacfwd`` (float64, NumPy copies of the
  parameters) to 1e-10 relative to max(1, |reference|), on every backend;
* unbiasedness: N = 1000 estimates from fold_in(key(40), n); at each of the
  B points |mean − exact| <= z s / √N + 1e-9 max(1, |exact|), z = Φ⁻¹(1 −
  α / (2B)), α = 0.001 (99.9 %, Bonferroni over the points);
* the mutation: the sampled sum without its |S| / V scale (the plain mean of
  the sampled terms) must fail that check; the unmutated term passes it.
"""

from functools import cache
from math import sqrt
from statistics import NormalDist

import numpy as np
import pytest

from mlp_references import derivative_tensors, reference_params
from sdze_core import operator_terms
from sdze_core.hjb_kdv_problems import HJBLin, KdV
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP
from sdze_core.operator_terms import Convection, LinearCombination, PartialPowerSum

jax = pytest.importorskip("jax", reason="the references are nested jax.jacfwd")
jax.config.update("jax_enable_x64", True)

D = 4  # three space coordinates and time, last
SPACE = (0, 1, 2)
B = 3
SIZES = (D, 12, 12, 1)
ALPHA = 1e-3
N_KEYS = 1000
RTOL = 1e-10
NU = 0.0025


@cache
def numpy_params():
    return reference_params(SIZES, 23)


@cache
def points():
    return 0.5 * np.random.default_rng(3).standard_normal((B, D))


@cache
def tensors():
    """[u, ∇u, ∇²u, ∇³u] at the points, by nested jax.jacfwd."""
    return derivative_tensors(jax, numpy_params(), points(), 3)


def power_sum(c, coordinates):
    return np.sum(np.abs(tensors()[1][:, list(coordinates)]) ** c, axis=1)


def setup(backend):
    b = backend.with_config(dtype="float64")
    params = [{k: b.asarray(a, dtype=b.dtype) for k, a in p.items()} for p in numpy_params()]
    return b, MLP(SIZES, "tanh"), params, b.asarray(points(), dtype=b.dtype)


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def hjb_lin_reference():
    """u_t + Δ_x u − (1/3) Σ_{i<3} |u_i|^1.75 (HJB-LIN's operator on R³ × [0, 1])."""
    t = tensors()
    laplacian = sum(t[2][:, i, i] for i in SPACE)
    return t[1][:, -1] + laplacian - power_sum(1.75, SPACE) / len(SPACE)


def kdv_reference(j=0):
    """u_t + u u_j + ν u_jjj."""
    t = tensors()
    return t[1][:, -1] + t[0] * t[1][:, j] + NU * t[3][:, j, j, j]


def exact_terms(b):
    """name -> (deterministic oracle, reference at the points)."""
    return {
        "power-sum-1.75-space": (PartialPowerSum(1.75, SPACE), power_sum(1.75, SPACE)),
        "power-sum-3-all": (PartialPowerSum(3.0), power_sum(3.0, range(D))),
        "power-sum-1.5-all-sampled": (PartialPowerSum(1.5, (2, 0), 2), power_sum(1.5, (0, 2))),
        "convection-x0": (Convection(0), tensors()[0] * tensors()[1][:, 0]),
        "convection-t": (Convection(-1), tensors()[0] * tensors()[1][:, -1]),
        "hjb-lin-all-sampled": (HJBLin(len(SPACE), b).oracle(len(SPACE)), hjb_lin_reference()),
        # KdV's operator, on the first coordinate of this 4-input network: (x_0, ·, ·, t).
        "kdv": (KdV(b, nu=NU).oracle(), kdv_reference()),
    }


EXACT = [
    "power-sum-1.75-space", "power-sum-3-all", "power-sum-1.5-all-sampled", "convection-x0",
    "convection-t", "hjb-lin-all-sampled", "kdv",
]  # fmt: skip


@pytest.mark.parametrize("name", EXACT)
def test_exact_terms_match_nested_autodiff(backend, name):
    b, model, params, x = setup(backend)
    oracle, reference = exact_terms(b)[name]
    out = oracle(model, params, x, key(0))
    assert_close(b.to_host(out.u), tensors()[0])
    assert_close(b.to_host(out.value), reference)


# -- unbiasedness, and a mutation it catches -----------------------------------------------


def sampled_terms(b):
    """name -> (random oracle, exact value at the points)."""
    return {
        "power-sum-1": (PartialPowerSum(1.75, SPACE, 1), power_sum(1.75, SPACE)),
        "power-sum-2-of-4": (PartialPowerSum(1.25, None, 2), power_sum(1.25, range(D))),
        "hjb-lin-1": (HJBLin(len(SPACE), b).oracle(1), hjb_lin_reference()),
    }


def run_keys(b, oracle, model, params, x, keys):
    """One estimate per key, (N, B) on the host; on jax under jit (eager dispatch is slow)."""

    def value(p, y, s):
        return oracle.estimate(model, p, y, s).value

    if b.name == "jax":
        value = b.jit(value)
    return np.stack([b.to_host(value(params, x, oracle.sample(k, x))) for k in keys])


def check_unbiased(values, exact):
    """|mean − exact| within the 99.9 % Bonferroni bound at every point (module docstring)."""
    assert values.std(axis=0, ddof=1).min() > 0, "the estimator should be random here"
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * B))
    bound = z * values.std(axis=0, ddof=1) / sqrt(N_KEYS) + 1e-9 * np.maximum(1, np.abs(exact))
    error = np.abs(values.mean(axis=0) - exact)
    assert np.all(error <= bound), f"mean misses the exact value: |error| {error} > bound {bound}"


def sampled_values(backend, name):
    b, model, params, x = setup(backend)
    oracle, exact = sampled_terms(b)[name]
    keys = [fold_in(key(40), n) for n in range(N_KEYS)]
    return run_keys(b, oracle, model, params, x, keys), exact


@pytest.mark.parametrize("name", ["power-sum-1", "power-sum-2-of-4", "hjb-lin-1"])
def test_sampled_terms_are_unbiased(backend, name):
    check_unbiased(*sampled_values(backend, name))


def test_mutation_unscaled_sample_breaks_unbiasedness(backend, monkeypatch):
    """The mean of the V sampled terms instead of (|S| / V) times their sum:
    it estimates the mean of the |S| terms, not their sum."""
    estimate = operator_terms.PartialPowerSum.estimate

    def unscaled(self, model, params, x, sample):
        out = estimate(self, model, params, x, sample)
        size = len(self.coordinates) if self.coordinates is not None else x.shape[1]
        return out._replace(value=out.value / size)

    monkeypatch.setattr(operator_terms.PartialPowerSum, "estimate", unscaled)
    with pytest.raises(AssertionError):
        check_unbiased(*sampled_values(backend, "power-sum-1"))


def test_same_key_same_estimate_and_sample_then_estimate(backend):
    b, model, params, x = setup(backend)
    oracle = HJBLin(len(SPACE), b).oracle(1)
    first = oracle(model, params, x, key(9))
    again = oracle(model, params, x, key(9))
    split_up = oracle.estimate(model, params, x, oracle.sample(key(9), x))
    np.testing.assert_array_equal(b.to_host(first.value), b.to_host(again.value))
    np.testing.assert_array_equal(b.to_host(first.value), b.to_host(split_up.value))
    assert isinstance(oracle, LinearCombination)
