"""The first-order baseline (docs/method.md#baselines): backend autodiff through the jet oracles,
and Adam on the exact gradient of the step's stochastic loss.

Problems: u = g(x) N(x) with N an MLP (d, 16, 16, 1); on the ball the residual
Δu − F(u, x) with a sparse Laplacian, on the annulus Δ²u − F(u, x) with a sparse
biharmonic. Gradients are checked against central differences in float64.
"""

import math

import numpy as np
import pytest

from helpers import copy_params, host, host_params
from sdze.testing import get_backend_under_test
from sdze_core.backend import AutodiffNotAvailableError
from sdze_core.engine import SDZE, StepInfo
from sdze_core.first_order import FirstOrderAdam, FirstOrderState
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss
from sdze_core.optimizers import linear_decay
from sdze_core.oracles import (
    ExactLaplacian,
    HutchinsonLaplacian,
    SparseBiharmonic,
    SparseLaplacian,
)
from sdze_core.perturbers import NonFiniteLossError

D = 5
AUTODIFF = ["torch", "jax"]
FD_RTOL = 1e-6  # measured: 5e-9 to 6e-8 relative error with h = 1e-5


def backend64(name):
    return get_backend_under_test(name, dtype="float64")


def fixed_points(b, radius=None, batch=8, seed=0):
    """A fixed float64 batch: inside the ball of radius 0.45, or on the sphere ``radius``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-0.2, 0.2, size=(batch, D))
    if radius is not None:
        x = radius * x / np.linalg.norm(x, axis=1, keepdims=True)
    xb = b.asarray(x, dtype=b.dtype)
    return lambda k: xb


def rhs(u, x):
    return u * u * u - x[:, 0] * u + 1.0


def random_points(b, batch=16):
    return lambda k: 0.8 * (b.uniform(k, (batch, D)) - 0.5)  # inside the unit ball


def poisson_loss(b, oracle=None, points=None, right=rhs, unbiased=False):
    model = Ansatz(MLP((D, 16, 16, 1)), "ball")
    oracle = oracle or SparseLaplacian(num_directions=3)
    return ResidualLoss(model, oracle, right, points or fixed_points(b), unbiased)


def directional_fd_errors(b, loss, params, xi, grads, count=3, h=1e-5):
    """Relative errors of ⟨∇ℓ, δ⟩ against central differences for random δ."""
    base = host_params(b, params)
    gradient = host_params(b, grads)
    rng = np.random.default_rng(1)
    errors = []
    for _ in range(count):
        delta = [{k: rng.standard_normal(v.shape) for k, v in p.items()} for p in base]

        def at(s, delta=delta):
            shifted = [
                {k: b.asarray(p[k] + s * dp[k], dtype=b.dtype) for k in p}
                for p, dp in zip(base, delta, strict=True)
            ]
            return float(loss(shifted, xi))

        fd = (at(h) - at(-h)) / (2 * h)
        exact = sum(
            float(np.sum(g[k] * dp[k])) for g, dp in zip(gradient, delta, strict=True) for k in g
        )
        errors.append(abs(fd - exact) / abs(exact))
    return errors


# -- value_and_grad ------------------------------------------------------------------------


@pytest.mark.parametrize("name", AUTODIFF)
@pytest.mark.parametrize(
    "oracle, unbiased",
    [
        (SparseLaplacian(num_directions=3), False),
        (SparseLaplacian(num_directions=3, collapse=False), True),
        (ExactLaplacian(), False),
        (HutchinsonLaplacian(num_directions=3), False),
    ],
    ids=["sparse", "sparse-uncollapsed-unbiased", "exact", "hutchinson"],
)
def test_value_and_grad_matches_finite_differences(name, oracle, unbiased):
    b = backend64(name)
    loss = poisson_loss(b, oracle, unbiased=unbiased)
    params = loss.model.init(key(1), b)
    xi = loss.sample(key(2))
    value, grads = b.value_and_grad(loss)(params, xi)
    assert abs(float(value) - float(loss(params, xi))) <= 1e-12 * abs(float(value))
    assert max(directional_fd_errors(b, loss, params, xi, grads)) < FD_RTOL


@pytest.mark.parametrize("name", AUTODIFF)
def test_value_and_grad_with_drawn_points(name):
    b = backend64(name)
    loss = poisson_loss(b, points=random_points(b))
    params = loss.model.init(key(3), b)
    xi = loss.sample(key(4))
    value, grads = b.value_and_grad(loss)(params, xi)
    assert math.isfinite(float(value))
    assert max(directional_fd_errors(b, loss, params, xi, grads)) < FD_RTOL


def test_biharmonic_on_the_annulus_matches_finite_differences():
    b = backend64("torch")
    model = Ansatz(MLP((D, 16, 16, 1)), "annulus")
    loss = ResidualLoss(model, SparseBiharmonic(num_pairs=4), rhs, fixed_points(b, radius=1.5))
    params = model.init(key(5), b)
    xi = loss.sample(key(6))
    value, grads = b.value_and_grad(loss)(params, xi)
    assert abs(float(value) - float(loss(params, xi))) <= 1e-12 * abs(float(value))
    assert max(directional_fd_errors(b, loss, params, xi, grads)) < FD_RTOL


@pytest.mark.parametrize("name", AUTODIFF)
def test_gradients_have_the_parameters_structure(name):
    b = get_backend_under_test(name)  # float32
    loss = poisson_loss(b, points=random_points(b))
    params = loss.model.init(key(7), b)
    value, grads = b.value_and_grad(loss)(params, loss.sample(key(8)))
    assert tuple(value.shape) == ()
    assert len(grads) == len(params)
    for p, g in zip(params, grads, strict=True):
        assert set(g) == set(p)
        for k in p:
            assert tuple(g[k].shape) == tuple(p[k].shape) and g[k].dtype == p[k].dtype


def test_torch_leaves_the_parameters_untracked():
    b = backend64("torch")
    loss = poisson_loss(b)
    params = loss.model.init(key(1), b)
    value, grads = b.value_and_grad(loss)(params, loss.sample(key(2)))
    assert not value.requires_grad
    for p, g in zip(params, grads, strict=True):
        for k in p:
            assert not p[k].requires_grad and p[k].grad is None
            assert not g[k].requires_grad


def test_torch_unused_parameters_get_zero_gradients():
    b = backend64("torch")
    params = [{"W": b.asarray(np.ones((2, 2))), "b": b.asarray(np.ones(2))}]
    value, grads = b.value_and_grad(lambda p, s: s * b.xp.sum(p[0]["W"]))(params, 3.0)
    assert float(value) == 12.0
    np.testing.assert_array_equal(host(b, grads[0]["W"]), np.full((2, 2), 3.0))
    np.testing.assert_array_equal(host(b, grads[0]["b"]), np.zeros(2))


def test_jax_falls_back_to_eager_on_python_control_flow():
    b = backend64("jax")

    def branching(u, x):  # bool() of a traced value: cannot be jitted
        return rhs(u, x) if bool(u[0] > -1e300) else u

    loss = poisson_loss(b, right=branching)
    params = loss.model.init(key(1), b)
    xi = loss.sample(key(2))
    for _ in range(2):  # the second call goes straight to the eager path
        value, grads = b.value_and_grad(loss)(params, xi)
        assert abs(float(value) - float(loss(params, xi))) <= 1e-12 * abs(float(value))
    assert max(directional_fd_errors(b, loss, params, xi, grads, count=1)) < FD_RTOL


@pytest.mark.parametrize("name", ["numpy", "array_api_strict"])
def test_backends_without_autodiff_say_so(name):
    b = backend64(name)
    with pytest.raises(AutodiffNotAvailableError, match=f"backend '{name}'"):
        b.value_and_grad(lambda p: p)
    assert issubclass(AutodiffNotAvailableError, TypeError)
    loss = poisson_loss(b)
    params = loss.model.init(key(0), b)
    method = FirstOrderAdam()
    with pytest.raises(AutodiffNotAvailableError, match="--method sdze"):
        method.step(loss, params, method.init(key(1), params))


# -- FirstOrderAdam ------------------------------------------------------------------------


def train(b, loss, steps, learning_rate=1e-2, seed=0):
    method = FirstOrderAdam(learning_rate=learning_rate)
    params = loss.model.init(key(seed), b)
    state = method.init(key(seed + 1), params)
    losses = []
    for _ in range(steps):
        params, state, info = method.step(loss, params, state)
        losses.append(info.loss)
    return params, state, losses


def test_defaults_are_stdes_setting():
    method = FirstOrderAdam()
    schedule = linear_decay(1e-3, 10_000)
    for t in (0, 1, 5_000, 10_000, 20_000):
        assert method.learning_rate(t) == schedule(t)
    assert (method.b1, method.b2, method.eps) == (0.9, 0.999, 1e-8)
    for bad in ({"b1": 1.0}, {"b2": -0.1}, {"eps": 0.0}, {"learning_rate": -1.0}):
        with pytest.raises(ValueError):
            FirstOrderAdam(**bad)


@pytest.mark.parametrize("name", AUTODIFF)
def test_adam_update_formula(name):
    """Three steps against Adam with bias correction computed on the host."""
    b = backend64(name)
    loss = poisson_loss(b, points=random_points(b))
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-8
    method = FirstOrderAdam(learning_rate=lambda t: lr / (1 + t), b1=b1, b2=b2, eps=eps)
    params = loss.model.init(key(0), b)
    state = method.init(key(1), params)
    expected = host_params(b, params)
    m = [{k: np.zeros_like(v) for k, v in p.items()} for p in expected]
    v = [{k: np.zeros_like(a) for k, a in p.items()} for p in expected]
    for t in range(3):
        xi = loss.sample(method.step_keys(state)[0])
        value, grads = b.value_and_grad(loss)(copy_params(b, params), xi)
        grads = host_params(b, grads)
        params, state, info = method.step(loss, params, state)
        assert isinstance(info, StepInfo) and info.g is None
        assert info.loss == float(value)
        assert state.step == t + 1 and state.count == t + 1
        c = t + 1
        for p, mp, vp, gp in zip(expected, m, v, grads, strict=True):
            for k in p:
                mp[k] = b1 * mp[k] + (1 - b1) * gp[k]
                vp[k] = b2 * vp[k] + (1 - b2) * gp[k] ** 2
                mhat, vhat = mp[k] / (1 - b1**c), vp[k] / (1 - b2**c)
                p[k] = p[k] - lr / (1 + t) * mhat / (np.sqrt(vhat) + eps)
        for p, q in zip(host_params(b, params), expected, strict=True):
            for k in p:
                np.testing.assert_allclose(p[k], q[k], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", AUTODIFF)
def test_training_lowers_the_loss_deterministically(name):
    b = backend64(name)
    loss = poisson_loss(b, SparseLaplacian(num_directions=2), points=random_points(b))
    held_out = loss.sample(key(123))
    start = float(loss(loss.model.init(key(0), b), held_out))
    params, state, losses = train(b, loss, 50)
    end = float(loss(params, held_out))
    # Measured: 79 -> 0.37 (torch), 75 -> 0.17 (jax), a factor of 200 or more.
    assert end < start / 20
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) / 20
    again, state_again, losses_again = train(b, loss, 50)
    assert losses_again == losses
    for p, q in zip(host_params(b, params), host_params(b, again), strict=True):
        for k in p:
            np.testing.assert_array_equal(p[k], q[k])
    assert isinstance(state, FirstOrderState) and state.step == 50


def test_same_spatial_keys_as_sdze():
    b = backend64("torch")
    seen = {"first_order": [], "sdze": []}

    def recording(which):
        def points(k):
            seen[which].append(k)
            return 0.8 * (b.uniform(k, (8, D)) - 0.5)

        return points

    for which, method in (("first_order", FirstOrderAdam(1e-3)), ("sdze", SDZE())):
        loss = poisson_loss(b, points=recording(which))
        params = loss.model.init(key(0), b)
        state = method.init(key(42), params)
        for _ in range(3):
            params, state, _ = method.step(loss, params, state)
    assert len(seen["first_order"]) == 3
    assert seen["first_order"] == seen["sdze"]

    first, zeroth = FirstOrderAdam(), SDZE()
    params = poisson_loss(b).model.init(key(0), b)
    s1, s0 = first.init(key(9), params), zeroth.init(key(9), params)
    assert s1.key == s0.key == fold_in(key(9), "steps")
    for t in (0, 1, 7, 1000):
        assert first.step_keys(s1._replace(step=t)) == zeroth.step_keys(s0._replace(step=t))


@pytest.mark.parametrize("name", AUTODIFF)
def test_nan_loss_raises_and_applies_nothing(name):
    b = backend64(name)
    good = poisson_loss(b, points=random_points(b))
    bad = poisson_loss(b, points=random_points(b), right=lambda u, x: u * float("nan"))
    method = FirstOrderAdam(learning_rate=1e-2)
    params = good.model.init(key(0), b)
    state = method.init(key(1), params)
    params, state, _ = method.step(good, params, state)
    before, moments = host_params(b, params), host_params(b, state.mu)
    with pytest.raises(NonFiniteLossError) as caught:
        method.step(bad, params, state)
    error = caught.value
    assert error.step == 1 and len(error.losses) == 1 and math.isnan(error.losses[0])
    assert error.params is params and error.state is state
    for now, then in ((params, before), (state.mu, moments)):
        for p, q in zip(host_params(b, now), then, strict=True):
            for k in p:
                np.testing.assert_array_equal(p[k], q[k])
    # Training goes on from the last good state.
    params, state, info = method.step(good, error.params, error.state)
    assert math.isfinite(info.loss) and state.step == 2


def test_merge_and_evaluation_model_are_trivial():
    b = backend64("torch")
    method = FirstOrderAdam()
    model = poisson_loss(b).model
    params = model.init(key(0), b)
    state = method.init(key(1), params)
    assert method.merge(params, state) == (state, params)
    assert method.evaluation_model(model, params, state) is model
