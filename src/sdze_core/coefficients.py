"""Inverse problems: trainable PDE coefficients (docs/inverse.md).

An inverse problem has unknown coefficients c ∈ R^K in the equation (a
reaction rate κ in −Δu + κu = f, a diffusivity, a source amplitude), fitted
together with the network from observations of u (a
:class:`~sdze_core.loss_terms.DataTerm`). Three pieces:

* :func:`uses_coefficients` marks a function of the residual, F(u, x; c) (an
  ``rhs``), as one that reads the coefficients: it is called as
  ``fn(u, x, c)`` with ``c["kappa"]`` the current value of κ;
* :func:`bind_coefficients` puts values into every marked function of a loss
  (a :class:`~sdze_core.objectives.ResidualLoss`, a
  :class:`~sdze_core.loss_terms.WeightedLoss` and its terms: any dataclass tree);
* :class:`TrainCoefficients` wraps a training method (SDZE, the activity
  engine, first-order Adam): the method trains the network on the loss bound
  to the current c, and c is updated by Adam from

  - a zeroth-order estimate with CRNS (:func:`coefficient_gradient`) for the
    zeroth-order engines: q perturbations z_i of c, both sides of each on the
    step's ξ (the same points and oracle draws as the network's estimate),

        ĝ = (1/q) Σ_i (ℓ(θ, c + ε z_i; ξ) − ℓ(θ, c − ε z_i; ξ)) / (2ε) · z_i,

    unbiased for ∇_c ℓ(θ, c; ξ) up to O(ε²) (exactly for the Gaussian-smoothed
    loss when z is Gaussian). Its variance, E‖ĝ − ∇_c ℓ‖² = (K + 1)‖∇_c ℓ‖² / q
    for Gaussian z ((K − 1)‖∇_c ℓ‖² / q for Rademacher z: exact for K = 1), up
    to O(ε²), stays bounded as ε → 0 thanks to CRNS;
  - reverse-mode autodiff for the first-order method: one pass gives ∇_θ ℓ and
    ∇_c ℓ (:func:`coefficient_autodiff`); the method's Adam updates θ with the
    former (:meth:`~sdze_core.first_order.FirstOrderAdam.apply_gradient`).

The 2q evaluations of a zeroth-order estimate are one pass of the network:
u does not depend on c, so the marked functions receive each coefficient with
a leading query axis, shape (2q, 1), which broadcasts against per-point
arrays (B,) (the loss then has shape (2q,)). Outside that estimate the values
are 0-d arrays. Coefficients enter through evaluations only: ξ is drawn
before c is perturbed, so a function called while the points are drawn (a
forcing f(x), boundary data g(x)) must not read them (it raises if it does).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .engine import all_finite
from .first_order import FirstOrderAdam
from .keys import Key, fold_in
from .optimizers import Optimizer, zo_adam
from .perturbers import NonFiniteLossError, NonFiniteUpdateError, _dtype_name, default_eps
from .registry import backend_of

__all__ = [
    "CoefficientFunction",
    "CoefficientState",
    "TrainCoefficients",
    "uses_coefficients",
    "bind_coefficients",
    "coefficient_gradient",
    "coefficient_autodiff",
    "sample_unbound",
    "DISTRIBUTIONS",
]

#: The perturbations of :func:`coefficient_gradient`.
DISTRIBUTIONS = ("gaussian", "rademacher")


class CoefficientValues(dict):
    """The coefficients by name, as a marked function receives them (a dict that names
    the known coefficients when asked for an unknown one)."""

    def __missing__(self, name):
        raise KeyError(f"no coefficient named {name!r}; the trained ones are {sorted(self)}")


class _WhileSampling(Mapping):
    """The values seen while ξ is drawn: reading one is an error (module docstring)."""

    def __getitem__(self, name):
        raise ValueError(
            f"coefficient {name!r} was read while the step's points were drawn (by a forcing "
            "f(x) or boundary data g(x), evaluated once per step before the coefficients are "
            "perturbed); let coefficients enter through the residual, e.g. rhs F(u, x; c)"
        )

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0


_SAMPLING = _WhileSampling()


@dataclass(frozen=True)
class CoefficientFunction:
    """``fn(*args, c)`` with the coefficients c bound: a marked function of a loss.

    Parameters
    ----------
    fn : callable
        ``fn(*args, c)``, e.g. ``rhs(u, x, c)``; ``c[name]`` is a 0-d array, or
        of shape (Q, 1) in a zeroth-order coefficient estimate (module docstring).
    values : mapping, optional
        The bound coefficients (:func:`bind_coefficients`); unbound: ``None``.
    """

    fn: Callable
    values: Any = None

    def __call__(self, *args):
        if self.values is None:
            raise TypeError(
                f"{getattr(self.fn, '__name__', 'a function')} reads trainable coefficients "
                "that are not bound: train with TrainCoefficients, or bind values with "
                "bind_coefficients(loss, {name: value, ...})"
            )
        return self.fn(*args, self.values)


def uses_coefficients(fn: Callable) -> CoefficientFunction:
    """Mark ``fn(*args, c)`` as reading the trainable coefficients (an unbound
    :class:`CoefficientFunction`), e.g. ``uses_coefficients(lambda u, x, c: c["kappa"] * u)``."""
    if not callable(fn):
        raise TypeError(f"uses_coefficients needs a callable fn(*args, c), got {fn!r}")
    return CoefficientFunction(fn)


def _bind(node, values, found: list):
    if isinstance(node, CoefficientFunction):
        found.append(node)
        return dataclasses.replace(node, values=values)
    if isinstance(node, (tuple, list)) and not hasattr(type(node), "_fields"):
        items = [_bind(item, values, found) for item in node]
        same = all(a is b for a, b in zip(items, node, strict=True))
        return node if same else type(node)(items)
    if not dataclasses.is_dataclass(node) or isinstance(node, type):
        return node
    changes = {}
    for f in dataclasses.fields(node):
        if f.init:
            old = getattr(node, f.name)
            new = _bind(old, values, found)
            if new is not old:
                changes[f.name] = new
    return dataclasses.replace(node, **changes) if changes else node


def bind_coefficients(loss, values: Mapping):
    """``loss`` with ``values`` bound in every :class:`CoefficientFunction` it holds.

    The loss is walked as a tree of dataclasses (their init fields), tuples and
    lists; nodes without a marked function are kept (not copied).

    Parameters
    ----------
    loss
        A loss built from dataclasses, such as a ResidualLoss or a WeightedLoss.
    values : mapping
        name -> array (0-d, or (Q, 1) for Q coefficient queries).

    Raises
    ------
    ValueError
        If ``loss`` holds no function marked with :func:`uses_coefficients`.
    """
    found: list = []
    values = values if isinstance(values, _WhileSampling) else CoefficientValues(values)
    bound = _bind(loss, values, found)
    if not found:
        raise ValueError(
            f"the loss ({type(loss).__name__}) reads no trainable coefficient: mark the "
            "function that does with uses_coefficients, e.g. rhs=uses_coefficients("
            "lambda u, x, c: c['kappa'] * u)"
        )
    return bound


def _named(names: tuple, c) -> dict:
    """{name_k: c[..., k:k+1]}: c (K,) gives 0-d values, c (Q, K) gives (Q, 1)."""
    if c.ndim == 1:
        return {name: c[k] for k, name in enumerate(names)}
    return {name: c[:, k : k + 1] for k, name in enumerate(names)}


def sample_unbound(loss, key: Key):
    """ξ of ``loss`` from ``key``, with reading a coefficient an error (module docstring)."""
    return bind_coefficients(loss, _SAMPLING).sample(key)


def _evaluate(loss, names, params, c, xi):
    """ℓ(θ, c; ξ) for each row of c (Q, K): shape (Q,)."""
    value = bind_coefficients(loss, _named(names, c))(params, xi)
    xp = array_namespace(c)
    return xp.broadcast_to(xp.asarray(value), (c.shape[0],))


def coefficient_gradient(
    loss,
    names: tuple,
    params,
    c,
    spatial_key: Key,
    key: Key,
    *,
    num_queries: int = 2,
    eps: float | None = None,
    distribution: str = "gaussian",
    crns: bool = True,
):
    """The zeroth-order estimate ĝ of ∇_c ℓ(θ, c; ξ) (module docstring) and its losses.

    Parameters
    ----------
    loss
        The loss (unbound: its marked functions receive the perturbed c).
    names : tuple of str
        The coefficients' names, in the order of c.
    params
        θ, the network's parameters (unperturbed).
    c : array (K,)
    spatial_key : Key
        ξ = loss.sample(spatial_key), shared by all 2q evaluations (CRNS).
    key : Key
        z_i, i = 0..q−1: row i of ``backend.normal(key, (q, K))`` (or ``rademacher``).
    num_queries : int
        q.
    eps : float, optional
        ε (default 1e-3 in float32, 1e-5 in float64).
    distribution : {"gaussian", "rademacher"}
    crns : bool
        ``False`` evaluates the + sides on ξ⁺ = sample(fold_in(spatial_key, "plus"))
        and the − sides on an independent ξ⁻ (the ablation: E‖ĝ‖² grows as ε⁻²).

    Returns
    -------
    g : array (K,)
    losses : array (2q,)
        ℓ at c + ε z_0, ..., c + ε z_{q−1}, then at c − ε z_0, ...
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    b = backend_of(c)
    xp = array_namespace(c)
    eps = default_eps(_dtype_name(c)) if eps is None else float(eps)
    draw = b.normal if distribution == "gaussian" else b.rademacher
    z = draw(key, (num_queries, c.shape[0]), dtype=c.dtype)
    plus, minus = c + eps * z, c - eps * z
    if crns:
        xi = sample_unbound(loss, spatial_key)
        losses = _evaluate(loss, names, params, xp.concat([plus, minus], axis=0), xi)
    else:
        xi_plus = sample_unbound(loss, fold_in(spatial_key, "plus"))
        xi_minus = sample_unbound(loss, fold_in(spatial_key, "minus"))
        losses = xp.concat(
            [_evaluate(loss, names, params, plus, xi_plus),
             _evaluate(loss, names, params, minus, xi_minus)]
        )
    slopes = (losses[:num_queries] - losses[num_queries:]) / (2.0 * eps)
    return xp.sum(slopes[:, None] * z, axis=0) / num_queries, losses


@dataclass(frozen=True)
class _JointLoss:
    """ℓ as a function of one tree [*θ, {"c": c}]: what autodiff differentiates (frozen
    and hashable, so JAX compiles it once per loss, not once per value of c)."""

    loss: Any
    names: tuple

    def __call__(self, tree, xi):
        values = _named(self.names, tree[-1]["c"])
        return bind_coefficients(self.loss, values)(tree[:-1], xi)


def coefficient_autodiff(loss, names: tuple, params, c, spatial_key: Key):
    """``(ℓ, ∇_θ ℓ, ∇_c ℓ)`` at (θ, c) on ξ = loss.sample(spatial_key), by one reverse pass
    of the backend's autodiff (∇_θ ℓ shaped like θ, ∇_c ℓ of shape (K,)).

    Raises
    ------
    AutodiffNotAvailableError
        On a backend without autodiff (NumPy, array-api-strict).
    """
    xi = sample_unbound(loss, spatial_key)
    joint = _JointLoss(loss, tuple(names))
    value, grads = backend_of(c).value_and_grad(joint)([*params, {"c": c}], xi)
    return value, grads[:-1], grads[-1]["c"]


class CoefficientState(NamedTuple):
    """The state of :class:`TrainCoefficients`: the wrapped method's, the coefficients
    c (K,) in the parameters' dtype, and Adam's state for c (moments of size K)."""

    method: Any
    coefficients: Any
    optimizer: Any

    @property
    def step(self) -> int:
        """The next step's index t (the wrapped method's)."""
        return self.method.step

    @property
    def key(self) -> Key:
        return self.method.key


def _check_initial(initial) -> dict:
    if not isinstance(initial, Mapping) or not initial:
        raise ValueError(
            f"initial must be a non-empty mapping name -> float (e.g. {{'kappa': 1.0}}), "
            f"got {initial!r}"
        )
    out = {}
    for name, value in initial.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"initial: coefficient names must be non-empty strings, got {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            raise ValueError(f"initial[{name!r}] must be a finite number, got {value!r}")
        out[name] = float(value)
    return out


@dataclass(frozen=True)
class TrainCoefficients:
    """A training method that also fits the loss's coefficients c (module docstring).

    One step t, with ξ_t and the parameter key k_t of the wrapped method::

        ĝ = coefficient_gradient(loss, θ, c, ξ_t, fold_in(k_t, "coefficients"))
        Δc, opt = optimizer.update(ĝ, opt, t)            # Adam on K numbers
        θ, state = method.step(bind_coefficients(loss, c), θ, state)
        c ← c + Δc

    For :class:`~sdze_core.first_order.FirstOrderAdam` one reverse pass gives
    (∇_θ ℓ, ∇_c ℓ) (:func:`coefficient_autodiff`) and the method's Adam
    applies the first (``apply_gradient``). Both gradients are taken at
    (θ_t, c_t) on the same ξ_t. A non-finite loss
    or update raises before anything is applied (c is unchanged and the
    error's state is this wrapper's).

    Parameters
    ----------
    method
        :class:`~sdze_core.engine.SDZE`,
        :class:`~sdze_core.activity.ActivityPerturbation` or
        :class:`~sdze_core.first_order.FirstOrderAdam` (anything with their interface).
    initial : mapping
        name -> initial value, e.g. ``{"kappa": 1.0}``; c's order is the mapping's.
    optimizer : Optimizer
        For c (default :func:`~sdze_core.optimizers.zo_adam` with η = 1e-2).
    num_queries, eps, distribution, crns
        Of :func:`coefficient_gradient` (zeroth-order methods).
    """

    method: Any
    initial: Mapping
    optimizer: Optimizer = dataclasses.field(default_factory=lambda: zo_adam(1e-2))
    num_queries: int = 2
    eps: float | None = None
    distribution: str = "gaussian"
    crns: bool = True

    def __post_init__(self):
        object.__setattr__(self, "initial", _check_initial(self.initial))
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}"
            )
        q = self.num_queries
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"num_queries must be an integer >= 1, got {q!r}")
        if self.eps is not None and not (math.isfinite(float(self.eps)) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")

    @property
    def names(self) -> tuple:
        return tuple(self.initial)

    @property
    def gradient(self) -> str:
        """``"autodiff"`` for :class:`~sdze_core.first_order.FirstOrderAdam` (one reverse
        pass gives ∇_θ ℓ and ∇_c ℓ), ``"zeroth-order"`` otherwise."""
        return "autodiff" if isinstance(self.method, FirstOrderAdam) else "zeroth-order"

    def init(self, key: Key, params) -> CoefficientState:
        """The wrapped method's state from ``key``, c = ``initial`` (the parameters'
        backend and dtype), zero Adam moments."""
        W = params[0]["W"]
        c = backend_of(W).asarray(list(self.initial.values()), dtype=W.dtype)
        return CoefficientState(self.method.init(key, params), c, self.optimizer.init([{"c": c}]))

    def step_keys(self, state: CoefficientState) -> tuple[Key, Key]:
        return self.method.step_keys(state.method)

    def coefficients(self, state: CoefficientState) -> dict:
        """The current coefficients as host floats, by name."""
        values = backend_of(state.coefficients).to_host(state.coefficients).tolist()
        return dict(zip(self.names, values, strict=True))

    def evaluation_loss(self, loss, state: CoefficientState):
        """``loss`` bound to the current coefficients (what the wrapped method trains on)."""
        return bind_coefficients(loss, _named(self.names, state.coefficients))

    def _check_losses(self, losses, params, state, t) -> list:
        values = backend_of(losses).to_host(losses).tolist()
        if not all(math.isfinite(v) for v in values):
            raise NonFiniteLossError(
                f"step {t}: the loss is not finite at the coefficients ({values}); the step "
                "was not applied (the error's .params and .state hold the last good state). "
                "Lower the coefficients' learning rate or eps.",
                step=t, losses=values, params=params, state=state,
            )
        return values

    def step(self, loss, params, state: CoefficientState):
        """One step: ``(params, state, info)``, ``info`` the wrapped method's.

        Raises
        ------
        NonFiniteLossError, NonFiniteUpdateError
            As the wrapped method; nothing is applied, the error's ``state`` is
            this wrapper's (with the wrapped method's last good state).
        """
        t = state.step
        spatial, param = self.step_keys(state)
        c = state.coefficients
        if self.gradient == "autodiff":
            value, net_grads, g = coefficient_autodiff(loss, self.names, params, c, spatial)
            losses = array_namespace(c).reshape(value, (1,))
        else:
            g, losses = coefficient_gradient(
                loss, self.names, params, c, spatial, fold_in(param, "coefficients"),
                num_queries=self.num_queries, eps=self.eps,
                distribution=self.distribution, crns=self.crns,
            )
        values = self._check_losses(losses, params, state, t)
        updates, opt_state = self.optimizer.update([{"c": g}], state.optimizer, t)
        if not all_finite(updates):
            raise NonFiniteUpdateError(
                f"step {t}: the coefficients' update is not finite although the losses are "
                "(check the learning rate); the step was not applied.",
                step=t, losses=values, params=params, state=state,
            )
        try:
            if self.gradient == "autodiff":
                params, inner, info = self.method.apply_gradient(
                    params, net_grads, state.method, values[0]
                )
            else:
                params, inner, info = self.method.step(
                    self.evaluation_loss(loss, state), params, state.method
                )
        except NonFiniteLossError as error:
            error.state = state._replace(method=error.state)
            raise
        return params, CoefficientState(inner, c + updates[0]["c"], opt_state), info

    def merge(self, params, state: CoefficientState):
        """The wrapped method's merge; c unchanged."""
        inner, params = self.method.merge(params, state.method)
        return state._replace(method=inner), params

    def evaluation_model(self, model, params, state: CoefficientState):
        """The wrapped method's evaluation model."""
        return self.method.evaluation_model(model, params, state.method)
