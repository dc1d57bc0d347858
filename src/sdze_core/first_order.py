"""The first-order baseline: STDE with back-propagation and Adam (docs/method.md#baselines).

The same jet oracle and loss as SDZE, but the gradient ∇_θ ℓ(θ; ξ_t) comes
from the backend's own reverse-mode autodiff (``torch.autograd``,
``jax.grad``: :meth:`~sdze_core.backend.Backend.value_and_grad`), and Adam
uses it directly. One step t, with the run's key k::

    spatial = fold_in(fold_in(k, t), "spatial")      # the same key as SDZE's step t
    ξ = loss.sample(spatial)
    ℓ, ∇ℓ = value_and_grad(loss)(θ, ξ)
    θ ← adam(θ, ∇ℓ, t)

:class:`FirstOrderAdam` has the interface of :class:`~sdze_core.engine.SDZE`
(``init``, ``step_keys``, ``step``, ``merge``, ``evaluation_model``), so a trainer runs
either; for the same seed both see the same collocation points and oracle
draws at every step. It needs a backend with autodiff (PyTorch, JAX).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import array_api_compat
from array_api_compat import array_namespace

from .engine import StepInfo, all_finite, step_keys
from .keys import Key, fold_in
from .optimizers import as_schedule, linear_decay
from .perturbers import NonFiniteLossError, NonFiniteUpdateError
from .registry import backend_of
from .validation import fraction, positive_number

__all__ = ["FirstOrderAdam", "FirstOrderState"]


class FirstOrderState(NamedTuple):
    """What a first-order run carries besides the parameters.

    Attributes
    ----------
    step : int
        The next step's index t.
    key : Key
        The run's step key (step t uses ``fold_in(key, t)``), as in
        :class:`~sdze_core.engine.SDZEState`.
    count : int
        Adam updates applied so far (the bias-correction exponent).
    mu, nu : list of dict
        Adam's first and second moments, shaped like the parameters (2P numbers).
    """

    step: int
    key: Key
    count: int
    mu: Any
    nu: Any


def _stde_schedule() -> Callable[[int], float]:
    return linear_decay(1e-3, 10_000)


def _map(fn, *trees):
    return [
        {name: fn(*(t[name] for t in leaves)) for name in leaves[0]}
        for leaves in zip(*trees, strict=True)
    ]


@dataclass(frozen=True)
class FirstOrderAdam:
    """First-order STDE: back-propagated gradients of the jet-oracle loss, and Adam.

    With g = ∇_θ ℓ(θ; ξ_t) (the exact gradient of the step's stochastic loss)
    and c the number of updates so far (c = t + 1 at step t)::

        m ← b1 m + (1 − b1) g,        v ← b2 v + (1 − b2) g²,
        θ ← θ − η_t m̂ / (√v̂ + eps),   m̂ = m / (1 − b1^c),  v̂ = v / (1 − b2^c),

    Kingma & Ba's Adam with bias correction, elementwise over all P
    parameters (the state holds 2P numbers, unlike SDZE's O(1) in P). The
    defaults are STDE's setting (docs/method.md#benchmark-problems): η = 1e-3 decayed linearly
    to 0 over 10 000 steps, b1 = 0.9, b2 = 0.999, eps = 1e-8.

    Parameters
    ----------
    learning_rate : float or callable
        η or a schedule ``step -> η`` (:mod:`sdze_core.optimizers`).
    b1, b2 : float
        Moment decay rates, in [0, 1).
    eps : float
        Added to √v̂.

    Examples
    --------
    >>> method = FirstOrderAdam()                       # torch or jax parameters
    >>> state = method.init(key, params)
    >>> for _ in range(1000):
    ...     params, state, info = method.step(loss, params, state)
    """

    learning_rate: Any = field(default_factory=_stde_schedule)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        as_schedule(self.learning_rate)  # validates a float
        fraction("b1", self.b1)
        fraction("b2", self.b2)
        positive_number("eps", self.eps)

    def init(self, key: Key, params) -> FirstOrderState:
        """State for a run from ``key``: zero moments, step keys from
        ``fold_in(key, "steps")`` (as :meth:`SDZE.init <sdze_core.engine.SDZE.init>`)."""

        def zeros(a):
            return array_namespace(a).zeros_like(a)

        return FirstOrderState(
            0, fold_in(key, "steps"), 0, _map(zeros, params), _map(zeros, params)
        )

    def step_keys(self, state: FirstOrderState) -> tuple[Key, Key]:
        """(spatial, parameter) keys of the next step, SDZE's (the parameter key is unused)."""
        return step_keys(state.key, state.step)

    def step(self, loss, params, state: FirstOrderState):
        """One step: ``(params, state, info)``, ``info.loss`` = ℓ(θ; ξ_t) before the update.

        Parameters and moments are updated in place where the backend's arrays
        are mutable (PyTorch: the gradient is computed on detached views, so
        nothing tracks gradients here) and functionally on JAX: keep using the
        returned ``params`` (copy them first if the originals are needed).

        Raises
        ------
        AutodiffNotAvailableError
            If the parameters' backend has no autodiff (NumPy, CuPy, ...).
        NonFiniteLossError
            If ℓ(θ; ξ_t) is NaN or Inf. Nothing is applied: the error's
            ``params`` and ``state`` are the arguments.
        NonFiniteUpdateError
            If the loss is finite but the gradient or the learning rate is not:
            nothing is applied, as above.
        """
        spatial_key, _ = self.step_keys(state)
        xi = loss.sample(spatial_key)
        value, grads = backend_of(params[0]["W"]).value_and_grad(loss)(params, xi)
        return self.apply_gradient(params, grads, state, float(value))

    def apply_gradient(self, params, grads, state: FirstOrderState, value: float):
        """The Adam update of :meth:`step` from a gradient ``grads`` (shaped like
        ``params``) of the step's loss, whose value is ``value``: ``(params, state, info)``.

        For a caller that takes the gradient itself, e.g. together with that of
        other variables (:class:`~sdze_core.coefficients.TrainCoefficients`). Raises
        as :meth:`step` does.
        """
        t = state.step
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"step {t}: the loss is not finite ({value}); the step was not applied (the "
                "error's .params and .state hold the last good state). Lower the learning "
                "rate, or check the problem.",
                step=t,
                losses=[value],
                params=params,
                state=state,
            )
        count = state.count + 1
        lr = as_schedule(self.learning_rate)(t)
        if not (math.isfinite(lr) and all_finite(grads)):
            raise NonFiniteUpdateError(
                f"step {t}: the update is not finite although the loss is ({value}; learning "
                f"rate {lr}); the step was not applied (the error's .params and .state hold "
                "the last good state).",
                step=t,
                losses=[value],
                params=params,
                state=state,
            )
        b1, b2, eps = float(self.b1), float(self.b2), float(self.eps)
        step_size, c2 = lr / (1 - b1**count), 1 - b2**count
        new_params, mu, nu = [], [], []
        for p, g_layer, m_layer, v_layer in zip(params, grads, state.mu, state.nu, strict=True):
            p_out, m_out, v_out = {}, {}, {}
            for name, theta in p.items():
                g, m, v = g_layer[name], m_layer[name], v_layer[name]
                xp = array_namespace(theta)
                if array_api_compat.is_writeable_array(theta):
                    m *= b1
                    m += (1 - b1) * g
                    v *= b2
                    v += (1 - b2) * (g * g)
                    theta -= step_size * (m / (xp.sqrt(v / c2) + eps))
                else:
                    m = b1 * m + (1 - b1) * g
                    v = b2 * v + (1 - b2) * (g * g)
                    theta = theta - step_size * (m / (xp.sqrt(v / c2) + eps))
                p_out[name], m_out[name], v_out[name] = theta, m, v
            new_params.append(p_out)
            mu.append(m_out)
            nu.append(v_out)
        new_state = FirstOrderState(t + 1, state.key, count, mu, nu)
        return new_params, new_state, StepInfo(value, None)

    def merge(self, params, state: FirstOrderState):
        """``(state, params)`` unchanged: there is no pending update to fold in."""
        return state, params

    def evaluation_model(self, model, params, state: FirstOrderState):
        """``model`` itself: the current network is the plain one (for evaluation)."""
        return model
