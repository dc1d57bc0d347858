"""The suite fails when a guarantee is broken: mutation tests of the conformance checks.

A conformance test that cannot fail proves nothing. Each test here breaks one
guarantee on purpose, by monkeypatching the implementation in a fixture (the
patch is undone after the test), runs the check that proves the guarantee,
and asserts that the check raises ``AssertionError``. Each mutation has a
control: the same check passes on the unmutated implementation, so the
failure is the mutation's doing.

* **CRNS** (docs/method.md#crns): ``CRNSPerturber.estimate`` with ``crns=True`` but
  the minus side evaluated on a ξ drawn from another spatial key. The checks
  are the real ones of ``test_crns_variance.py`` (its functions
  ``test_crns_second_moment_is_flat_in_eps`` and
  ``test_crns_converges_to_the_forward_gradient``, fed with the same
  measurements as there: its ``make_problem``, ``estimates``, ``EPSILONS``).
  The passing bound is |M2(ε)/M2(0) − 1| ≤ 1e-2 for ε ≤ 1e-2; the mutant's
  M2(1e-4)/M2(0) must exceed 100 (measured 2.2e5: the redrawn ξ leaves an O(1)
  difference ℓ(θ; ξ⁺) − ℓ(θ; ξ⁻) in front of 1/(2ε)).
* **Orthonormal bases** (docs/method.md#subspace-perturbations): the QR that makes the bases U, V
  returns the unnormalized Gaussian matrix, or 1.1 Q. Checks: UᵀU = I and
  VᵀV = I to 1e-12 (float64), by :func:`check_orthonormal_bases` and by the
  real ``test_subspace_orthogonality.test_bases_are_orthonormal``.
  Measured max |UᵀU − I| under the mutants: 17.9 (unnormalized), 0.21 (scaled).
* **Lazy refresh** (docs/method.md#subspace-perturbations): bases never refreshed
  (``refresh`` ignored), refreshed but redrawn from the same key (they never change), or redrawn at
  every step. Check: the bases are bit-identical for T steps and change (by
  more than 1e-3) at every multiple of T, with a transition reported exactly
  then; through the sampler (:func:`check_lazy_refresh`) and through SDZE
  training steps (:func:`check_lazy_refresh_in_training`), and by the real
  ``test_lazy_refresh.test_bases_are_fixed_for_t_steps_and_change_after``.

Backend: NumPy in float64 only (the mutations patch the implementation, which
is the same array-API code on every backend; running them once is enough).
Run time ≈ 2 s.
"""

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest

import sdze
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, with_layer_map
from sdze_core.objectives import with_model
from sdze_core.perturbers import CRNSPerturber, ZOEstimate
from sdze_core.registry import make_backend
from sdze_core.samplers import LowRankSubspace

np = pytest.importorskip("numpy")

HERE = Path(__file__).parent


def sibling(name: str):
    """The conformance module ``name`` (e.g. ``"test_crns_variance"``).

    Imported by name when conformance/ is on ``sys.path`` (pytest's default
    ``prepend`` import mode puts it there), else from its file.
    """
    if name in sys.modules:
        return sys.modules[name]
    path = HERE / f"{name}.py"
    if not path.exists():
        pytest.skip(f"conformance/{name}.py does not exist")
    if str(HERE) in sys.path:
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"_sdze_conformance_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_real_check(module: str, function: str, **arguments):
    """Call the test function ``function`` of conformance module ``module`` with the
    arguments its signature names (a missing module or function skips, saying so)."""
    check = getattr(sibling(module), function, None)
    if check is None:
        pytest.skip(f"conformance/{module}.py has no {function}")
    names = inspect.signature(check).parameters
    missing = [n for n in names if n not in arguments]
    if missing:
        pytest.fail(f"{module}.{function} takes {missing}, which this mutation test does not give")
    return check(**{n: arguments[n] for n in names})


@pytest.fixture
def numpy64():
    return make_backend("numpy", dtype="float64")


def host(b, x):
    return np.array(b.to_host(x))


# -- mutation 1: CRNS broken (the minus side redraws ξ) ----------------------------------------

crns_variance = sibling("test_crns_variance")
ORIGINAL_ESTIMATE = CRNSPerturber.estimate


def estimate_redrawing_minus_side(self, loss, params, sampler, sampler_state, directions, key):
    """The mutant: with ``crns=True`` the minus side still draws its own ξ."""
    if self.estimator != "central" or not self.crns:
        return ORIGINAL_ESTIMATE(self, loss, params, sampler, sampler_state, directions, key)
    q, eps = self.num_queries, self.eps_for(params)
    queries = list(range(q))

    def perturbed(scale):
        layers = sampler.layer_map(sampler_state, directions, queries, [scale] * q)
        return with_model(loss, with_layer_map(loss.model, layers))

    xp = sdze.backend_of(params[0]["W"]).xp
    values = xp.concat(
        [
            perturbed(eps)(params, loss.sample(key)),
            perturbed(-eps)(params, loss.sample(fold_in(key, "redrawn"))),
        ]
    )
    g = (values[:q] - values[q:]) / (2.0 * eps)
    return ZOEstimate(g, xp.mean(values), values)


@pytest.fixture
def crns_redraws_minus_side(monkeypatch):
    monkeypatch.setattr(CRNSPerturber, "estimate", estimate_redrawing_minus_side)


def measure_crns(b):
    """What ``test_crns_variance``'s ``measured`` fixture gives its CRNS checks:
    the forward gradients, ‖z‖² and the CRNS estimates at every ε (the naive ones
    are not needed here)."""
    cv = crns_variance
    params, loss = cv.make_problem(b)
    forward = CRNSPerturber(num_queries=cv.Q, estimator="forward")
    g, norms = cv.estimates(b, params, loss, forward)
    measured = {"forward": g, "norms": norms}
    for eps in cv.EPSILONS:
        perturber = CRNSPerturber(eps=eps, num_queries=cv.Q, crns=True)
        measured[True, eps] = cv.estimates(b, params, loss, perturber)[0]
    return measured


def m2_ratio_at_smallest_eps(measured):
    """M2(ε = 1e-4) / M2(forward gradient): 1 ± 1e-3 with CRNS."""
    m2 = crns_variance.second_moment
    small = measured[True, crns_variance.EPSILONS[-1]]
    return m2(small, measured["norms"]) / m2(measured["forward"], measured["norms"])


def test_crns_checks_pass_unmutated(numpy64):
    measured = measure_crns(numpy64)
    crns_variance.test_crns_second_moment_is_flat_in_eps(measured)
    crns_variance.test_crns_converges_to_the_forward_gradient(measured)
    assert abs(m2_ratio_at_smallest_eps(measured) - 1) <= 1e-3


def test_crns_checks_fail_when_the_minus_side_redraws_xi(crns_redraws_minus_side, numpy64):
    measured = measure_crns(numpy64)
    assert crns_variance.EPSILONS[-1] == 1e-4
    ratio = m2_ratio_at_smallest_eps(measured)
    assert ratio > 100, ratio  # the passing bound is 1 ± 1e-2
    with pytest.raises(AssertionError):
        crns_variance.test_crns_second_moment_is_flat_in_eps(measured)
    with pytest.raises(AssertionError):
        crns_variance.test_crns_converges_to_the_forward_gradient(measured)


# -- mutation 2: bases not orthonormal ---------------------------------------------------------

ORTHO_TOL = 1e-12  # float64, as test_subspace_orthogonality.TOL["float64"]
SIZES = (12, 10, 6, 1)  # weights (10, 12), (6, 10), (1, 6)


def qr_unnormalized(qr):
    """The mutant: the Gaussian matrix itself instead of its Q factor."""
    return lambda backend, a: (a, None)


def qr_scaled(qr):
    """The mutant: Q scaled by 1.1 (orthogonal columns of norm 1.1)."""
    return lambda backend, a: (1.1 * qr(backend, a)[0], None)


QR_MUTANTS = {"unnormalized": qr_unnormalized, "scaled": qr_scaled}


@pytest.fixture(params=list(QR_MUTANTS))
def bases_not_orthonormal(request, monkeypatch, numpy64):
    # Patch the class of the numpy backend: every numpy backend the sampler builds
    # (backend_of the parameters) is an instance of it.
    cls = type(numpy64)
    monkeypatch.setattr(cls, "qr", QR_MUTANTS[request.param](cls.qr))
    return request.param


def check_orthonormal_bases(b, sampler, params, steps=5, tol=ORTHO_TOL):
    """UᵀU = I and VᵀV = I to ``tol`` for every layer, at init and after each refresh."""
    state = sampler.init(key(1), params)
    for step in range(steps):
        state, params, _ = sampler.refresh(state, params, step)
        for layer, (U, V) in enumerate(sampler.bases(state, params)):
            for name, M in (("U", U), ("V", V)):
                M = host(b, M)
                error = float(np.max(np.abs(M.T @ M - np.eye(M.shape[1]))))
                where = f"step {step}, layer {layer}"
                assert error <= tol, f"{where}: max |{name}ᵀ{name} − I| = {error}"


@pytest.mark.parametrize("store_bases", [True, False])
def test_orthonormality_check_passes_unmutated(numpy64, store_bases):
    params = MLP(SIZES).init(key(0), numpy64)
    sampler = LowRankSubspace(rank=4, refresh_every=2, store_bases=store_bases)
    check_orthonormal_bases(numpy64, sampler, params)
    run_real_check(
        "test_subspace_orthogonality",
        "test_bases_are_orthonormal",
        backend=numpy64,
        dtype="float64",
        store_bases=store_bases,
    )


@pytest.mark.parametrize("store_bases", [True, False])
def test_orthonormality_check_fails_on_non_orthonormal_bases(
    bases_not_orthonormal, numpy64, store_bases
):
    params = MLP(SIZES).init(key(0), numpy64)
    sampler = LowRankSubspace(rank=4, refresh_every=2, store_bases=store_bases)
    with pytest.raises(AssertionError, match="− I"):
        check_orthonormal_bases(numpy64, sampler, params)
    with pytest.raises(AssertionError):
        run_real_check(
            "test_subspace_orthogonality",
            "test_bases_are_orthonormal",
            backend=numpy64,
            dtype="float64",
            store_bases=store_bases,
        )


# -- mutation 3: the lazy refresh broken -------------------------------------------------------

T = 3  # refresh_every
CHANGED = 1e-3  # new bases differ from the old by more than this (max |ΔU|, |ΔV|)
ORIGINAL_DRAW_BASES = LowRankSubspace._draw_bases


def refresh_ignored(self, state, params, step):
    """The mutant: the bases of epoch 0 forever, no transition."""
    return state, params, None


def draw_bases_ignoring_epoch(self, key, epoch, params, inputs=None):
    """The mutant: refreshes happen (transitions are reported) but redraw epoch 0's bases."""
    return ORIGINAL_DRAW_BASES(self, key, 0, params, inputs)


def epoch_is_the_step(self, step):
    """The mutant: every step is a new epoch, so the bases are redrawn every step."""
    return int(step)


REFRESH_MUTANTS = {
    "never-refreshed": ("refresh", refresh_ignored),
    "never-changed": ("_draw_bases", draw_bases_ignoring_epoch),
    "every-step": ("epoch_of", epoch_is_the_step),
}

#: The real check, in conformance/test_lazy_refresh.py.
LAZY_REFRESH = ("test_lazy_refresh", "test_bases_are_fixed_for_t_steps_and_change_after")


@pytest.fixture(params=list(REFRESH_MUTANTS))
def refresh_broken(request, monkeypatch):
    name, mutant = REFRESH_MUTANTS[request.param]
    monkeypatch.setattr(LowRankSubspace, name, mutant)
    return request.param


def bases_on_host(b, sampler, state, params):
    return [(host(b, U), host(b, V)) for U, V in sampler.bases(state, params)]


def check_bases_sequence(sequence, transitions, refresh_every):
    """``sequence[t]``: the bases step t used; ``transitions[t]``: whether step t
    reported a refresh. Fixed (bitwise) within an epoch of ``refresh_every`` steps,
    different (by > CHANGED in U or V, every layer) at each new epoch."""
    for t in range(1, len(sequence)):
        if t % refresh_every:
            assert not transitions[t], f"step {t}: a refresh within an epoch"
            for layer, (now, before) in enumerate(zip(sequence[t], sequence[t - 1], strict=True)):
                for M, M0 in zip(now, before, strict=True):
                    assert np.array_equal(M, M0), f"step {t}, layer {layer}: bases changed"
        else:
            assert transitions[t], f"step {t}: no refresh after {refresh_every} steps"
            for layer, (now, before) in enumerate(zip(sequence[t], sequence[t - 1], strict=True)):
                pairs = zip(now, before, strict=True)
                change = max(float(np.max(np.abs(M - M0))) for M, M0 in pairs)
                assert change > CHANGED, f"step {t}, layer {layer}: bases unchanged ({change})"


def check_lazy_refresh(b, store_bases=True, epochs=3):
    """Through the sampler's API: refresh(state, params, t) for t = 0 .. epochs·T − 1."""
    params = MLP(SIZES).init(key(0), b)
    sampler = LowRankSubspace(rank=3, refresh_every=T, store_bases=store_bases)
    state = sampler.init(key(1), params)
    sequence, transitions = [], []
    for step in range(epochs * T):
        state, params, transition = sampler.refresh(state, params, step)
        sequence.append(bases_on_host(b, sampler, state, params))
        transitions.append(transition is not None)
    check_bases_sequence(sequence, transitions, T)


def check_lazy_refresh_in_training(b, epochs=3):
    """Through SDZE steps on the CRNS problem: the bases each step used."""
    params, loss = crns_variance.make_problem(b)
    sampler = LowRankSubspace(rank=2, refresh_every=T)
    engine = sdze.SDZE(CRNSPerturber(num_queries=2), sampler, sdze.zo_sgd(1e-3))
    state = engine.init(key(3), params)
    sequence, epochs_seen = [], []
    for _ in range(epochs * T):
        params, state, _ = engine.step(loss, params, state)
        sequence.append(bases_on_host(b, sampler, state.sampler, params))
        epochs_seen.append(state.sampler.epoch)
    transitions = [t > 0 and epochs_seen[t] != epochs_seen[t - 1] for t in range(len(sequence))]
    check_bases_sequence(sequence, transitions, T)


@pytest.mark.parametrize("store_bases", [True, False])
def test_lazy_refresh_checks_pass_unmutated(numpy64, store_bases):
    check_lazy_refresh(numpy64, store_bases)
    if store_bases:
        check_lazy_refresh_in_training(numpy64)


@pytest.mark.parametrize("store_bases", [True, False])
def test_lazy_refresh_check_fails_when_broken(refresh_broken, numpy64, store_bases):
    with pytest.raises(AssertionError, match="refresh|bases"):
        check_lazy_refresh(numpy64, store_bases)


def test_lazy_refresh_check_in_training_fails_when_broken(refresh_broken, numpy64):
    with pytest.raises(AssertionError, match="refresh|bases"):
        check_lazy_refresh_in_training(numpy64)


@pytest.mark.parametrize("store_bases", [True, False])
def test_real_lazy_refresh_check_passes_unmutated(numpy64, store_bases):
    run_real_check(*LAZY_REFRESH, backend=numpy64, store_bases=store_bases)


@pytest.mark.parametrize("store_bases", [True, False])
def test_real_lazy_refresh_check_fails_when_broken(refresh_broken, numpy64, store_bases):
    with pytest.raises(AssertionError):
        run_real_check(*LAZY_REFRESH, backend=numpy64, store_bases=store_bases)
