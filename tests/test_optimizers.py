"""Zeroth-order optimizers and schedules (docs/method.md#subspace-perturbations): values
against hand-written recursions, refresh handling, and O(1)-in-P state."""

import math

import numpy as np
import pytest

from helpers import f64, host
from sdze_core.engine import SDZE
from sdze_core.keys import fold_in, key
from sdze_core.models import MLP
from sdze_core.optimizers import (
    AdamState,
    SGDState,
    as_schedule,
    constant,
    cosine_decay,
    linear_decay,
    state_nbytes,
    zo_adam,
    zo_sgd,
)
from sdze_core.samplers import FullGaussian, LowRankSubspace

RTOL64 = 1e-12
SHAPES = [((3, 3), (4,)), ((1, 1), (1,))]  # r × r weight and bias coordinates per layer


def host_tree(b, tree):
    return [{k: host(b, v) for k, v in leaves.items()} for leaves in tree]


def assert_close(actual, expected, rtol=RTOL64):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


def assert_trees_close(b, actual, expected, rtol=RTOL64):
    actual = host_tree(b, actual)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert set(a) == set(e) == {"W", "b"}
        for name in a:
            assert_close(a[name], e[name], rtol)


def coords(b, seed):
    """A coordinate tree (the shape of LowRankSubspace.project's output)."""
    return [
        {
            "W": b.normal(fold_in(key(seed), 2 * layer), w),
            "b": b.normal(fold_in(key(seed), 2 * layer + 1), v),
        }
        for layer, (w, v) in enumerate(SHAPES)
    ]


def transition(b, seed):
    """Arbitrary (R_U, R_V) per layer."""
    return tuple(
        (b.normal(fold_in(key(seed), 2 * layer), w), b.normal(fold_in(key(seed), 2 * layer + 1), w))
        for layer, (w, _) in enumerate(SHAPES)
    )


# -- schedules -------------------------------------------------------------------------------


def test_constant():
    schedule = constant(0.25)
    assert [schedule(t) for t in (0, 1, 10**6)] == [0.25, 0.25, 0.25]


def test_linear_decay():
    schedule = linear_decay(1.0, 10, end_value=0.1)
    assert schedule(0) == pytest.approx(1.0, abs=1e-15)
    assert schedule(5) == pytest.approx(0.55, abs=1e-15)
    assert schedule(9) == pytest.approx(0.19, abs=1e-15)
    assert schedule(10) == pytest.approx(0.1, abs=1e-15)
    assert schedule(1000) == pytest.approx(0.1, abs=1e-15)
    to_zero = linear_decay(2.0, 4)
    assert [to_zero(t) for t in range(6)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])


def test_cosine_decay():
    schedule = cosine_decay(2.0, 10, alpha=0.1)
    assert schedule(0) == pytest.approx(2.0, abs=1e-15)
    assert schedule(5) == pytest.approx(2.0 * (0.9 * 0.5 + 0.1), abs=1e-15)
    assert schedule(10) == pytest.approx(0.2, abs=1e-15)
    assert schedule(25) == pytest.approx(0.2, abs=1e-15)
    expected = 2.0 * (0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 10)) + 0.1)
    assert schedule(3) == pytest.approx(expected, abs=1e-15)
    plain = cosine_decay(1.0, 4)
    assert [plain(t) for t in range(5)] == pytest.approx(
        [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0],
        abs=1e-15,
    )


def test_as_schedule():
    schedule = as_schedule(0.5)
    assert schedule(0) == 0.5 and schedule(123) == 0.5
    custom = linear_decay(1.0, 3)
    assert as_schedule(custom) is custom
    assert as_schedule(3)(7) == 3.0


@pytest.mark.parametrize("value", [0.0, -1e-3, -1, float("nan"), float("inf")])
def test_as_schedule_rejects_non_positive(value):
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        as_schedule(value)


@pytest.mark.parametrize("factory", [linear_decay, cosine_decay])
def test_decay_rejects_bad_steps(factory):
    with pytest.raises(ValueError, match="decay_steps must be an int >= 1"):
        factory(1.0, 0)


# -- ZO-SGD ----------------------------------------------------------------------------------


def test_sgd_without_momentum_is_stateless(backend):
    b = f64(backend)
    opt = zo_sgd(learning_rate=linear_decay(0.5, 10))
    assert not opt.needs_coordinates
    state = opt.init(coords(b, 0))
    assert state == SGDState(None)
    assert state_nbytes(state) == 0
    for step in range(3):
        g = coords(b, step)
        updates, state = opt.update(g, state, step)
        assert state == SGDState(None)
        lr = 0.5 * (1 - step / 10)
        assert_trees_close(
            b, updates, [{k: -lr * v for k, v in t.items()} for t in host_tree(b, g)]
        )


@pytest.mark.parametrize("on_refresh", ["project", "reset"])
def test_sgd_momentum_matches_recursion(backend, on_refresh):
    b = f64(backend)
    beta, lr = 0.7, 0.1
    opt = zo_sgd(lr, momentum=beta, on_refresh=on_refresh)
    assert opt.needs_coordinates
    state = opt.init(coords(b, 0))
    assert state_nbytes(state) == 8 * sum(math.prod(w) + math.prod(v) for w, v in SHAPES)
    m = [{k: np.zeros(v.shape) for k, v in t.items()} for t in host_tree(b, coords(b, 0))]
    for step in range(5):
        g = coords(b, 10 + step)
        tr = transition(b, 20 + step) if step == 3 else None
        state = opt.rebase(state, tr)
        updates, state = opt.update(g, state, step)
        if tr is not None:
            for leaves, (RU, RV) in zip(m, tr, strict=True):
                if on_refresh == "project":
                    leaves["W"] = host(b, RU) @ leaves["W"] @ host(b, RV).T
                else:
                    leaves["W"] = np.zeros_like(leaves["W"])
                    leaves["b"] = np.zeros_like(leaves["b"])
        m = [
            {k: beta * mv[k] + gv[k] for k in mv} for mv, gv in zip(m, host_tree(b, g), strict=True)
        ]
        assert_trees_close(b, state.momentum, m)
        assert_trees_close(b, updates, [{k: -lr * v for k, v in t.items()} for t in m])


def test_sgd_normalize_gives_unit_direction(backend):
    b = f64(backend)
    lr = 0.3
    g = coords(b, 1)
    flat = np.concatenate([v.ravel() for t in host_tree(b, g) for v in t.values()])
    norm = np.linalg.norm(flat)
    assert abs(norm - 1) > 0.1  # normalization is not a no-op here
    updates, _ = zo_sgd(lr, normalize=True).update(g, zo_sgd(lr).init(g), 0)
    u = host_tree(b, updates)
    flat_u = np.concatenate([v.ravel() for t in u for v in t.values()])
    assert np.linalg.norm(flat_u) == pytest.approx(lr, rel=1e-12)
    np.testing.assert_allclose(flat_u, -lr * flat / norm, rtol=0, atol=1e-14)
    # A zero estimate stays zero (no division by zero).
    zero = [{k: 0 * v for k, v in t.items()} for t in g]
    updates, _ = zo_sgd(lr, normalize=True).update(zero, zo_sgd(lr).init(zero), 0)
    for t in host_tree(b, updates):
        for v in t.values():
            assert np.all(v == 0)


def test_normalize_needs_small_coordinates():
    """‖ĝ‖ is the coordinates' norm only in a subspace; the full-space sampler is refused."""
    assert zo_sgd(normalize=True).needs_coordinates
    with pytest.raises(ValueError, match="FullGaussian has no small coordinates"):
        SDZE(sampler=FullGaussian(), optimizer=zo_sgd(normalize=True))


@pytest.mark.parametrize("sampler_kind", ["lowrank"])
def test_sgd_normalize_step_has_norm_lr_in_parameter_space(backend, sampler_kind):
    """θ ← θ − η ĝ / ‖ĝ‖ (the documented contract): the parameters move by exactly η.

    For the low-rank subspace the coordinates' norm is ‖ĝ‖ (‖U G Vᵀ‖_F = ‖G‖_F).
    """
    b = f64(backend)
    xp = b.xp
    lr = 0.1
    params = MLP((4, 8, 8, 1)).init(key(0), b)
    before = [{k: np.array(b.to_host(v)) for k, v in p.items()} for p in params]
    if sampler_kind == "lowrank":
        sampler = LowRankSubspace(rank=3, merge_every="step")
    else:
        sampler = FullGaussian()
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 2)
    g = sampler.project(directions, b.asarray([1.5, -0.5], dtype=b.dtype))
    opt = zo_sgd(lr, normalize=True)
    updates, _ = opt.update(g, opt.init(g), 0)
    params = [{k: xp.asarray(v, copy=True) for k, v in p.items()} for p in params]
    _, params = sampler.apply(state, params, directions, updates)
    moved = math.sqrt(
        sum(
            float(np.sum((host(b, p[k]) - o[k]) ** 2))
            for p, o in zip(params, before, strict=True)
            for k in ("W", "b")
        )
    )
    assert moved == pytest.approx(lr, rel=1e-10)


# -- ZO-Adam ---------------------------------------------------------------------------------


def adam_reference(gs, lr_of, b1, b2, eps):
    """Kingma & Ba with bias correction, on host trees; returns the updates per step."""
    m = [{k: np.zeros_like(v) for k, v in t.items()} for t in gs[0]]
    v = [{k: np.zeros_like(a) for k, a in t.items()} for t in gs[0]]
    out = []
    for t, g in enumerate(gs, start=1):
        step = []
        for mt, vt, gt in zip(m, v, g, strict=True):
            leaves = {}
            for k in gt:
                mt[k] = b1 * mt[k] + (1 - b1) * gt[k]
                vt[k] = b2 * vt[k] + (1 - b2) * gt[k] ** 2
                m_hat, v_hat = mt[k] / (1 - b1**t), vt[k] / (1 - b2**t)
                leaves[k] = -lr_of(t - 1) * m_hat / (np.sqrt(v_hat) + eps)
            step.append(leaves)
        out.append(step)
    return out, m, v


def test_adam_matches_reference(backend):
    b = f64(backend)
    b1, b2, eps = 0.8, 0.95, 1e-3  # large eps: the eps term matters
    schedule = cosine_decay(0.1, 6)
    opt = zo_adam(schedule, b1=b1, b2=b2, eps=eps)
    assert opt.needs_coordinates
    gs = [coords(b, 30 + t) for t in range(6)]
    expected, m, v = adam_reference([host_tree(b, g) for g in gs], schedule, b1, b2, eps)
    state = opt.init(gs[0])
    assert state.count == 0
    for t, g in enumerate(gs):
        updates, state = opt.update(g, state, t)
        assert state.count == t + 1
        assert_trees_close(b, updates, expected[t])
    assert_trees_close(b, state.mu, m)
    assert_trees_close(b, state.nu, v)


def test_adam_first_step_is_sign_like(backend):
    """With bias correction the first step is −η g / (|g| + eps) elementwise."""
    b = f64(backend)
    g = coords(b, 3)
    opt = zo_adam(0.01, eps=1e-8)
    updates, _ = opt.update(g, opt.init(g), 0)
    for u, gt in zip(host_tree(b, updates), host_tree(b, g), strict=True):
        for k in gt:
            assert_close(u[k], -0.01 * gt[k] / (np.abs(gt[k]) + 1e-8), 1e-10)


def test_adam_reset_on_refresh(backend):
    b = f64(backend)
    opt = zo_adam(0.05, b1=0.8, b2=0.9, on_refresh="reset")
    state = opt.init(coords(b, 0))
    for t in range(3):
        _, state = opt.update(coords(b, 40 + t), state, t)
    assert state.count == 3
    g = coords(b, 50)
    updates, state = opt.update(g, opt.rebase(state, transition(b, 51)), 3)
    assert state.count == 1
    expected, m, v = adam_reference([host_tree(b, g)], lambda t: 0.05, 0.8, 0.9, 1e-8)
    assert_trees_close(b, updates, expected[0])
    assert_trees_close(b, state.mu, m)
    assert_trees_close(b, state.nu, v)


def test_adam_project_on_refresh(backend):
    b = f64(backend)
    b1, b2, eps, lr = 0.8, 0.9, 1e-8, 0.05
    opt = zo_adam(lr, b1=b1, b2=b2, eps=eps, on_refresh="project")
    state = opt.init(coords(b, 0))
    for t in range(3):
        _, state = opt.update(coords(b, 40 + t), state, t)
    mu, nu = host_tree(b, state.mu), host_tree(b, state.nu)
    g, tr = coords(b, 50), transition(b, 51)
    updates, state = opt.update(g, opt.rebase(state, tr), 3)
    assert state.count == 4
    gh = host_tree(b, g)
    exp_mu, exp_nu, exp_u = [], [], []
    for mt, vt, gt, (RU, RV) in zip(mu, nu, gh, tr, strict=True):
        RU, RV = host(b, RU), host(b, RV)
        m_proj = {"W": RU @ mt["W"] @ RV.T, "b": mt["b"]}
        v_proj = {"W": (RU * RU) @ vt["W"] @ (RV * RV).T, "b": vt["b"]}
        new_m = {k: b1 * m_proj[k] + (1 - b1) * gt[k] for k in gt}
        new_v = {k: b2 * v_proj[k] + (1 - b2) * gt[k] ** 2 for k in gt}
        exp_mu.append(new_m)
        exp_nu.append(new_v)
        exp_u.append(
            {
                k: -lr * (new_m[k] / (1 - b1**4)) / (np.sqrt(new_v[k] / (1 - b2**4)) + eps)
                for k in gt
            }
        )
    assert_trees_close(b, state.mu, exp_mu)
    assert_trees_close(b, state.nu, exp_nu)
    assert_trees_close(b, updates, exp_u)


def test_adam_without_transition_keeps_moments(backend):
    b = f64(backend)
    for on_refresh in ("reset", "project"):
        opt = zo_adam(0.05, on_refresh=on_refresh)
        s1 = opt.init(coords(b, 0))
        s2 = opt.init(coords(b, 0))
        for t in range(3):
            u1, s1 = opt.update(coords(b, 60 + t), s1, t)
            u2, s2 = opt.update(coords(b, 60 + t), opt.rebase(s2, None), t)
        assert s1.count == s2.count == 3
        assert_trees_close(b, u1, host_tree(b, u2))


# -- O(1) state in P -------------------------------------------------------------------------


def optimizer_state(backend, d, opt):
    params = MLP((d, 16, 16, 1)).init(key(0), backend)
    sampler = LowRankSubspace(rank=4)
    state = sampler.init(key(1), params)
    directions = sampler.draw(state, params, key(2), 2)
    g = sampler.project(directions, backend.asarray([0.5, -1.0], dtype=backend.dtype))
    opt_state = opt.init(g)
    _, opt_state = opt.update(g, opt_state, 0)
    return opt_state


def test_state_nbytes_is_independent_of_p(backend):
    # Per layer r_l² + m_l coordinates: (16, d) -> 4² + 16, (16, 16) -> 4² + 16, (1, 16) -> 1 + 1.
    k = 16 + 16 + 16 + 16 + 1 + 1
    for opt, arrays in ((zo_adam(1e-3), 2), (zo_sgd(1e-3, momentum=0.9), 1), (zo_sgd(1e-3), 0)):
        small = state_nbytes(optimizer_state(backend, 10, opt))
        large = state_nbytes(optimizer_state(backend, 10_000, opt))
        assert small == large == arrays * k * 4  # float32
    b = f64(backend)
    adam = optimizer_state(b, 10_000, zo_adam(1e-3))
    assert isinstance(adam, AdamState)
    assert state_nbytes(adam) == 2 * k * 8


def test_state_nbytes_counts_arrays_only(backend):
    b = f64(backend)
    assert state_nbytes(None) == 0
    assert state_nbytes((3, 2.5, key(0))) == 0
    assert state_nbytes([{"a": b.zeros((2, 3))}, (b.zeros((5,)), 7)]) == 8 * 11
    assert state_nbytes({"x": backend.zeros((4,))}) == 16


# -- invalid arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory, kwargs, match",
    [
        (zo_sgd, {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        (zo_sgd, {"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        (zo_sgd, {"on_refresh": "keep"}, "on_refresh must be one of"),
        (zo_sgd, {"learning_rate": 0.0}, "learning_rate must be a finite number > 0"),
        (zo_sgd, {"learning_rate": -1.0}, "learning_rate must be a finite number > 0"),
        (zo_adam, {"b1": 1.0}, r"b1 must be in \[0, 1\)"),
        (zo_adam, {"b1": -0.5}, r"b1 must be in \[0, 1\)"),
        (zo_adam, {"b2": 1.5}, r"b2 must be in \[0, 1\)"),
        (zo_adam, {"on_refresh": "keep"}, "on_refresh must be one of"),
        (zo_adam, {"learning_rate": 0}, "learning_rate must be a finite number > 0"),
    ],
)
def test_optimizers_reject_bad_arguments(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)
