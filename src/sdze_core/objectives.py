"""PINN losses as functions of the parameters and the step's spatial randomness ξ.

A zeroth-order step evaluates one loss ℓ(θ; ξ) at many perturbed parameters
with the same ξ (CRNS, docs/method.md#crns). :class:`ResidualLoss` therefore
splits the draw of ξ (collocation points and the oracle's directions,
:meth:`ResidualLoss.sample`) from the evaluation (:meth:`ResidualLoss.__call__`),
which is deterministic given ξ.

The perturbation belongs to the model: a trainer evaluates
``with_model(loss, perturbed_model)``, the same loss with a model whose
network carries Q perturbed copies (:func:`sdze_core.models.with_layer_map`),
and the loss then has shape (Q,). Any loss takes part this way if it is a
dataclass with a ``model`` field that it evaluates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .keys import Key, fold_in

__all__ = ["SpatialSample", "ResidualLoss", "model_of", "with_model"]


class SpatialSample(NamedTuple):
    """ξ: the collocation points x (B, d), the oracle's draws (one, or two for
    the unbiased loss) and the forcing f(x) (B,) when the loss has one."""

    x: Any
    oracle: tuple
    forcing: Any = None


@dataclass(frozen=True)
class ResidualLoss:
    """ℓ(θ; ξ) = (1/B) Σ_b r̂_b², the mean squared PDE residual (docs/method.md#oracles).

    For an equation L u = F(u, x) + f(x), r̂ = L̂u − F(u, x) − f(x) with L̂ the
    oracle's estimate. The forcing f is evaluated once per ξ, when the points
    are drawn (:meth:`sample`), not at each of the 2q perturbed evaluations
    that share them. With ``unbiased=True`` the loss is (1/B) Σ_b r̂_{1,b} r̂_{2,b},
    two independent oracle draws, whose mean is the exact squared residual.

    Parameters
    ----------
    model : MLP or Ansatz
        The network (anything with ``jet``); a trainer replaces it by a
        perturbed copy (:func:`with_model`).
    oracle : Oracle
        The spatial estimator of L u.
    rhs : callable
        ``rhs(u, x)`` -> F(u, x), shape (B,) (or broadcasting against u of
        shape (Q, B) when the model evaluates Q perturbed copies).
    points : callable
        ``points(key)`` -> collocation points x of shape (B, d), drawn from the key only.
    unbiased : bool
        Use the product of two independent residual estimates.
    forcing : callable, optional
        ``forcing(x)`` -> f(x), shape (B,), a function of the points only.
    """

    model: Any
    oracle: Any
    rhs: Callable[[Any, Any], Any]
    points: Callable[[Key], Any]
    unbiased: bool = False
    forcing: Callable[[Any], Any] | None = None

    def sample(self, key: Key) -> SpatialSample:
        """ξ from ``key``: points from ``fold_in(key, "points")``, the oracle's draws
        from ``fold_in(key, "oracle")`` (folded with 0 and 1 for the unbiased loss)."""
        x = self.points(fold_in(key, "points"))
        oracle_key = fold_in(key, "oracle")
        if self.unbiased:
            draws = tuple(self.oracle.sample(fold_in(oracle_key, i), x) for i in (0, 1))
        else:
            draws = (self.oracle.sample(oracle_key, x),)
        f = None if self.forcing is None else self.forcing(x)
        return SpatialSample(x, draws, f)

    def residuals(self, params, xi: SpatialSample) -> tuple:
        """The residual estimates r̂ (one or two), each of shape (B,) or (Q, B)."""
        out = []
        for draw in xi.oracle:
            estimate = self.oracle.estimate(self.model, params, xi.x, draw)
            r = estimate.value - self.rhs(estimate.u, xi.x)
            out.append(r if xi.forcing is None else r - xi.forcing)
        return tuple(out)

    def __call__(self, params, xi: SpatialSample):
        """ℓ(θ; ξ): shape (), or (Q,) when the model evaluates Q perturbed copies."""
        r = self.residuals(params, xi)
        xp = array_namespace(r[0])
        product = r[0] * r[1] if self.unbiased else r[0] * r[0]
        return xp.mean(product, axis=-1)


def model_of(loss, purpose: str = "evaluating a perturbed model"):
    """``loss.model``, checking that ``loss`` can evaluate another model (:func:`with_model`).

    Raises
    ------
    TypeError
        If ``loss`` is not a dataclass (instance) with a ``model`` field.
    """
    is_instance = dataclasses.is_dataclass(loss) and not isinstance(loss, type)
    if not is_instance or "model" not in {f.name for f in dataclasses.fields(loss)}:
        raise TypeError(
            f"{purpose} needs a loss that is a dataclass with a `model` field (such as "
            f"ResidualLoss), so that the perturbed model can be put in its place; got "
            f"{type(loss).__name__}"
        )
    return loss.model


def with_model(loss, model, purpose: str = "evaluating a perturbed model"):
    """``loss`` evaluating ``model`` instead of its own: ``dataclasses.replace(loss, model=model)``.

    How a trainer evaluates a perturbed model (docs/sdze.md, "The perturbation
    belongs to the model"): the loss, its ξ and its oracle are unchanged.

    Parameters
    ----------
    loss
        A dataclass with a ``model`` field, such as :class:`ResidualLoss`.
    model
        The model to evaluate.
    purpose : str
        What needs the replacement, for the error message.

    Raises
    ------
    TypeError
        If ``loss`` is not a dataclass with a ``model`` field.
    """
    model_of(loss, purpose)
    return dataclasses.replace(loss, model=model)
