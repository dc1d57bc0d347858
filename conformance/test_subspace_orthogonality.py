"""Guarantee: low-rank perturbations live in an orthonormal subspace and have the
moments of docs/method.md#subspace-perturbations.

For every weight W (m × n) the sampler draws orthonormal U (m × r), V (n × r)
(r = min(rank, m, n)) and Z = c U S Vᵀ, S ~ N(0, I_{r×r}), c = sqrt(m n) / r;
biases get z_b ~ N(0, I_m). Checked on every backend:

* **Orthonormality** (deterministic): max |UᵀU − I| and max |VᵀV − I| are at
  round-off, ≤ 1e-12 in float64 and ≤ 1e-5 in float32, for weights of shape
  6 × 300 (r = 4 < min(m, n)), 10 × 2 (r = n = 2 < rank) and 1 × 10 (an
  output layer: r = m = 1 < rank) with rank 4, bases stored or regenerated
  from their key, at epoch 0 and after a refresh. Measured: ≤ 8.9e-16
  (float64), ≤ 5.4e-7 (float32).
* **Z lies in the subspace** (deterministic): ‖(I − UUᵀ)Z‖_F and
  ‖Z(I − VVᵀ)‖_F are ≤ tol · ‖Z‖_F (same tolerances), and Z = c U S Vᵀ
  entrywise, both for the dense ``perturbation`` and for the Z the forward
  pass applies (the sampler's layer map's matrix-free product applied to the identity).
  Measured: ≤ 7.4e-16 (float64), ≤ 4.6e-7 (float32).
* **Covariance**: with vec stacking columns, vec(U S Vᵀ) = (V ⊗ U) vec S, so
  E[vec Z vec Zᵀ] = Σ = c² (VVᵀ ⊗ UUᵀ), c² times an orthogonal projector of
  rank r² (checked: P² = P, tr P = r², tr Σ = m n). For m = 4, n = 5, r = 2
  (c² = 5), N = 40 000 draws of S with fixed bases, Z taken from the layer map,
  the empirical second moment Ĉ = (1/N) Σ_i vec Z_i vec Z_iᵀ (the mean is
  known to be 0) is compared with Σ entrywise: Z is Gaussian, so (Isserlis)
  Var(z_a z_b) = Σ_aa Σ_bb + Σ_ab² and each entry's standard error is
  se_ab = sqrt((Σ_aa Σ_bb + Σ_ab²) / N); the bound is |Ĉ_ab − Σ_ab| ≤ 5 se_ab
  (two-sided 5σ: p ≈ 6e-7 per entry, ≤ 1.2e-4 over the 210 distinct entries,
  a familywise confidence above 99.98 %). Measured max |Ĉ − Σ| / se = 1.7
  (numpy), 2.4 (array_api_strict), 1.7 (torch), 1.8 (jax). Ĉ lies in the
  projector's range at round-off (‖(I − P)Ĉ‖_F ≤ 1e-12 ‖Ĉ‖_F; measured
  ≤ 7.7e-16): every draw is in the subspace.
* **ZO estimate's moments**: a loss linear in the parameters of one layer
  (4 × 5 weight plus bias, B = 3 fixed points), ℓ(θ) = Σ_{b,j} C_bj (W x_b + b)_j
  evaluated by a one-layer model that the perturber perturbs, has the known gradient
  ∇_W ℓ = Cᵀ X, ∇_b ℓ = Cᵀ 1, and the central differences of
  :class:`CRNSPerturber` are exact on it (checked: g_i = z_iᵀ∇ℓ to 1e-9
  relative; measured ≤ 1.5e-14). With u = (vec S, z_b) ~ N(0, I_k),
  k = r² + m, the direction is z = B Λ u for the orthonormal
  B = blockdiag(V ⊗ U, I_m) and Λ = diag(c I_{r²}, I_m), so per query
  ĝ_i = g_i z_i has

      E[ĝ] = B Λ² Bᵀ ∇ℓ    (weights: c² UUᵀ ∇_W ℓ VVᵀ, bias: ∇_b ℓ),
      E‖ĝ‖² = tr(Λ²) ‖ΛBᵀ∇ℓ‖² + 2 ‖Λ²Bᵀ∇ℓ‖²,
      E‖ĝ_W‖² = (r² + 2) c⁴ ‖Bᵀ∇_W ℓ‖² + r² c² ‖∇_b ℓ‖²   (the weight block),

  which are the c² B Bᵀ∇ℓ and (k + 2) c⁴ ‖Bᵀ∇ℓ‖² of docs/method.md#subspace-perturbations
  when Λ = c I: with
  ∇_b ℓ = 0 (C centred) the weight block is the formula of docs/method.md verbatim with
  k = r² = 4; with ∇_b ℓ ≠ 0 the general forms are checked. N = 40 000
  queries (one ``draw``); the mean is ``sampler.project`` of all of them
  (the estimator the engine uses, with q = N). Bounds: every coordinate of
  the mean within 5 standard errors, and each second moment within 5
  standard errors, the standard errors estimated from the samples
  themselves (the same two-sided 5σ level; the samples g_i² ‖z_i‖² have
  finite variance, so the CLT applies). Measured: max coordinate error
  0.7–2.7 se; second moments within 0.4–1.5 % (0.3–1.3 se), their standard
  error being ≈ 1.1–1.2 % relative (bound ≈ 6 %).

The statistical tests run in float64 with fixed keys: deterministic.
"""

from dataclasses import dataclass
from math import sqrt
from typing import Any

import pytest
from array_api_compat import array_namespace

from sdze_core.keys import fold_in, key
from sdze_core.models import MLP
from sdze_core.perturbers import CRNSPerturber
from sdze_core.samplers import LowRankSubspace

np = pytest.importorskip("numpy")

#: Round-off tolerances of orthonormality and subspace membership.
TOL = {"float64": 1e-12, "float32": 1e-5}
#: Weight shapes with rank 4: r_l = 4 < min(m, n); 2 = n < rank; 1 = m < rank (1 × n).
SHAPES = ((6, 300), (10, 2), (1, 10))
RANK = 4
#: The small layer of the statistical tests.
M, N_IN, R, B = 4, 5, 2, 3
SAMPLES = 40_000
SIGMAS = 5.0


def host(b, x):
    return np.array(b.to_host(x))


def layers(b):
    """Parameters with the weight shapes of ``SHAPES`` (the sampler needs no chaining)."""
    return [
        {"W": b.normal(fold_in(key(0), layer), shape), "b": b.zeros((shape[0],))}
        for layer, shape in enumerate(SHAPES)
    ]


def applied_perturbations(b, sampler, state, directions, layer, params):
    """Z_k of one layer for every drawn query as the forward pass applies it.

    The sampler's layer map computes x (W + Δ_k)ᵀ matrix-free as
    x Wᵀ + ((x V) C_kᵀ) Uᵀ; with W = 0 and x = I_n its output is Δ_kᵀ = Z_kᵀ
    (scale s_k = 1). Returns (q, m, n).
    """
    q = directions.S[layer].shape[0]
    m, n = params[layer]["W"].shape
    layer_map = sampler.layer_map(state, directions, list(range(q)), [1.0] * q)
    zero = {"W": b.zeros((m, n)), "b": b.zeros((m,))}
    eye = b.asarray(np.eye(n), dtype=b.dtype)
    # The first layer adds the query axis; later layers take it in their input.
    x = eye if layer == 0 else b.xp.broadcast_to(eye, (q, n, n))
    y = layer_map.affine(layer, zero, x, False)  # (q, n, m)
    return np.transpose(host(b, y), (0, 2, 1))


# -- orthonormality and subspace membership (deterministic) -------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("store_bases", [True, False])
def test_bases_are_orthonormal(backend, dtype, store_bases):
    b = backend.with_config(dtype=dtype)
    tol = TOL[dtype]
    params = layers(b)
    sampler = LowRankSubspace(rank=RANK, refresh_every=2, store_bases=store_bases)
    state = sampler.init(key(1), params)
    assert (state.bases is None) == (not store_bases)
    shapes = []
    for step in range(3):  # epoch 0 and the refreshed epoch 1
        state, params, _ = sampler.refresh(state, params, step)
        for p, (U, V) in zip(params, sampler.bases(state, params), strict=True):
            m, n = p["W"].shape
            r = min(RANK, m, n)
            assert sampler.layer_rank((m, n)) == r
            assert U.shape == (m, r) and V.shape == (n, r)
            assert U.dtype == p["W"].dtype and V.dtype == p["W"].dtype
            U, V = host(b, U), host(b, V)
            assert np.max(np.abs(U.T @ U - np.eye(r))) <= tol
            assert np.max(np.abs(V.T @ V - np.eye(r))) <= tol
            shapes.append((m, n, r))
    assert set(shapes) == {(6, 300, 4), (10, 2, 2), (1, 10, 1)}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("store_bases", [True, False])
def test_perturbation_lies_in_the_subspace(backend, dtype, store_bases):
    b = backend.with_config(dtype=dtype)
    tol = TOL[dtype]
    params = layers(b)
    sampler = LowRankSubspace(rank=RANK, store_bases=store_bases)
    state = sampler.init(key(1), params)
    q = 3
    directions = sampler.draw(state, params, key(2), q)
    for layer, p in enumerate(params):
        m, n = p["W"].shape
        r = sampler.layer_rank((m, n))
        U, V = (host(b, a) for a in sampler.bases(state, params)[layer])
        S = host(b, directions.S[layer])
        c = directions.scale[layer]
        assert c == pytest.approx(sqrt(m * n) / r, rel=1e-15)
        through_map = applied_perturbations(b, sampler, state, directions, layer, params)
        for i in range(q):
            dense = host(b, sampler.perturbation(directions, layer, i))
            for Z in (dense, through_map[i]):
                norm = np.linalg.norm(Z)
                assert norm > 1e-3
                assert np.linalg.norm((np.eye(m) - U @ U.T) @ Z) <= tol * norm
                assert np.linalg.norm(Z @ (np.eye(n) - V @ V.T)) <= tol * norm
                assert np.max(np.abs(Z - c * U @ S[i] @ V.T)) <= tol * max(1.0, norm)


# -- covariance of vec Z (Monte Carlo) -----------------------------------------------------


def small_layer(b):
    return MLP((N_IN, M)).init(key(10), b)


def test_covariance_is_c2_times_the_subspace_projector(backend):
    b = backend.with_config(dtype="float64")
    params = small_layer(b)
    sampler = LowRankSubspace(rank=R)
    state = sampler.init(key(11), params)
    directions = sampler.draw(state, params, key(12), SAMPLES)
    U, V = (host(b, a) for a in sampler.bases(state, params)[0])
    c = directions.scale[0]
    assert c * c == pytest.approx(M * N_IN / R**2, rel=1e-14)

    Z = applied_perturbations(b, sampler, state, directions, 0, params)  # (N, m, n)
    # Column-stacking vec: vec(Z)[j m + i] = Z[i, j], so vec(U S Vᵀ) = (V ⊗ U) vec S.
    vecZ = np.reshape(np.transpose(Z, (0, 2, 1)), (SAMPLES, M * N_IN))
    S = host(b, directions.S[0])
    vecS = np.reshape(np.transpose(S, (0, 2, 1)), (SAMPLES, R * R))
    np.testing.assert_allclose(vecZ, c * vecS @ np.kron(V, U).T, rtol=0, atol=1e-12 * c)

    P = np.kron(V @ V.T, U @ U.T)
    np.testing.assert_allclose(P @ P, P, rtol=0, atol=1e-13)  # an orthogonal projector
    assert np.trace(P) == pytest.approx(R * R, rel=1e-13)  # of rank r²
    sigma = c * c * P
    assert np.trace(sigma) == pytest.approx(M * N_IN, rel=1e-13)  # E‖Z‖_F² = m n

    empirical = vecZ.T @ vecZ / SAMPLES
    d = np.diag(sigma)
    se = np.sqrt((np.outer(d, d) + sigma**2) / SAMPLES)
    z_scores = np.abs(empirical - sigma) / se
    assert np.max(z_scores) <= SIGMAS, np.max(z_scores)
    # Every draw is in the subspace, so Ĉ is in the projector's range at round-off.
    eye = np.eye(M * N_IN)
    assert np.linalg.norm((eye - P) @ empirical) <= 1e-12 * np.linalg.norm(empirical)


# -- moments of the ZO estimate -------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LinearLoss:
    """ℓ(θ) = Σ_{b,j} C_bj (x_b Wᵀ + b)_j for fixed X (B × n), C (B × m), with
    ``model`` the one affine layer x ↦ x Wᵀ + b (the perturber puts the perturbed
    one in its place): ∇_W ℓ = Cᵀ X, ∇_b ℓ = Cᵀ 1, and central differences are
    exact (up to round-off) for a linear ℓ."""

    model: Any
    X: Any
    C: Any

    def sample(self, k):
        return None  # no spatial randomness

    def __call__(self, params, xi):
        y = self.model.apply(params, self.X)  # (B, m), or (Q, B, m) perturbed
        return array_namespace(y).sum(y * self.C, axis=(-2, -1))


def standard_errors(samples):
    """The standard error of each coordinate's sample mean, from the samples."""
    return np.sqrt(np.var(samples, axis=0, ddof=1) / samples.shape[0])


@pytest.mark.parametrize("bias_gradient", [False, True], ids=["weights-only", "weights+bias"])
def test_zo_estimate_moments(backend, bias_gradient):
    b = backend.with_config(dtype="float64")
    params = small_layer(b)
    params = [{"W": params[0]["W"], "b": 0.1 * b.normal(key(13), (M,))}]
    rng = np.random.default_rng(14)
    X = rng.normal(size=(B, N_IN))
    C = rng.normal(size=(B, M))
    if not bias_gradient:
        C -= C.mean(axis=0)  # ∇_b ℓ = Cᵀ1 = 0
    grad_W, grad_b = C.T @ X, C.sum(axis=0)
    one_layer = MLP((N_IN, M))  # no activation: y = x Wᵀ + b
    loss = LinearLoss(one_layer, b.asarray(X, dtype=b.dtype), b.asarray(C, dtype=b.dtype))

    sampler = LowRankSubspace(rank=R)
    state = sampler.init(key(15), params)
    directions = sampler.draw(state, params, key(16), SAMPLES)
    perturber = CRNSPerturber(eps=1e-2, num_queries=SAMPLES)
    g = perturber.estimate(loss, params, sampler, state, directions, key(17)).g

    U, V = (host(b, a) for a in sampler.bases(state, params)[0])
    c = directions.scale[0]
    S, zb, gh = host(b, directions.S[0]), host(b, directions.bias[0]), host(b, g)
    Z = c * np.einsum("ia,qab,jb->qij", U, S, V)
    # The linear loss makes the central difference exact: g_i = z_iᵀ∇ℓ.
    exact = np.einsum("qij,ij->q", Z, grad_W) + zb @ grad_b
    np.testing.assert_allclose(gh, exact, rtol=0, atol=1e-9 * np.max(np.abs(exact)))

    # Per-query estimates ĝ_i = g_i z_i (weights flattened, then the bias).
    samples = np.concatenate([gh[:, None] * np.reshape(Z, (SAMPLES, -1)), gh[:, None] * zb], axis=1)

    # First moment: E[ĝ] = B Λ² Bᵀ∇ℓ, through sampler.project (the mean of q = N queries).
    coords = sampler.project(directions, g)[0]
    mean_W = U @ host(b, coords["W"]) @ V.T
    mean = np.concatenate([np.reshape(mean_W, -1), host(b, coords["b"])])
    np.testing.assert_allclose(mean, samples.mean(axis=0), rtol=0, atol=1e-12 * np.abs(mean).max())
    expected = np.concatenate([np.reshape(c * c * U @ U.T @ grad_W @ V @ V.T, -1), grad_b])
    z_mean = np.abs(mean - expected) / standard_errors(samples)
    assert np.max(z_mean) <= SIGMAS, np.max(z_mean)

    # Second moments, in the coordinates u = (vec S, z_b) ~ N(0, I_k), k = r² + m.
    a_W = np.linalg.norm(U.T @ grad_W @ V) ** 2  # ‖(V ⊗ U)ᵀ vec ∇_W ℓ‖²
    a_b = float(grad_b @ grad_b)
    k_W = R * R
    # E‖ĝ_W‖² = c² E[g² ‖S‖²] with g = c⟨S, Uᵀ∇_W V⟩ + ⟨z_b, ∇_b⟩.
    weight_moment = c**4 * (k_W + 2) * a_W + c * c * k_W * a_b
    if not bias_gradient:
        assert a_b == pytest.approx(0.0, abs=1e-20)
        # docs/method.md's form verbatim: (k + 2) c⁴ ‖Bᵀ∇ℓ‖², B = V ⊗ U, k = r².
        assert weight_moment == pytest.approx((k_W + 2) * c**4 * a_W, rel=1e-14)
    # The whole vector: tr(Λ²) ‖ΛBᵀ∇ℓ‖² + 2 ‖Λ²Bᵀ∇ℓ‖².
    total_moment = (c * c * k_W + M) * (c * c * a_W + a_b) + 2 * (c**4 * a_W + a_b)
    weight_samples = np.sum(samples[:, : M * N_IN] ** 2, axis=1)
    total_samples = np.sum(samples**2, axis=1)
    for values, formula in ((weight_samples, weight_moment), (total_samples, total_moment)):
        se = np.std(values, ddof=1) / sqrt(SAMPLES)
        assert abs(np.mean(values) - formula) <= SIGMAS * se, (np.mean(values), formula, se)
