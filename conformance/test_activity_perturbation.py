"""Guarantees of the activity-perturbation estimator (docs/sdze.md, "Activity perturbation").

On a small Allen–Cahn-type PINN (d = 5, a 6-6 tanh ansatz, B = 12 points, a
sparse Laplacian on V = 2 sampled coordinates), float64, every layer:

* **exact activity gradients**: δ_b = ∂ℓ_b/∂a_b, read from the estimator
  itself with ζ set to each basis vector and the complex-step estimator
  (exact to round-off), give (1/N) Σ_b Σ_k δ_{b,k} ⊗ in_{b,k} = ∇_W ℓ
  against autodiff (torch, jax) or central finite differences (elsewhere)
  to 1e-7 relative: the estimator's factorisation is the true gradient;
* **unbiased**: the mean of 300 estimates Ĝ (central differences, ε = 1e-5,
  CRNS) lies within z* standard errors of ∇_W ℓ entrywise, z* the two-sided
  99.9 % normal quantile Bonferroni-corrected over all entries (about 4.4);
* **second moment**: E‖Ĝ_l‖² = ‖G‖² + (1/N²) Σ_b (m ‖δ_b‖² Σ_k ‖in_{b,k}‖² + ‖G_b‖²)
  (Isserlis' theorem for Gaussian ζ_b independent across points), within
  5 standard errors of the mean of the 300 draws (> 99.99 %);
* **CRNS flat in ε**: with the same keys, M2(ε) = Σ_l ‖Ĝ_l‖² summed over 16
  steps stays within 1 % of the complex-step value for ε = 1e-2 .. 1e-4;
  without CRNS it grows by 50–200× per decade;
* **restore exact**: an estimate leaves the parameters bitwise unchanged.

The mutation tests at the end break each guarantee and require the check to fail.
"""

import math
import statistics

import pytest

from sdze_core import activity
from sdze_core.activity import ActivityPerturbation, activity_sgd
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss
from sdze_core.oracles import SparseLaplacian

np = pytest.importorskip("numpy")

D, B, V, WIDTH = 5, 12, 2, 6
DRAWS = 300


def make_problem(backend):
    b = backend.with_config(dtype="float64")
    xp = b.xp
    model = Ansatz(MLP((D, WIDTH, WIDTH, 1)))
    params = model.init(key(0), b)
    # non-zero biases, so every term of the gradient is exercised
    params = [
        {"W": p["W"], "b": b.normal(fold_in(key(1), i), p["b"].shape) * 0.3}
        for i, p in enumerate(params)
    ]

    def points(k):
        x = b.normal(k, (B, D))
        radius = b.uniform(fold_in(k, 1), (B, 1))
        return x / xp.sqrt(xp.sum(x * x, axis=1, keepdims=True)) * radius

    def rhs(u, x):
        return xp.sum(xp.sin(x), axis=-1) + u - u**3

    return b, params, ResidualLoss(model, SparseLaplacian(num_directions=V), rhs, points)


def host(b, x):
    return np.array(b.to_host(x), dtype=np.float64)


def reference_gradient(b, loss, params, xi):
    """∇_W ℓ per layer: backend autodiff where there is one, else central differences."""
    try:
        _, grads = b.value_and_grad(loss)(params, xi)
        return [host(b, g["W"]) for g in grads]
    except TypeError:
        pass
    out = []
    h = 1e-6
    for layer, p in enumerate(params):
        W = host(b, p["W"])
        G = np.zeros_like(W)
        for i in range(W.shape[0]):
            for j in range(W.shape[1]):
                values = []
                for s in (h, -h):
                    Wp = W.copy()
                    Wp[i, j] += s
                    trial = [dict(q) for q in params]
                    trial[layer] = {"W": b.asarray(Wp), "b": p["b"]}
                    values.append(float(loss(trial, xi)))
                G[i, j] = (values[0] - values[1]) / (2 * h)
        out.append(G)
    return out


def exact_activity_terms(b, loss, params, xi, monkeypatch):
    """Per layer: δ (per point, per slot: arrays (*dirs, B, m)) and the inputs (host)."""
    engine = ActivityPerturbation(activity_sgd(1.0), estimator="forward")
    scales, size = engine._scales(params)
    layers = tuple(range(len(params)))
    probe = activity._perturbed_model(loss.model, (key(9), scales, layers))
    activity._per_point_losses(loss, params, xi, probe)
    call = probe.network.calls[0]
    out = []
    for position, layer in enumerate(layers):
        shapes = call.zeta_shapes[position]
        deltas = [None if s is None else np.zeros(s) for s in shapes]
        for k, s in enumerate(shapes):
            if s is None:
                continue
            for idx in np.ndindex(*s[:-2], s[-1]):

                def basis(call_key, lay, shp, like, k=k, idx=idx, layer=layer):
                    zs = []
                    for kk, sh in enumerate(shp):
                        if sh is None:
                            zs.append(None)
                            continue
                        z = np.zeros(sh)
                        if lay == layer and kk == k:
                            z[idx[:-1] + (slice(None), idx[-1])] = 1.0
                        zs.append(b.asarray(z))
                    return zs

                monkeypatch.setattr(activity, "draw_zeta", basis)
                model = activity._perturbed_model(loss.model, (key(9), scales, layers))
                losses = activity._per_point_losses(loss, params, xi, model)
                g = host(b, b.xp.imag(losses[1 + position, ...])) / size
                deltas[k][idx[:-1] + (slice(None), idx[-1])] = g
        monkeypatch.undo()
        out.append((deltas, call.inputs[layer]))
    return out


def per_point_terms(b, deltas, inputs, n_cols):
    """G_b (B, m, n) and S_b = Σ_k ‖in_{b,k}‖² (B,) of one layer."""
    if isinstance(inputs, tuple) and isinstance(inputs[0], str):
        _, x, j = inputs
        x, j = host(b, x), np.array(b.to_host(j))
        G = np.einsum("bm,bn->bmn", deltas[0], x)
        for v in range(j.shape[0]):
            G[:, :, j[v]] += deltas[1][v]
        S = np.sum(x * x, axis=1) + j.shape[0]
        return G, S
    slots = [inputs.primal, *inputs.coeffs]
    G = 0.0
    S = 0.0
    for delta, x_in in zip(deltas, slots, strict=True):
        if delta is None or x_in is None:
            continue
        x_in = np.broadcast_to(host(b, x_in), delta.shape[:-1] + (n_cols,))
        lead = tuple(range(delta.ndim - 2))
        dk = delta.reshape((-1,) + delta.shape[-2:])
        xk = x_in.reshape((-1,) + x_in.shape[-2:])
        G = G + np.einsum("kbm,kbn->bmn", dk, xk)
        S = S + np.sum(x_in * x_in, axis=lead + (delta.ndim - 1,))
    return G, S


def draws(b, loss, params, engine, count=DRAWS):
    """Ĝ per layer (host, dense) for ``count`` parameter keys and one spatial key."""
    out = []
    for i in range(count):
        grads, _, _ = engine.estimate(loss, params, key(3), fold_in(key(100), i))
        out.append([host(b, g.dense()) for g in grads])
    return out


@pytest.fixture(scope="module")
def setup_cache():
    return {}


def _setup(backend, cache, monkeypatch):
    name = backend.name
    if name not in cache:
        b, params, loss = make_problem(backend)
        xi = loss.sample(key(3))
        terms = exact_activity_terms(b, loss, params, xi, monkeypatch)
        samples = draws(b, loss, params, ActivityPerturbation(activity_sgd(1.0), eps=1e-5))
        cache[name] = (b, params, loss, xi, terms, samples)
    return cache[name]


def check_factorisation(b, loss, params, xi, terms):
    ref = reference_gradient(b, loss, params, xi)
    for (deltas, inputs), G_ref in zip(terms, ref, strict=True):
        G_b, _ = per_point_terms(b, deltas, inputs, G_ref.shape[1])
        G = G_b.sum(axis=0) / B
        scale = np.abs(G_ref).max()
        assert np.abs(G - G_ref).max() <= 1e-7 * scale, np.abs(G - G_ref).max() / scale


def check_unbiased(ref, samples):
    entries = sum(G.size for G in ref)
    z_star = statistics.NormalDist().inv_cdf(1 - 0.001 / (2 * entries))
    worst = 0.0
    for layer, G_ref in enumerate(ref):
        stack = np.stack([s[layer] for s in samples])
        mean, se = stack.mean(axis=0), stack.std(axis=0, ddof=1) / math.sqrt(len(samples))
        z = np.abs(mean - G_ref) / np.maximum(se, 1e-300)
        worst = max(worst, float(z.max()))
    assert worst <= z_star, f"max |z| = {worst:.2f} > {z_star:.2f}"
    return worst


def second_moment_formula(b, terms, n_cols_by_layer):
    out = []
    for (deltas, inputs), n in zip(terms, n_cols_by_layer, strict=True):
        G_b, S = per_point_terms(b, deltas, inputs, n)
        m = G_b.shape[1]
        G = G_b.sum(axis=0) / B
        d2 = sum(
            np.sum(d * d, axis=tuple(i for i in range(d.ndim) if i != d.ndim - 2))
            for d in deltas
            if d is not None
        )
        var = np.sum(m * d2 * S + np.sum(G_b * G_b, axis=(1, 2))) / B**2
        out.append(float(np.sum(G * G) + var))
    return out


def check_second_moment(formula, samples):
    for layer, expected in enumerate(formula):
        sq = np.array([np.sum(s[layer] ** 2) for s in samples])
        se = sq.std(ddof=1) / math.sqrt(len(sq))
        assert abs(sq.mean() - expected) <= 5 * se, (layer, sq.mean(), expected, se)


def test_activity_gradients_factor_the_true_gradient(backend, setup_cache, monkeypatch):
    b, params, loss, xi, terms, _ = _setup(backend, setup_cache, monkeypatch)
    check_factorisation(b, loss, params, xi, terms)


def test_estimate_is_unbiased(backend, setup_cache, monkeypatch):
    b, params, loss, xi, _, samples = _setup(backend, setup_cache, monkeypatch)
    check_unbiased(reference_gradient(b, loss, params, xi), samples)


def test_second_moment_matches_the_formula(backend, setup_cache, monkeypatch):
    b, params, loss, xi, terms, samples = _setup(backend, setup_cache, monkeypatch)
    formula = second_moment_formula(b, terms, [p["W"].shape[1] for p in params])
    check_second_moment(formula, samples)


_M2 = {}


def m2_by_eps(b, loss, params, crns, steps=16):
    """Σ over steps and layers of ‖Ĝ_l‖², per ε, with common keys; and the complex-step value."""
    cache_key = (b.name, crns, steps)
    if cache_key in _M2:
        return _M2[cache_key]
    out = _M2[cache_key] = {}
    engines = {
        eps: ActivityPerturbation(activity_sgd(1.0), eps=eps, crns=crns)
        for eps in (1e-2, 1e-3, 1e-4)
    }
    engines["forward"] = ActivityPerturbation(activity_sgd(1.0), estimator="forward")
    for name, engine in engines.items():
        total = 0.0
        for t in range(steps):
            grads, _, _ = engine.estimate(loss, params, fold_in(key(7), t), fold_in(key(8), t))
            total += sum(float(np.sum(host(b, g.dense()) ** 2)) for g in grads)
        out[name] = total
    return out


def check_flat(m2):
    for eps in (1e-2, 1e-3, 1e-4):
        assert abs(m2[eps] / m2["forward"] - 1) <= 1e-2, (eps, m2[eps] / m2["forward"])


def test_crns_keeps_the_second_moment_flat_in_eps(backend):
    b, params, loss = make_problem(backend)
    check_flat(m2_by_eps(b, loss, params, crns=True))


def test_without_crns_the_second_moment_grows_as_eps_minus_two(backend):
    b, params, loss = make_problem(backend)
    m2 = m2_by_eps(b, loss, params, crns=False, steps=16)
    for big, small in ((1e-2, 1e-3), (1e-3, 1e-4)):
        assert 50 <= m2[small] / m2[big] <= 200, m2


def test_estimate_leaves_the_parameters_bitwise_unchanged(backend):
    b, params, loss = make_problem(backend)
    before = [{k: host(b, v) for k, v in p.items()} for p in params]
    for estimator in ("central", "forward"):
        engine = ActivityPerturbation(activity_sgd(1.0), estimator=estimator)
        engine.estimate(loss, params, key(1), key(2))
    for p, q in zip(params, before, strict=True):
        for k in p:
            np.testing.assert_array_equal(host(b, p[k]), q[k])


# -- mutations: each guarantee must be able to fail ------------------------------------------


def test_mutation_zeta_not_replayed_breaks_unbiasedness(backend, monkeypatch):
    """The update draws a fresh ζ instead of replaying the forward pass's: E[Ĝ] = 0."""
    b, params, loss = make_problem(backend)
    xi = loss.sample(key(3))
    ref = reference_gradient(b, loss, params, xi)
    real = activity.draw_zeta
    counter = iter(range(10**9))

    def fresh(call_key, layer, shapes, like):
        return real(fold_in(call_key, next(counter)), layer, shapes, like)

    monkeypatch.setattr(activity, "draw_zeta", fresh)
    samples = draws(b, loss, params, ActivityPerturbation(activity_sgd(1.0), eps=1e-5), 200)
    with pytest.raises(AssertionError):
        check_unbiased(ref, samples)


def test_mutation_shared_zeta_across_points_breaks_the_second_moment(backend, monkeypatch):
    """One ζ for all points (not per sample): still unbiased, but the variance is not
    the per-sample formula's."""
    b, params, loss = make_problem(backend)
    xi = loss.sample(key(3))
    terms = exact_activity_terms(b, loss, params, xi, monkeypatch)
    formula = second_moment_formula(b, terms, [p["W"].shape[1] for p in params])
    real = activity.draw_zeta

    def shared(call_key, layer, shapes, like):
        zs = real(
            call_key, layer, [None if s is None else s[:-2] + (1, s[-1]) for s in shapes], like
        )
        return [
            None if z is None else b.xp.broadcast_to(z, s) for z, s in zip(zs, shapes, strict=True)
        ]

    monkeypatch.setattr(activity, "draw_zeta", shared)
    samples = draws(b, loss, params, ActivityPerturbation(activity_sgd(1.0), eps=1e-5), 300)
    with pytest.raises(AssertionError):
        check_second_moment(formula, samples)


def test_mutation_independent_sides_break_flatness(backend):
    b, params, loss = make_problem(backend)
    with pytest.raises(AssertionError):
        check_flat(m2_by_eps(b, loss, params, crns=False, steps=16))


def test_mutation_in_place_perturbation_breaks_exact_restore(backend, monkeypatch):
    """A network that adds and subtracts a perturbation in W in place does not restore it."""
    b, params, loss = make_problem(backend)
    if not activity._writeable(params[0]["W"]):
        pytest.skip(f"{backend.name} arrays are immutable: an in-place perturbation cannot exist")
    real = activity._affine

    def in_place(jet, W, bias):
        W += 0.1
        out = real(jet, W, bias)
        W -= 0.1
        return out

    monkeypatch.setattr(activity, "_affine", in_place)
    with pytest.raises(AssertionError):
        test_estimate_leaves_the_parameters_bitwise_unchanged(backend)
