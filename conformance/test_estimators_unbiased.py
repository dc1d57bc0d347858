"""Guarantee: every spatial estimator is unbiased, and the exact ones equal nested autodiff.

Jet oracles (docs/method.md#oracles): exact values, unbiasedness, determinism,
residual losses. Exact oracles match the references to 1e-10 relative to
max(1, |reference|) in float64 (``RTOL``).

References are the derivative tensors ∂^k u (k <= 4) of the same networks,
computed by nested ``jax.jacfwd`` in float64 on NumPy copies of the
parameters, whatever the backend under test.

Unbiasedness pattern (:func:`assert_unbiased`): N estimates from the keys
fold_in(key(seed), n), n < N; at each of the B points,

    |mean − exact| <= z · s / √N + 1e-9 · max(1, |exact|),

with s the sample standard deviation and z = Φ⁻¹(1 − α / (2B)), α = 0.001:
a two-sided 99.9% bound, Bonferroni-corrected over the B points (the small
absolute floor covers estimators whose s is ~0 to round-off). Seeds are
fixed, so every test is deterministic.
"""

import dataclasses
from functools import cache
from math import sqrt
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from array_api_compat import array_namespace

from sdze.testing import SpyLayers
from sdze_core.keys import fold_in, key, split
from sdze_core.models import MLP, PLAIN_LAYERS, Ansatz, with_layer_map
from sdze_core.oracles import (
    DenseBiharmonic,
    ExactBiharmonic,
    ExactDiagonal,
    ExactLaplacian,
    FirstDerivative,
    HutchinsonLaplacian,
    OperatorEstimate,
    Oracle,
    SparseBiharmonic,
    SparseDiagonal,
    SparseGradientNormSquared,
    SparseLaplacian,
    TraceOperator,
    residual,
    squared_residual_loss,
)

jax.config.update("jax_enable_x64", True)

B = 3  # points per batch
ALPHA = 1e-3  # two-sided, before the Bonferroni correction over the B points
N_KEYS = 1000  # keys per unbiasedness test
RTOL = 1e-10  # exact oracles against jax, relative to max(1, |reference|)

#: name -> (d, model factory, activation as a jax function, boundary or None)
MODELS = {
    "ball": (5, lambda: Ansatz(MLP((5, 16, 16, 1), "tanh"), "ball"), jnp.tanh, "ball"),
    "mlp": (6, lambda: MLP((6, 16, 16, 1), "sin"), jnp.sin, None),
}


# -- the networks, their parameters and jax references -------------------------------------


@cache
def numpy_params(name):
    d = MODELS[name][0]
    sizes = (d, 16, 16, 1)
    rng = np.random.default_rng(10 + d)
    return tuple(
        {
            "W": rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / (n_in + n_out)),
            "b": 0.1 * rng.standard_normal(n_out),
        }
        for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True)
    )


@cache
def points(name):
    return 0.4 * np.random.default_rng(1).standard_normal((B, MODELS[name][0]))


@cache
def sigma(d):
    """A factor σ of shape (d, 3) for tr(σσᵀ ∇²u)."""
    return np.random.default_rng(3).standard_normal((d, 3)) / sqrt(d)


@cache
def indefinite(d):
    """A symmetric matrix with eigenvalues of both signs."""
    m = np.random.default_rng(4).standard_normal((d, d))
    a = (m + m.T) / 2
    eig = np.linalg.eigvalsh(a)
    assert eig[0] < 0 < eig[-1]
    return a


@cache
def tensors(name):
    """[u, ∇u, ∇²u, ∇³u, ∇⁴u] at the points: shapes (B,), (B, d), ..., (B, d, d, d, d)."""
    params = numpy_params(name)
    _, _, phi, boundary = MODELS[name]

    def u(x):
        h = x
        for layer, p in enumerate(params):
            h = h @ p["W"].T + p["b"]
            if layer < len(params) - 1:
                h = phi(h)
        return h[0] if boundary is None else (1 - x @ x) * h[0]

    fns = [u]
    for _ in range(4):
        fns.append(jax.jacfwd(fns[-1]))
    x = jnp.asarray(points(name))
    return [np.asarray(jax.vmap(f)(x)) for f in fns]


def diagonal_sum(name, k):
    """Σ_i ∂^k u/∂x_i^k at the points."""
    T = tensors(name)[k]
    d = T.shape[-1]
    return sum(T[(slice(None),) + (i,) * k] for i in range(d))


def laplacian(name):
    return diagonal_sum(name, 2)


def biharmonic(name):
    return np.einsum("biijj->b", tensors(name)[4])


def trace(name, a):
    return np.einsum("ij,bij->b", a, tensors(name)[2])


def setup(backend, name):
    """(float64 backend, model, params, points) for a model of :data:`MODELS`."""
    b = backend.with_config(dtype="float64")
    params = [{k: b.asarray(a, dtype=b.dtype) for k, a in p.items()} for p in numpy_params(name)]
    return b, MODELS[name][1](), params, b.asarray(points(name), dtype=b.dtype)


def assert_close(actual, expected, rtol=RTOL):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


# -- the oracles under test -------------------------------------------------------------


def exact_oracles(b, d):
    """name -> (deterministic oracle, reference function of the model name)."""
    s, a = b.asarray(sigma(d), dtype=b.dtype), b.asarray(indefinite(d), dtype=b.dtype)
    psd = b.asarray(sigma(d) @ sigma(d).T, dtype=b.dtype)
    return {
        "laplacian": (ExactLaplacian(), laplacian),
        "diagonal-1": (ExactDiagonal(1), lambda n: diagonal_sum(n, 1)),
        "diagonal-3": (ExactDiagonal(3), lambda n: diagonal_sum(n, 3)),
        "diagonal-4": (ExactDiagonal(4), lambda n: diagonal_sum(n, 4)),
        "biharmonic": (ExactBiharmonic(), biharmonic),
        "trace-sigma": (TraceOperator(sigma=s), lambda n: trace(n, sigma(d) @ sigma(d).T)),
        "trace-symmetric": (TraceOperator(A=a), lambda n: trace(n, indefinite(d))),
        "trace-psd": (TraceOperator(A=psd), lambda n: trace(n, sigma(d) @ sigma(d).T)),
        "derivative": (FirstDerivative(-1), lambda n: tensors(n)[1][:, d - 1]),
        "derivatives": (FirstDerivative([0, 2, -1]), lambda n: tensors(n)[1][:, [0, 2, d - 1]].T),
        # The sparse estimators are exact when they sample every coordinate (pair).
        "sparse-laplacian-all": (SparseLaplacian(d), laplacian),
        "sparse-diagonal-all": (SparseDiagonal(3, d), lambda n: diagonal_sum(n, 3)),
        "sparse-biharmonic-all": (SparseBiharmonic(d * (d - 1) // 2), biharmonic),
        "gradient-norm-all": (
            SparseGradientNormSquared(d),
            lambda n: np.sum(tensors(n)[1] ** 2, axis=1),
        ),
    }


def random_oracles(b, d):
    """name -> (random oracle, reference, whether its samples are dense tangents)."""
    s, a = b.asarray(sigma(d), dtype=b.dtype), b.asarray(indefinite(d), dtype=b.dtype)
    return {
        "sparse-laplacian": (SparseLaplacian(2), laplacian, False),
        "hutchinson-rademacher": (HutchinsonLaplacian(2), laplacian, True),
        "hutchinson-gaussian": (HutchinsonLaplacian(2, "gaussian"), laplacian, True),
        "sparse-diagonal-3": (SparseDiagonal(3, 2), lambda n: diagonal_sum(n, 3), False),
        "sparse-diagonal-4": (SparseDiagonal(4, 3), lambda n: diagonal_sum(n, 4), False),
        "dense-biharmonic": (DenseBiharmonic(4), biharmonic, True),
        "sparse-biharmonic": (SparseBiharmonic(3), biharmonic, False),
        "trace-sigma": (
            TraceOperator(sigma=s, num_directions=2),
            lambda n: trace(n, sigma(d) @ sigma(d).T),
            True,
        ),
        "trace-symmetric": (
            TraceOperator(A=a, num_directions=2, distribution="gaussian"),
            lambda n: trace(n, indefinite(d)),
            True,
        ),
        "gradient-norm": (
            SparseGradientNormSquared(2),
            lambda n: np.sum(tensors(n)[1] ** 2, axis=1),
            False,
        ),
    }


EXACT = [
    "laplacian", "diagonal-1", "diagonal-3", "diagonal-4", "biharmonic", "trace-sigma",
    "trace-symmetric", "trace-psd", "derivative", "derivatives", "sparse-laplacian-all",
    "sparse-diagonal-all", "sparse-biharmonic-all", "gradient-norm-all",
]  # fmt: skip
RANDOM = [
    "sparse-laplacian", "hutchinson-rademacher", "hutchinson-gaussian", "sparse-diagonal-3",
    "sparse-diagonal-4", "dense-biharmonic", "sparse-biharmonic", "trace-sigma",
    "trace-symmetric", "gradient-norm",
]  # fmt: skip


def run_keys(b, oracle, model, params, x, keys):
    """One estimate per key, (N, B) on the host.

    Many keys on jax run under jax.jit: its eager dispatch is slow.
    """

    def value(p, y, s):
        return oracle.estimate(model, p, y, s).value

    if b.name == "jax" and len(keys) > 100:
        value = b.jit(value)
    return np.stack([b.to_host(value(params, x, oracle.sample(k, x))) for k in keys])


def stacked_keys(b, oracle, model, params, x, keys, chunk=500):
    """The same as :func:`run_keys` for dense-tangent oracles, ``chunk`` keys per call.

    The tangents drawn from each key are given per point, (V, n·B, m), for
    n copies of the batch: the oracles accept per-point tangents.
    """
    xp = b.xp
    batch, d = x.shape
    values = []
    for start in range(0, len(keys), chunk):
        part = keys[start : start + chunk]
        n = len(part)
        draws = xp.stack([oracle.sample(k, x) for k in part], axis=1)  # (V, n, m)
        V, m = draws.shape[0], draws.shape[-1]
        tangents = xp.broadcast_to(draws[:, :, None, :], (V, n, batch, m))
        copies = xp.broadcast_to(x[None, ...], (n, batch, d))
        out = oracle.estimate(
            model,
            params,
            xp.reshape(copies, (n * batch, d)),
            xp.reshape(tangents, (V, n * batch, m)),
        )
        values.append(np.reshape(b.to_host(out.value), (n, batch)))
    return np.concatenate(values)


def estimates(b, case, model, params, x, keys):
    oracle, _, dense = case
    run = stacked_keys if dense else run_keys
    return run(b, oracle, model, params, x, keys)


def unbiased_bound(values):
    """z s / √N per point, the 99.9% two-sided bound Bonferroni-corrected over the points."""
    n, points_ = values.shape
    z = NormalDist().inv_cdf(1 - ALPHA / (2 * points_))
    return z * values.std(axis=0, ddof=1) / sqrt(n)


def assert_unbiased(values, exact):
    """|mean − exact| <= z s / √N + 1e-9 max(1, |exact|) at every point (see the module doc)."""
    exact = np.asarray(exact)
    error = np.abs(values.mean(axis=0) - exact)
    bound = unbiased_bound(values) + 1e-9 * np.maximum(1.0, np.abs(exact))
    assert np.all(error <= bound), f"mean misses the exact value: |error| {error} > bound {bound}"


def keys_from(seed, n=N_KEYS):
    return [fold_in(key(seed), i) for i in range(n)]


# -- exact oracles --------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("name", EXACT)
def test_exact_oracles_match_jax(backend, name, model_name):
    b, model, params, x = setup(backend, model_name)
    oracle, reference = exact_oracles(b, x.shape[1])[name]
    out = oracle(model, params, x, key(0))
    assert isinstance(out, OperatorEstimate)
    assert_close(b.to_host(out.u), tensors(model_name)[0])
    assert_close(b.to_host(out.value), reference(model_name))


def test_first_derivative_shapes(backend):
    b, model, params, x = setup(backend, "ball")
    assert tuple(FirstDerivative(2)(model, params, x, key(0)).value.shape) == (B,)
    assert tuple(FirstDerivative((2,))(model, params, x, key(0)).value.shape) == (1, B)
    assert tuple(FirstDerivative([4, 0])(model, params, x, key(0)).value.shape) == (2, B)


# -- random oracles: unbiased -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", RANDOM)
def test_random_oracle_is_unbiased(backend, name):
    """The mean over N_KEYS keys is within the 99.9% bound of the exact operator."""
    b, model, params, x = setup(backend, "ball")
    case = random_oracles(b, x.shape[1])[name]
    values = estimates(b, case, model, params, x, keys_from(100))
    assert np.all(values.std(axis=0) > 1e-6), "the estimator should be random"
    assert_unbiased(values, case[1]("ball"))


@pytest.mark.slow
def test_dense_biharmonic_with_rademacher_tangents_is_biased(backend):
    """E[ξ_i⁴] = 1 for Rademacher ξ (3 for Gaussian), so (1/3) E D⁴u[ξ] = Δ²u − (2/3) Σ_i u_iiii."""
    b, model, params, x = setup(backend, "ball")
    oracle = DenseBiharmonic(32, distribution="rademacher")
    values = stacked_keys(b, oracle, model, params, x, keys_from(200, 2 * N_KEYS))
    exact = biharmonic("ball")
    predicted = exact - (2 / 3) * diagonal_sum("ball", 4)
    assert_unbiased(values, predicted)
    # Far outside the bound: more than 10 standard errors s/√N (the bound is about 3.4).
    standard_error = values.std(axis=0, ddof=1) / sqrt(values.shape[0])
    assert np.all(np.abs(values.mean(axis=0) - exact) > 10 * standard_error)


@pytest.mark.slow
def test_sparse_laplacian_variance_formula(backend):
    """Var = d² σ² (d − V) / (V (d − 1)), σ² the population variance of the u_ii."""
    b, model, params, x = setup(backend, "ball")
    d, V = x.shape[1], 2
    values = run_keys(b, SparseLaplacian(V), model, params, x, keys_from(300))
    diag = np.einsum("bii->bi", tensors("ball")[2])
    predicted = d**2 * diag.var(axis=1) * (d - V) / (V * (d - 1))
    np.testing.assert_allclose(values.var(axis=0, ddof=1), predicted, rtol=0.15)


# -- determinism, sample/estimate, collapse ---------------------------------------------------


@pytest.mark.parametrize("name", RANDOM)
def test_same_key_same_estimate(backend, name):
    b, model, params, x = setup(backend, "ball")
    case = random_oracles(b, x.shape[1])[name]
    oracle = case[0]
    first = oracle(model, params, x, key(7))
    again = oracle(model, params, x, key(7))
    others = [oracle(model, params, x, key(8 + i)).value for i in range(4)]
    split_call = oracle.estimate(model, params, x, oracle.sample(key(7), x))
    for out in (again, split_call):
        np.testing.assert_array_equal(b.to_host(out.value), b.to_host(first.value))
        np.testing.assert_array_equal(b.to_host(out.u), b.to_host(first.u))
    # Small sample spaces (e.g. 2 of 5 coordinates) can repeat a draw, but not four times.
    assert not all(np.allclose(b.to_host(v), b.to_host(first.value)) for v in others)
    # The vectorised evaluation used by the statistical tests is the per-key one.
    keys = keys_from(9, 3)
    looped = run_keys(b, oracle, model, params, x, keys)
    assert_close(estimates(b, case, model, params, x, keys), looped, 1e-12)
    assert_close(looped[0], b.to_host(oracle(model, params, x, keys[0]).value), 1e-12)


COLLAPSIBLE = [
    "sparse-laplacian", "hutchinson-rademacher", "sparse-diagonal-3", "dense-biharmonic",
    "sparse-biharmonic", "trace-symmetric",
]  # fmt: skip


@pytest.mark.parametrize("name", COLLAPSIBLE)
def test_collapsed_equals_uncollapsed(backend, name):
    b, model, params, x = setup(backend, "mlp")
    oracle = dataclasses.replace(random_oracles(b, x.shape[1])[name][0], collapse=True)
    full = dataclasses.replace(oracle, collapse=False)
    sample = oracle.sample(key(5), x)
    summed = oracle.estimate(model, params, x, sample)
    plain = full.estimate(model, params, x, sample)
    assert_close(b.to_host(summed.value), b.to_host(plain.value), 1e-12)
    assert_close(b.to_host(summed.u), b.to_host(plain.u), 1e-12)


@pytest.mark.parametrize(
    "oracle", [ExactLaplacian, ExactBiharmonic, lambda **kw: ExactDiagonal(3, **kw)]
)
def test_exact_collapsed_equals_uncollapsed(backend, oracle):
    b, model, params, x = setup(backend, "ball")
    summed = oracle()(model, params, x, key(0))
    plain = oracle(collapse=False)(model, params, x, key(0))
    assert_close(b.to_host(summed.value), b.to_host(plain.value), 1e-12)


def test_orders_and_float32(backend):
    """order is the jet order; float32 models give float32 estimates."""
    assert SparseLaplacian().order == HutchinsonLaplacian().order == ExactLaplacian().order == 2
    assert DenseBiharmonic().order == SparseBiharmonic().order == ExactBiharmonic().order == 4
    assert SparseDiagonal(3).order == ExactDiagonal(5).order - 2 == 3
    assert FirstDerivative(0).order == SparseGradientNormSquared().order == 1
    assert isinstance(SparseLaplacian(), Oracle)
    model = MODELS["ball"][1]()
    params = model.init(key(0), backend)
    x = 0.3 * backend.normal(key(1), (B, 5))
    out = SparseLaplacian(3)(model, params, x, key(2))
    assert out.value.dtype == backend.xp.float32 and tuple(out.value.shape) == (B,)


# -- costs: coordinate directions are gathers; a model's layer map is honoured ----------------


@pytest.mark.parametrize(
    "oracle",
    [
        SparseLaplacian(2),
        SparseDiagonal(4, 3),
        SparseGradientNormSquared(2),
        FirstDerivative([1, 3]),
    ],
)
def test_coordinate_oracles_only_gather_first_layer_columns(backend, oracle):
    """No (V, d) one-hot: the first layer sees x once (the primal) and gathers V columns."""
    b, model, params, x = setup(backend, "ball")
    spy = SpyLayers()
    out = oracle(with_layer_map(model, spy), params, x, key(3))
    assert [c for c in spy.calls if c[0] == 0] == [(0, True, (B, 5))]
    assert spy.column_calls == [(0, (2 if not isinstance(oracle, SparseDiagonal) else 3,))]
    plain = oracle(model, params, x, key(3))
    np.testing.assert_array_equal(b.to_host(out.value), b.to_host(plain.value))


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


@pytest.mark.parametrize("name", ["sparse-laplacian", "dense-biharmonic", "sparse-biharmonic"])
def test_the_models_layer_map_reaches_the_jets(backend, name):
    """An oracle evaluates a model with a perturbed network as that network: the
    estimate equals the one at the explicitly moved weights."""
    b, model, params, x = setup(backend, "ball")
    oracle = random_oracles(b, x.shape[1])[name][0]
    rng = np.random.default_rng(7)
    deltas = [0.1 * rng.standard_normal(p["W"].shape) for p in numpy_params("ball")]
    perturbed = with_layer_map(model, AddDelta([b.asarray(dl, dtype=b.dtype) for dl in deltas]))
    moved = [
        {"W": b.asarray(p["W"] + dl, dtype=b.dtype), "b": b.asarray(p["b"], dtype=b.dtype)}
        for p, dl in zip(numpy_params("ball"), deltas, strict=True)
    ]
    sample = oracle.sample(key(4), x)
    mapped = oracle.estimate(perturbed, params, x, sample)
    direct = oracle.estimate(model, moved, x, sample)
    assert_close(b.to_host(mapped.value), b.to_host(direct.value), 1e-12)
    assert_close(b.to_host(mapped.u), b.to_host(direct.u), 1e-12)


@pytest.mark.parametrize("d", [5, 6])
def test_sparse_biharmonic_samples_distinct_unordered_pairs(backend, d):
    b = backend.with_config(dtype="float64")
    x = b.zeros((1, d))
    every = d * (d - 1) // 2
    i, k = (b.to_host(a) for a in SparseBiharmonic(every).sample(key(0), x))
    pairs = {tuple(sorted(p)) for p in zip(i.tolist(), k.tolist(), strict=True)}
    assert len(pairs) == every and all(a != c for a, c in pairs)
    i, k = (b.to_host(a) for a in SparseBiharmonic(4).sample(key(1), x))
    assert len({tuple(sorted(p)) for p in zip(i.tolist(), k.tolist(), strict=True)}) == 4


# -- residual losses ------------------------------------------------------------------------


def allen_cahn_rhs(u, x):
    """F(u, x) = f(x) − u + u³ with f(x) = Σ_i sin x_i: r = Δu + u − u³ − f."""
    xp = array_namespace(x)
    return xp.sum(xp.sin(x), axis=-1) - u + u**3


def test_residual_is_estimate_minus_rhs(backend):
    b, model, params, x = setup(backend, "ball")
    oracle = SparseLaplacian(2)
    r = residual(oracle, model, params, x, key(11), allen_cahn_rhs)
    out = oracle(model, params, x, key(11))
    assert_close(b.to_host(r), b.to_host(out.value - allen_cahn_rhs(out.u, x)), 1e-14)
    plain = squared_residual_loss(oracle, model, params, x, key(11), allen_cahn_rhs)
    assert tuple(plain.shape) == ()
    assert_close(b.to_host(plain), np.mean(b.to_host(r) ** 2), 1e-14)
    first, second = split(key(11))
    r1 = residual(oracle, model, params, x, first, allen_cahn_rhs)
    r2 = residual(oracle, model, params, x, second, allen_cahn_rhs)
    both = squared_residual_loss(oracle, model, params, x, key(11), allen_cahn_rhs, unbiased=True)
    assert_close(b.to_host(both), np.mean(b.to_host(r1) * b.to_host(r2)), 1e-14)


@pytest.mark.slow
def test_unbiased_and_plain_squared_residual(backend):
    """E[mean r̂₁ r̂₂] = mean r²; E[mean r̂²] = mean (r² + Var r̂): the plain loss is biased up.

    Allen–Cahn, Δu + u − u³ = f, with f chosen so that the exact residual at
    the points is a small known r (then the plain loss's bias, not the noise
    of its cross term 2 r (L̂u − Δu), dominates). Var r̂ is the sparse
    Laplacian's, d² σ² (d − V) / (V (d − 1)).
    """
    b, model, params, x = setup(backend, "ball")
    oracle, d, V = SparseLaplacian(2), x.shape[1], 2
    u = tensors("ball")[0]
    r = np.array([0.2, -0.1, 0.3])
    f = b.asarray(laplacian("ball") + u - u**3 - r, dtype=b.dtype)

    def rhs(u, x):
        return f - u + u**3

    diag = np.einsum("bii->bi", tensors("ball")[2])
    variance = d**2 * diag.var(axis=1) * (d - V) / (V * (d - 1))
    keys = keys_from(500, N_KEYS)
    unbiased, plain = (
        np.array(
            [
                [b.to_host(squared_residual_loss(oracle, model, params, x, k, rhs, flag))]
                for k in keys
            ]
        )
        for flag in (True, False)
    )
    assert_unbiased(unbiased, [np.mean(r**2)])
    assert_unbiased(plain, [np.mean(r**2 + variance)])
    assert plain.mean() - np.mean(r**2) > 5 * unbiased_bound(plain)[0]


# -- errors -------------------------------------------------------------------------------------


def test_errors(backend):
    b, model, params, x = setup(backend, "ball")  # d = 5
    for oracle in (SparseLaplacian(6), SparseDiagonal(3, 6), SparseGradientNormSquared(6)):
        with pytest.raises(ValueError, match="without replacement"):
            oracle(model, params, x, key(0))
    with pytest.raises(ValueError, match="pairs"):
        SparseBiharmonic(11)(model, params, x, key(0))
    for bad in (x[0, :], b.zeros((1, B, 5))):
        for oracle in (
            SparseLaplacian(2),
            ExactLaplacian(),
            HutchinsonLaplacian(),
            FirstDerivative(0),
        ):
            with pytest.raises(ValueError, match=r"shape \(B, d\)"):
                oracle(model, params, bad, key(0))
    for make in (HutchinsonLaplacian, DenseBiharmonic):
        with pytest.raises(ValueError, match="unknown distribution"):
            make(distribution="uniform")
    s = b.asarray(sigma(5), dtype=b.dtype)
    with pytest.raises(ValueError, match="unknown distribution"):
        TraceOperator(sigma=s, num_directions=2, distribution="cauchy")
    for count in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            SparseLaplacian(count)
    with pytest.raises(ValueError, match="positive int"):
        SparseDiagonal(0)
    with pytest.raises(ValueError, match="exactly one"):
        TraceOperator()
    with pytest.raises(ValueError, match="exactly one"):
        TraceOperator(sigma=s, A=s @ s.T)
    with pytest.raises(ValueError, match="symmetric"):
        TraceOperator(A=b.asarray(np.triu(np.ones((5, 5))), dtype=b.dtype))
    with pytest.raises(ValueError, match="dimensional"):
        TraceOperator(sigma=s[:4, :])(model, params, x, key(0))
    with pytest.raises(ValueError, match="out of range"):
        FirstDerivative(5)(model, params, x, key(0))
    with pytest.raises(ValueError, match="index"):
        FirstDerivative([])
