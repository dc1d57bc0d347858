"""Zeroth-order optimizers with O(1) state in P, optax-style
(docs/method.md#subspace-perturbations).

An optimizer is a pair of pure functions with explicit state::

    opt = zo_adam(learning_rate=cosine_decay(1e-3, 10_000))
    state = opt.init(coords)                       # coords: the sampler's coordinates
    state = opt.rebase(state, transition)          # only when the bases changed
    updates, state = opt.update(coords, state, step)

``coords`` is the gradient estimate in the sampler's coordinates (r × r per
weight matrix for :class:`~sdze_core.samplers.LowRankSubspace`, a vector per
bias) and ``updates`` the step in the same coordinates, which the sampler adds
to the parameters (W ← W + U D Vᵀ). No optimizer holds anything of size P:

* :func:`zo_sgd` without momentum keeps a step counter only: the directions
  are regenerated from their keys when the step is applied (seed replay);
* momentum and Adam keep their moments in subspace coordinates, O(r²) per
  layer (plus the bias vectors). When the sampler draws new bases,
  ``rebase`` receives ``transition`` = per layer (R_U, R_V) =
  (U_newᵀ U_old, V_newᵀ V_old) and the moments are either projected onto the
  new subspace (m ← R_U m R_Vᵀ; for
  Adam's second moment the elementwise squares of R_U, R_V, exact when the
  bases are permuted) or reset, per ``on_refresh``.

Learning rates are floats or schedules ``step -> float`` (:func:`constant`,
:func:`linear_decay`, :func:`cosine_decay`). ``normalize=True`` divides the
estimate by its norm (‖U G Vᵀ‖_F = ‖G‖_F, since U and V are orthonormal).
"""

from __future__ import annotations

from collections.abc import Callable
from math import cos, pi, sqrt
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .validation import count, fraction, nonnegative_number, positive_number

__all__ = [
    "Optimizer",
    "constant",
    "linear_decay",
    "cosine_decay",
    "as_schedule",
    "zo_sgd",
    "zo_adam",
    "state_nbytes",
    "ON_REFRESH",
]

#: What momentum and Adam do with their moments when the bases change.
ON_REFRESH = ("project", "reset")

Schedule = Callable[[int], float]


# -- schedules ------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """η_t = value (finite, >= 0: 0 freezes the parameters)."""
    value = nonnegative_number("learning_rate", value)
    return lambda step: value


def linear_decay(init_value: float, decay_steps: int, end_value: float = 0.0) -> Schedule:
    """η_t = init + (end − init) min(t, T) / T (STDE's schedule with end = 0)."""
    a, T = positive_number("init_value", init_value), count("decay_steps", decay_steps)
    b = nonnegative_number("end_value", end_value)
    return lambda step: a + (b - a) * min(int(step), T) / T


def cosine_decay(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """η_t = init ((1 − α) (1 + cos(π min(t, T) / T)) / 2 + α)."""
    a, T = positive_number("init_value", init_value), count("decay_steps", decay_steps)
    alpha = fraction("alpha", alpha, closed=True)
    return lambda step: a * ((1 - alpha) * 0.5 * (1 + cos(pi * min(int(step), T) / T)) + alpha)


def as_schedule(learning_rate) -> Schedule:
    """A schedule from a float (constant, finite and > 0) or a callable (kept)."""
    if callable(learning_rate):
        return learning_rate
    return constant(positive_number("learning_rate", learning_rate))


# -- coordinate trees (lists of dicts of arrays) ---------------------------------------------


def _map(fn, *trees):
    return [
        {name: fn(*(t[name] for t in leaves)) for name in leaves[0]}
        for leaves in zip(*trees, strict=True)
    ]


def _norm(tree) -> float:
    total = 0.0
    for leaves in tree:
        for a in leaves.values():
            xp = array_namespace(a)
            total += float(xp.sum(a * a))
    return sqrt(total)


def _project(tree, transition, squared: bool = False):
    """Moments of the weight coordinates mapped to the new bases (biases unchanged)."""
    if transition is None:
        return tree
    out = []
    for leaves, (RU, RV) in zip(tree, transition, strict=True):
        xp = array_namespace(RU)
        if squared:
            RU, RV = RU * RU, RV * RV
        out.append({**leaves, "W": RU @ leaves["W"] @ xp.matrix_transpose(RV)})
    return out


def state_nbytes(state) -> int:
    """Bytes held in arrays by an optimizer state (scalars and keys count 0)."""
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(s) for s in state)
    if isinstance(state, dict):
        return sum(state_nbytes(s) for s in state.values())
    if hasattr(state, "shape") and hasattr(state, "dtype"):
        size = 1
        for n in state.shape:
            size *= int(n)
        xp = array_namespace(state)
        complex_factor = 2 if xp.isdtype(state.dtype, "complex floating") else 1
        return size * complex_factor * (xp.finfo(state.dtype).bits // 8)
    return 0


# -- optimizers -----------------------------------------------------------------------------


class Optimizer(NamedTuple):
    """A pure optimizer: ``init(coords) -> state``,
    ``update(coords, state, step) -> (updates, state)`` and
    ``rebase(state, transition) -> state`` (the moments in new bases).

    Attributes
    ----------
    needs_coordinates : bool
        Whether the state holds moments (then the sampler must have small
        coordinates: momentum on a full-space Gaussian would be P-sized).
    """

    init: Callable
    update: Callable
    rebase: Callable
    needs_coordinates: bool


class SGDState(NamedTuple):
    """ZO-SGD state: the momentum buffer in coordinates (``None`` without momentum)."""

    momentum: Any


class AdamState(NamedTuple):
    """ZO-Adam state: ``count`` steps since the moments were (re)set, ``mu`` and ``nu``."""

    count: int
    mu: Any
    nu: Any


def _check_on_refresh(on_refresh: str) -> str:
    if on_refresh not in ON_REFRESH:
        raise ValueError(f"on_refresh must be one of {ON_REFRESH}, got {on_refresh!r}")
    return on_refresh


def _normalized(coords, normalize: bool):
    if not normalize:
        return coords
    norm = _norm(coords)
    return coords if norm == 0.0 else _map(lambda a: a / norm, coords)


def zo_sgd(
    learning_rate=1e-3, momentum: float = 0.0, normalize: bool = False, on_refresh="project"
) -> Optimizer:
    """ZO-SGD: θ ← θ − η_t ĝ, or with heavy-ball momentum m ← β m + ĝ, θ ← θ − η_t m.

    Without momentum the state is empty: the step regenerates the directions
    from their keys (seed replay). With momentum, m lives in subspace
    coordinates (r × r per weight matrix) and is projected or reset when the
    bases change (``on_refresh``).

    Parameters
    ----------
    learning_rate : float or callable
        η or a schedule ``step -> η``.
    momentum : float
        β in [0, 1).
    normalize : bool
        Use ĝ / ‖ĝ‖.
    on_refresh : {"project", "reset"}
    """
    schedule = as_schedule(learning_rate)
    beta = fraction("momentum", momentum)
    _check_on_refresh(on_refresh)

    def init(coords) -> SGDState:
        if beta == 0.0:
            return SGDState(None)
        return SGDState(_map(lambda a: array_namespace(a).zeros_like(a), coords))

    def update(coords, state: SGDState, step: int):
        g = _normalized(coords, normalize)
        lr = schedule(step)
        if state.momentum is None:
            return _map(lambda a: -lr * a, g), state
        m = _map(lambda a, b: beta * a + b, state.momentum, g)
        return _map(lambda a: -lr * a, m), SGDState(m)

    def rebase(state: SGDState, transition) -> SGDState:
        m = state.momentum
        if m is None or transition is None:
            return state
        if on_refresh == "project":
            return SGDState(_project(m, transition))
        return SGDState(_map(lambda a: array_namespace(a).zeros_like(a), m))

    # Normalising needs ‖ĝ‖, which only a subspace's coordinates give.
    return Optimizer(init, update, rebase, needs_coordinates=beta != 0.0 or normalize)


def zo_adam(
    learning_rate=1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    normalize: bool = False,
    on_refresh: str = "reset",
) -> Optimizer:
    """ZO-Adam in subspace coordinates (Kingma & Ba with bias correction).

    m ← b1 m + (1 − b1) ĝ, v ← b2 v + (1 − b2) ĝ², step −η_t m̂ / (√v̂ + eps)
    with m̂ = m / (1 − b1^t), v̂ = v / (1 − b2^t), all of size r × r per weight
    matrix and m per bias. At a basis refresh the moments are reset (t ← 0,
    default) or projected (``on_refresh``).
    """
    schedule = as_schedule(learning_rate)
    b1, b2 = fraction("b1", b1), fraction("b2", b2)
    eps = positive_number("eps", eps)
    _check_on_refresh(on_refresh)

    def init(coords) -> AdamState:
        zeros = _map(lambda a: array_namespace(a).zeros_like(a), coords)
        return AdamState(0, zeros, _map(lambda a: array_namespace(a).zeros_like(a), coords))

    def update(coords, state: AdamState, step: int):
        g = _normalized(coords, normalize)
        count, mu, nu = state
        count += 1
        mu = _map(lambda m, a: b1 * m + (1 - b1) * a, mu, g)
        nu = _map(lambda v, a: b2 * v + (1 - b2) * a * a, nu, g)
        lr = schedule(step)
        c1, c2 = 1 - b1**count, 1 - b2**count

        def direction(m, v):
            xp = array_namespace(m)
            return (-lr / c1) * m / (xp.sqrt(v / c2) + eps)

        return _map(direction, mu, nu), AdamState(count, mu, nu)

    def rebase(state: AdamState, transition) -> AdamState:
        if transition is None:
            return state
        if on_refresh == "project":
            mu = _project(state.mu, transition)
            return AdamState(state.count, mu, _project(state.nu, transition, squared=True))
        return init(state.mu)

    return Optimizer(init, update, rebase, needs_coordinates=True)
