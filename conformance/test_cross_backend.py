"""Guarantee: the same inputs give the same outputs on every backend ("identically",
docs/method.md#the-problem).

Every computation below is run twice in one process: on NumPy (the
reference) and on the backend under test, both in float64 with portable
random draws (``with_config(rng="portable")``, made current with
``sdze.use`` so that the draws the library makes internally, through
``backend_of``, are portable too). The inputs are the same everywhere:
parameters and points built on the host with NumPy and moved in with
``backend.asarray``, the same keys. Compared:

* model jets: ``Ansatz(MLP(...)).jet`` of orders 2 and 4 along coordinate
  directions (the first-layer gather) and dense directions, every coefficient;
* oracle estimates with keys: SparseLaplacian, HutchinsonLaplacian,
  SparseBiharmonic (their draws are the portable indices and signs);
* a ResidualLoss value (points and oracle directions drawn from a key);
* a benchmark problem's coefficients, domain points, forcing and exact solution
  (``make_problem("allen-cahn-two-body", 7, seed=1)``);
* three SDZE steps (CRNS, q = 2, rank-2 subspace refreshed every 2 steps,
  ZO-Adam): each step's projected gradients ``info.g`` and loss, and the
  parameters after the steps (pending low-rank updates merged).

Tolerance: |x − x_ref| ≤ 1e-10 · max(1, |x_ref|), elementwise, for everything
but the projected gradients. Integer draws and the uniform bits are identical
on every backend, but the portable normal goes through each library's own
log, sqrt, cos and sin, and sums and matmuls are reduced in library-specific
orders, so agreement is to float64 round-off, not bitwise (measured: ≤ 3e-15
for jets, oracles, losses and the problem; ≤ 3e-13 for the trained
parameters). The projected gradients g = (ℓ⁺ − ℓ⁻)/(2ε), ε = 1e-5, are a
cancellation: an error δ in ℓ ≈ 450 becomes δ/(2ε) in g ≈ 100–1000, so one
ulp of ℓ is ~1e-11 of g; they get 1e-8 · max(1, |g_ref|) (measured ≤ 1.1e-10,
jax and torch, step 0).

The test takes the ``backend`` fixture, so it runs on every registered
backend (third-party ones included), honours ``--backend`` and ``--device``,
and skips a backend that cannot run here with the reason; NumPy itself is the
reference and is skipped.
"""

import pytest

import sdze
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss
from sdze_core.oracles import HutchinsonLaplacian, SparseBiharmonic, SparseLaplacian
from sdze_core.problems import make_problem
from sdze_core.registry import make_backend

np = pytest.importorskip("numpy")

RTOL = 1e-10
RTOL_G = 1e-8  # projected gradients: a difference quotient (see the docstring)
D, B, WIDTH = 7, 5, 16
SIZES = (D, WIDTH, WIDTH, 1)


# -- host inputs, identical for every backend ------------------------------------------------


def host_params(seed=0, sizes=SIZES):
    """Glorot-scaled Gaussian weights and small random biases, made by NumPy."""
    rng = np.random.default_rng(seed)
    params = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        W = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / (n_in + n_out))
        params.append({"W": W, "b": 0.1 * rng.standard_normal(n_out)})
    return params


def host_points(seed=1, n=B, d=D):
    """Points inside the unit ball."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return 0.8 * x / np.linalg.norm(x, axis=1, keepdims=True) * np.linspace(0.2, 1.0, n)[:, None]


def to_backend(b, params):
    return [{k: b.asarray(v, dtype=b.dtype) for k, v in p.items()} for p in params]


def host(b, x):
    return np.asarray(b.to_host(x), dtype=np.float64)


def jet_arrays(b, jet):
    """{"primal": ..., "f1": ..., ...}, None coefficients (exact zeros) left out."""
    out = {"primal": host(b, jet.primal)}
    for k, c in enumerate(jet.coeffs, start=1):
        if c is not None:
            out[f"f{k}"] = host(b, c)
    return out


# -- the computations: each maps a (portable, float64, current) backend to host arrays -------


def model_jets(b):
    model = Ansatz(MLP(SIZES, "tanh"))
    params = to_backend(b, host_params())
    x = b.asarray(host_points())
    index = b.asarray(np.array([0, 3, 6, 2]), dtype=b.index_dtype)
    dense = b.asarray(np.random.default_rng(2).standard_normal((3, D)))
    out = {}
    for order in (2, 4):
        for name, directions in (("coordinate", index), ("dense", dense)):
            for collapse in (False, True):
                jet = model.jet(params, x, directions, order, collapse=collapse)
                for what, value in jet_arrays(b, jet).items():
                    out[f"{name} order {order} collapse={collapse} {what}"] = value
    return out


ORACLES = {
    "sparse laplacian": SparseLaplacian(num_directions=3),
    "hutchinson rademacher": HutchinsonLaplacian(num_directions=4),
    "hutchinson gaussian": HutchinsonLaplacian(num_directions=4, distribution="gaussian"),
    "sparse biharmonic": SparseBiharmonic(num_pairs=4),
}


def oracle_estimates(b):
    model = Ansatz(MLP(SIZES, "tanh"))
    params = to_backend(b, host_params())
    x = b.asarray(host_points())
    out = {}
    for name, oracle in ORACLES.items():
        for seed in (0, 1):
            estimate = oracle(model, params, x, fold_in(key(seed), name))
            out[f"{name} key {seed} u"] = host(b, estimate.u)
            out[f"{name} key {seed} value"] = host(b, estimate.value)
    return out


def residual_loss(b):
    xp = b.xp
    model = Ansatz(MLP(SIZES, "tanh"))
    params = to_backend(b, host_params())

    def points(k):
        return 0.5 * b.uniform(k, (B, D)) - 0.25

    def rhs(u, x):
        return xp.sum(xp.sin(x), axis=-1) + u - u**3

    out = {}
    for unbiased in (False, True):
        loss = ResidualLoss(model, SparseLaplacian(num_directions=3), rhs, points, unbiased)
        xi = loss.sample(key(5))
        out[f"unbiased={unbiased} points"] = host(b, xi.x)
        out[f"unbiased={unbiased} loss"] = host(b, loss(params, xi))
    return out


def problem(b):
    prob = make_problem("allen-cahn-two-body", D, seed=1, backend=b)
    x = b.asarray(host_points(seed=3, n=8))
    drawn = prob.sample_domain(key(4), 6)
    return {
        "coefficients": host(b, prob.coefficients),
        "forcing": host(b, prob.forcing(x)),
        "exact": host(b, prob.exact(x)),
        "operator": host(b, prob.operator_exact(x)),
        "domain points": host(b, drawn),
        "forcing at drawn points": host(b, prob.forcing(drawn)),
    }


def sdze_steps(b, num_steps=3):
    prob = make_problem("allen-cahn-two-body", D, seed=1, backend=b)
    model = prob.model(width=WIDTH, depth=2)
    params = to_backend(b, host_params(seed=7, sizes=model.network.sizes))

    def points(k):
        return prob.sample_domain(k, B)

    loss = ResidualLoss(model, prob.oracle(3), prob.reaction, points, forcing=prob.forcing)
    engine = sdze.SDZE(
        sdze.CRNSPerturber(num_queries=2),
        sdze.LowRankSubspace(rank=2, refresh_every=2),
        sdze.zo_adam(1e-2),
    )
    state = engine.init(sdze.key(0), params)
    out = {}
    for t in range(num_steps):
        params, state, info = engine.step(loss, params, state)
        out[f"step {t} g"] = host(b, info.g)
        out[f"step {t} loss"] = np.asarray(info.loss)
    state, params = engine.merge(params, state)
    for layer, p in enumerate(params):
        out[f"layer {layer} W"] = host(b, p["W"])
        out[f"layer {layer} b"] = host(b, p["b"])
    return out


COMPUTATIONS = {
    "jets": model_jets,
    "oracles": oracle_estimates,
    "residual_loss": residual_loss,
    "problem": problem,
    "sdze_steps": sdze_steps,
}


def run(computation, b):
    b = b.with_config(dtype="float64", rng="portable")
    with sdze.use(b):
        return computation(b)


_references: dict = {}


def reference(name):
    if name not in _references:
        _references[name] = run(COMPUTATIONS[name], make_backend("numpy"))
    return _references[name]


def assert_agree(got, ref, who):
    assert got.keys() == ref.keys(), (who, sorted(set(got) ^ set(ref)))
    for what, r in ref.items():
        g = got[what]
        assert g.shape == r.shape, f"{who}, {what}: shape {g.shape} != {r.shape}"
        assert np.all(np.isfinite(r)), f"{who}, {what}: the reference is not finite"
        tol = RTOL_G if what.endswith(" g") else RTOL
        error = np.abs(g - r) / np.maximum(1.0, np.abs(r))
        worst = float(np.max(error)) if error.size else 0.0
        assert worst <= tol, f"{who}, {what}: relative difference {worst:.3g} > {tol:g}"


@pytest.mark.parametrize("computation", list(COMPUTATIONS))
def test_agrees_with_numpy(backend, computation):
    if backend.name == "numpy":
        pytest.skip("numpy is the reference")
    got = run(COMPUTATIONS[computation], backend)
    assert_agree(got, reference(computation), f"{backend.name} vs numpy, {computation}")


def test_reference_is_not_trivial():
    """Guard against a vacuous comparison: the reference outputs are non-zero and
    the SDZE steps move the parameters (ZO-Adam's first step is ~η per coordinate)."""
    steps = reference("sdze_steps")
    start = host_params(seed=7, sizes=(D, WIDTH, WIDTH, 1))
    moved = max(np.max(np.abs(steps[f"layer {i} W"] - p["W"])) for i, p in enumerate(start))
    assert moved > 1e-3, moved
    assert all(np.any(steps[f"step {t} g"] != 0) for t in range(3))
    for name in COMPUTATIONS:
        assert any(np.any(v != 0) for v in reference(name).values()), name
