"""Trainable PDE coefficients (docs/inverse.md):
binding and its errors, the batched coefficient queries, the autodiff gradient against
finite differences, the wrapper's state, errors and checkpoint, and a short recovery run.

The problem: an unknown diffusivity a in −a Δu = f on the unit ball in d = 3,
with the manufactured u* = (1 − ‖x‖²) sin(w·x), w = (1, …, 1)/√d, a* = 2, so
that f = −a* Δu*; in the residual's form L u = F + f: Δu = F(u, x; a) =
−f(x)/a. An exact Laplacian, 32 interior points per step and 64 observations
of u*, a 3-16-16-1 tanh ansatz (hard boundary).
"""

import math

import numpy as np
import pytest

from sdze_core.activity import ActivityPerturbation
from sdze_core.coefficients import (
    CoefficientState,
    TrainCoefficients,
    bind_coefficients,
    coefficient_autodiff,
    coefficient_gradient,
    uses_coefficients,
)
from sdze_core.domains import Ball
from sdze_core.engine import SDZE
from sdze_core.first_order import FirstOrderAdam
from sdze_core.keys import fold_in, key
from sdze_core.loss_terms import DataTerm, InteriorTerm, WeightedLoss, domain_points
from sdze_core.models import MLP, Ansatz
from sdze_core.optimizers import zo_adam
from sdze_core.oracles import ExactLaplacian
from sdze_core.perturbers import CRNSPerturber, NonFiniteLossError
from sdze_core.samplers import LowRankSubspace

D, A_TRUE = 3, 2.0
AUTODIFF = ("torch", "jax")


def manufactured(xp, d=D, a=A_TRUE):
    """(u*, f) for −a Δu = f: Δu* = −2d s − 4 (w·x) cos(w·x) − (1 − ‖x‖²) s, s = sin(w·x)."""
    w = 1.0 / math.sqrt(d)

    def exact(x):
        return (1 - xp.sum(x * x, axis=-1)) * xp.sin(w * xp.sum(x, axis=-1))

    def forcing(x):
        t = w * xp.sum(x, axis=-1)
        g = 1 - xp.sum(x * x, axis=-1)
        laplacian = -2 * d * xp.sin(t) - 4 * t * xp.cos(t) - g * xp.sin(t)
        return -a * laplacian

    return exact, forcing


def problem(backend, dtype="float64", observations=64):
    b = backend.with_config(dtype=dtype)
    exact, f = manufactured(b.xp)
    model = Ansatz(MLP((D, 16, 16, 1)))
    observed = Ball().sample(b, key(7), observations, D)
    def diffusion(u, x, c):
        return -f(x) / c["a"]

    interior = InteriorTerm(
        ExactLaplacian(), uses_coefficients(diffusion), domain_points(Ball(), b, 32, D)
    )
    loss = WeightedLoss(model, (interior, DataTerm(observed, exact(observed), weight=1000.0)))
    return b, model, model.init(key(0), b), loss


# -- binding ------------------------------------------------------------------------------------


def test_an_unbound_coefficient_function_names_the_fix(backend):
    b, model, params, loss = problem(backend)
    xi = bind_coefficients(loss, {"a": 1.0}).sample(key(1))
    with pytest.raises(TypeError, match="diffusion reads trainable coefficients .* TrainCoeff"):
        loss(params, xi)


def test_a_loss_without_coefficients_cannot_be_bound(backend):
    b, model, params, loss = problem(backend)
    plain = WeightedLoss(model, loss.terms[1:])
    with pytest.raises(ValueError, match="reads no trainable coefficient: mark"):
        bind_coefficients(plain, {"a": 1.0})


def test_an_unknown_name_lists_the_trained_ones(backend):
    b, model, params, loss = problem(backend)
    bound = bind_coefficients(loss, {"rate": b.asarray(1.0)})
    with pytest.raises(KeyError, match=r"no coefficient named 'a'; .* \['rate'\]"):
        bound(params, bound.sample(key(1)))


def test_a_forcing_that_reads_a_coefficient_is_refused(backend):
    b, model, params, loss = problem(backend)
    bad = InteriorTerm(
        ExactLaplacian(), loss.terms[0].rhs, domain_points(Ball(), b, 8, D),
        forcing=uses_coefficients(lambda x, c: c["a"] * x[:, 0]),
    )
    c = b.asarray([1.0], dtype=b.xp.float64)
    with pytest.raises(ValueError, match="'a' was read while the step's points were drawn"):
        coefficient_gradient(WeightedLoss(model, (bad,)), ("a",), params, c, key(1), key(2))


def test_binding_keeps_what_holds_no_coefficient(backend):
    b, model, params, loss = problem(backend)
    bound = bind_coefficients(loss, {"a": 1.0})
    assert bound.terms[1] is loss.terms[1] and bound.model is loss.model
    assert bound.terms[0].rhs.values == {"a": 1.0} and loss.terms[0].rhs.values is None


def test_coefficient_queries_match_one_evaluation_each(backend):
    """The 2q perturbed coefficient vectors share one pass: each loss equals the loss
    evaluated alone at that vector (float64, to 1e-12 relative)."""
    b, model, params, loss = problem(backend)
    c = b.asarray([1.5], dtype=b.xp.float64)
    g, losses = coefficient_gradient(loss, ("a",), params, c, key(1), key(2), eps=0.1)
    z = b.normal(key(2), (2, 1), dtype=c.dtype)
    xi = bind_coefficients(loss, {"a": 0.0}).sample(key(1))
    for i, side in enumerate((1, 1, -1, -1)):
        value = bind_coefficients(loss, {"a": c[0] + side * 0.1 * z[i % 2, 0]})(params, xi)
        assert float(losses[i]) == pytest.approx(float(value), rel=1e-12)
    slopes = (losses[:2] - losses[2:]) / 0.2
    assert float(g[0]) == pytest.approx(float(slopes[0] * z[0, 0] + slopes[1] * z[1, 0]) / 2)


# -- the first-order path -----------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTODIFF)
def test_autodiff_coefficient_gradient_matches_finite_differences(name):
    """∇_c ℓ by reverse mode equals the central difference (h = 1e-4, float64; ℓ is
    the difference's O(h²) error is ~1e-8 relative)."""
    from sdze.testing import get_backend_under_test

    b, model, params, loss = problem(get_backend_under_test(name))
    c = b.asarray([1.5], dtype=b.xp.float64)
    value, net_grads, grad = coefficient_autodiff(loss, ("a",), params, c, key(1))
    assert [set(g) for g in net_grads] == [set(p) for p in params]
    xi = bind_coefficients(loss, {"a": 0.0}).sample(key(1))

    def at(a):
        value = b.asarray(a, dtype=c.dtype)
        return float(bind_coefficients(loss, {"a": value})(params, xi))

    assert float(value) == pytest.approx(at(1.5), rel=1e-12)
    assert float(grad[0]) == pytest.approx((at(1.5 + 1e-4) - at(1.5 - 1e-4)) / 2e-4, rel=1e-6)


def test_autodiff_needs_an_autodiff_backend(backend):
    if backend.name in AUTODIFF:
        pytest.skip(f"{backend.name} has autodiff")
    b, model, params, loss = problem(backend)
    with pytest.raises(Exception, match="no automatic differentiation"):
        coefficient_autodiff(loss, ("a",), params, b.asarray([1.0], dtype=b.xp.float64), key(1))


# -- the wrapper --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": {}}, "initial must be a non-empty mapping"),
        ({"initial": {"a": math.nan}}, r"initial\['a'\] must be a finite number"),
        ({"initial": {"k": 1.0}, "distribution": "uniform"}, "distribution must be one of"),
        ({"initial": {"k": 1.0}, "num_queries": 0}, "num_queries must be an integer >= 1"),
        ({"initial": {"k": 1.0}, "eps": -1.0}, "eps must be a finite number > 0"),
    ],
)
def test_bad_settings_name_the_option(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainCoefficients(ActivityPerturbation(), **kwargs)


def test_the_gradient_defaults_to_the_method():
    assert TrainCoefficients(FirstOrderAdam(), {"k": 1.0}).gradient == "autodiff"
    assert TrainCoefficients(ActivityPerturbation(), {"k": 1.0}).gradient == "zeroth-order"


def _copy(b, params):
    return [{k: b.xp.asarray(v, copy=True) for k, v in p.items()} for p in params]


@pytest.mark.parametrize("method", ["activity", "sdze"])
def test_a_zeroth_order_step_is_the_two_estimates_composed(backend, method):
    """One wrapped step = the method's step on the loss bound to c_t, and c_t plus
    Adam's first step on coefficient_gradient(…, fold_in(k_t, "coefficients")) with
    the method's ξ_t: −η sign(ĝ) (to 1e-12)."""
    b, model, params, loss = problem(backend)
    inner = (
        ActivityPerturbation()
        if method == "activity"
        else SDZE(CRNSPerturber(num_queries=4), LowRankSubspace(rank=4), zo_adam(1e-3))
    )
    trainer = TrainCoefficients(inner, {"a": 0.5}, zo_adam(0.05))
    state = trainer.init(key(1), params)
    spatial, param = trainer.step_keys(state)
    g, _ = coefficient_gradient(
        loss, ("a",), params, state.coefficients, spatial, fold_in(param, "coefficients")
    )
    reference = _copy(b, params)
    reference, _, _ = inner.step(
        bind_coefficients(loss, {"a": state.coefficients[0]}), reference, inner.init(key(1), params)
    )
    params, state, info = trainer.step(loss, params, state)
    expected = 0.5 - 0.05 * math.copysign(1.0, float(g[0]))
    assert trainer.coefficients(state)["a"] == pytest.approx(expected, rel=1e-12)
    assert isinstance(state, CoefficientState) and state.step == 1 and math.isfinite(info.loss)
    for p, r in zip(params, reference, strict=True):
        np.testing.assert_allclose(b.to_host(p["W"]), b.to_host(r["W"]), rtol=1e-12)


@pytest.mark.parametrize(
    ("a", "eps", "where"),
    [(1e-300, 1e-310, "at the coefficients"), (0.0, None, "at the perturbed activities")],
)
def test_a_non_finite_loss_keeps_the_state(backend, a, eps, where):
    """a = 1e-300 (ε = 1e-310): the coefficient queries overflow (the wrapper raises);
    a = 0: they do not (a ± εz ≠ 0) but the network's step divides by 0 (the method
    raises, and the error's state becomes the wrapper's). Nothing is applied either way."""
    b, model, params, loss = problem(backend)
    trainer = TrainCoefficients(ActivityPerturbation(), {"a": a}, eps=eps)
    state = trainer.init(key(1), params)
    with pytest.raises(NonFiniteLossError, match=where) as raised:
        trainer.step(loss, params, state)
    kept = raised.value.state
    assert isinstance(kept, CoefficientState) and kept.method is state.method
    assert kept.coefficients is state.coefficients and kept.optimizer is state.optimizer


def test_the_checkpoint_restores_the_coefficients(backend, tmp_path):
    from sdze.checkpoint import load_checkpoint, save_checkpoint

    b, model, params, loss = problem(backend)
    trainer = TrainCoefficients(ActivityPerturbation(), {"a": 0.5}, zo_adam(0.05))
    state = trainer.init(key(1), params)
    for _ in range(3):
        params, state, _ = trainer.step(loss, params, state)
    save_checkpoint(tmp_path / "run.sdze", params=params, state=state, config={})
    saved = load_checkpoint(tmp_path / "run.sdze", b)
    assert trainer.coefficients(saved.state) == trainer.coefficients(state)
    assert saved.state.step == 3 and saved.state.optimizer.count == 3
    resumed = trainer.step(loss, saved.params, saved.state)[1]
    straight = trainer.step(loss, params, state)[1]
    assert trainer.coefficients(resumed) == pytest.approx(trainer.coefficients(straight))


@pytest.mark.parametrize("name", AUTODIFF)
def test_first_order_recovers_the_diffusivity(name):
    """600 first-order steps (network Adam 3e-3, a's Adam 0.05) from a = 0.5 recover
    a* = 2 to within 0.15 and u* to rel-L2 < 0.06 (measured on torch: a = 1.935,
    rel-L2 3.3e-2, 11 s)."""
    from sdze.testing import get_backend_under_test

    b, model, params, loss = problem(get_backend_under_test(name))
    trainer = TrainCoefficients(FirstOrderAdam(3e-3), {"a": 0.5}, zo_adam(0.05))
    state = trainer.init(key(1), params)
    for _ in range(600):
        params, state, _ = trainer.step(loss, params, state)
    a = trainer.coefficients(state)["a"]
    exact, _ = manufactured(b.xp)
    x = Ball().sample(b, key(9), 500, D)
    u, u_star = b.to_host(model.apply(params, x)), b.to_host(exact(x))
    rel = float(np.linalg.norm(u - u_star) / np.linalg.norm(u_star))
    print(f"{name}: a {a:.4f}, rel_l2 {rel:.3e}")
    assert abs(a - A_TRUE) < 0.15 and rel < 0.06


def test_train_checks_the_saved_network_with_the_coefficients_bound(backend):
    """train()'s checkpoint callback evaluates the loss of the network to be saved: with
    TrainCoefficients that loss is bound to the current c (unbound it would raise)."""
    from sdze_core.training import TrainState, train

    b, model, params, loss = problem(backend)
    trainer = TrainCoefficients(ActivityPerturbation(), {"a": 0.5}, zo_adam(0.05))
    saved = []
    result = train(
        trainer, loss, params, TrainState(trainer.init(key(1), params)), 4, model=model,
        checkpoint_every=2, on_checkpoint=lambda p, s: saved.append(trainer.coefficients(s.method)),
    )
    assert result.divergence is None and result.state.step == 4 and len(saved) == 2
    assert saved[-1] == trainer.coefficients(result.state.method) != {"a": 0.5}
