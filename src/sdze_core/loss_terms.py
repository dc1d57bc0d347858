"""Weighted loss terms: interior residual, Dirichlet boundary, initial/terminal and data
(docs/losses.md).

Each term owns the sampler of its points and gives one residual per point:

* :class:`InteriorTerm`: r_b = L̂u − F(u, x) − f(x), as
  :class:`~sdze_core.objectives.ResidualLoss` computes it, on ``points(key)``;
* :class:`DirichletTerm`: r_b = u(x_b) − g(x_b) on ``points(key)`` (for example
  :func:`domain_points` on the boundary);
* :class:`TimeSliceTerm`: r_b = u(x_b, t_e) − g(x_b, t_e) on the slice t_e = t0
  or t1 of a :class:`~sdze_core.domains.SpaceTime`;
* :class:`DataTerm`: r_b = u(x_b) − y_b on given observations, optionally
  subsampled per step.

:class:`WeightedLoss` combines them, ℓ = Σ_j w_j (1/B_j) Σ_b r_{j,b}², and
exposes per-point residuals scaled so that their plain mean is ℓ: the
per-sample activity engine (:class:`~sdze_core.activity.ActivityPerturbation`),
which averages per-point losses, is then unbiased for ∇ℓ of the weighted loss.

Every term evaluates u through the model's ``jet`` (the boundary and data
terms read the primal of an order-1 jet along e_0): the perturbed networks of
both engines carry their Q copies through ``jet``, while
``ActivityPerturbedNetwork.apply`` returns the unperturbed output only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .domains import Domain, SpaceTime
from .keys import Key, fold_in
from .objectives import ResidualLoss
from .registry import backend_of

__all__ = [
    "InteriorTerm",
    "DirichletTerm",
    "TimeSliceTerm",
    "DataTerm",
    "WeightedLoss",
    "TermsSample",
    "domain_points",
]

_PARTS = ("interior", "boundary", "lateral")


def _weight(term: str, value) -> float:
    """``value`` as a float w ≥ 0, or a ValueError naming ``term``'s ``weight``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{term}: weight must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{term}: weight must be a finite number >= 0, got {value!r}")
    return value


def _values(model, params, x):
    """u(x), shape (B,) or (Q, B): the primal of an order-1 jet along e_0, so that a
    perturbed network records the call and carries its copies (module docstring)."""
    b = backend_of(x)
    zero = b.asarray([0], dtype=b.index_dtype)
    return model.jet(params, x, zero, 1).primal


def domain_points(domain: Domain, backend, num_points: int, dim: int, part: str = "interior"):
    """A sampler ``key -> x`` of ``num_points`` points of ``domain``.

    Parameters
    ----------
    domain : Domain
    backend : Backend
    num_points : int
    dim : int
        The dimension d of the space (points have ``domain.input_dim(dim)`` coordinates).
    part : {"interior", "boundary", "lateral"}
        ``domain.sample``, ``domain.sample_boundary`` or (space-time only)
        ``domain.sample_lateral``, the spatial boundary ∂Ω × [t0, t1].

    Raises
    ------
    ValueError
        If ``part`` is unknown.
    TypeError
        If ``part="lateral"`` and ``domain`` is not a SpaceTime.
    """
    if part not in _PARTS:
        raise ValueError(f"part must be one of {_PARTS}, got {part!r}")
    if part == "lateral" and not isinstance(domain, SpaceTime):
        raise TypeError(f"part='lateral' needs a SpaceTime domain, got {domain!r}")
    method = {"interior": "sample", "boundary": "sample_boundary", "lateral": "sample_lateral"}
    draw = getattr(domain, method[part])
    return lambda key: draw(backend, key, num_points, dim)


@dataclass(frozen=True)
class InteriorTerm:
    """The PDE residual r̂_b = L̂u(x_b) − F(u, x_b) − f(x_b), as :class:`ResidualLoss` computes it.

    Parameters
    ----------
    oracle, rhs, points, forcing
        As in :class:`~sdze_core.objectives.ResidualLoss`.
    unbiased : bool
        Two independent oracle draws: the term is (1/B) Σ_b r̂_{1,b} r̂_{2,b},
        whose mean is the exact squared residual.
    weight : float
        w ≥ 0.
    """

    oracle: Any
    rhs: Callable[[Any, Any], Any]
    points: Callable[[Key], Any]
    forcing: Callable[[Any], Any] | None = None
    unbiased: bool = False
    weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "weight", _weight("InteriorTerm", self.weight))

    def _loss(self, model) -> ResidualLoss:
        return ResidualLoss(model, self.oracle, self.rhs, self.points, self.unbiased, self.forcing)

    def sample(self, key: Key):
        """ξ of the term: :meth:`ResidualLoss.sample` (points, oracle draws, forcing)."""
        return self._loss(None).sample(key)

    def residuals(self, model, params, xi) -> tuple:
        """r̂ (one, or two when unbiased), each (B,) or (Q, B)."""
        return self._loss(model).residuals(params, xi)


@dataclass(frozen=True)
class DirichletTerm:
    """r_b = u(x_b) − g(x_b) on points drawn by ``points`` (the boundary, typically).

    Parameters
    ----------
    g : callable
        ``g(x)`` -> the boundary data, shape (B,).
    points : callable
        ``points(key)`` -> x (B, n), e.g. ``domain_points(domain, backend, B, d, "boundary")``.
    weight : float
        w ≥ 0.
    """

    g: Callable[[Any], Any]
    points: Callable[[Key], Any]
    weight: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "weight", _weight("DirichletTerm", self.weight))

    def sample(self, key: Key):
        """(x, g(x)): the data is evaluated once per step, not per perturbed network."""
        x = self.points(key)
        return x, self.g(x)

    def residuals(self, model, params, xi) -> tuple:
        x, target = xi
        return (_values(model, params, x) - target,)


@dataclass(frozen=True)
class TimeSliceTerm:
    """r_b = u(x_b, t_e) − g(x_b, t_e) on the slice t = t_e of a space-time domain.

    t_e = t0 (``end="initial"``) or t1 (``end="terminal"``); x_b from the
    spatial domain's sampler.

    Parameters
    ----------
    g : callable
        ``g(x)`` -> the data at the slice, shape (B,), for points (x, t) of shape (B, d + 1).
    domain : SpaceTime
    backend : Backend
    num_points : int
    dim : int
        The spatial dimension d.
    end : {"initial", "terminal"}, optional
        Default ``domain.condition``.
    weight : float
        w ≥ 0.

    Raises
    ------
    TypeError
        If ``domain`` is not a :class:`~sdze_core.domains.SpaceTime`.
    """

    g: Callable[[Any], Any]
    domain: Any
    backend: Any
    num_points: int
    dim: int
    end: str | None = None
    weight: float = 1.0

    def __post_init__(self):
        if not isinstance(self.domain, SpaceTime):
            raise TypeError(
                f"TimeSliceTerm: domain must be a SpaceTime (an initial/terminal slice needs "
                f"a time axis), got {self.domain!r}"
            )
        end = self.domain.condition if self.end is None else self.end
        if end not in ("initial", "terminal"):
            raise ValueError(f"TimeSliceTerm: end must be 'initial' or 'terminal', got {end!r}")
        object.__setattr__(self, "end", end)
        object.__setattr__(self, "weight", _weight("TimeSliceTerm", self.weight))

    def sample(self, key: Key):
        """(x, g(x)) with x on the slice t = t_e."""
        sliced = SpaceTime(self.domain.space, self.domain.t0, self.domain.t1, self.end)
        x = sliced.sample_boundary(self.backend, key, self.num_points, self.dim)
        return x, self.g(x)

    def residuals(self, model, params, xi) -> tuple:
        x, target = xi
        return (_values(model, params, x) - target,)


@dataclass(frozen=True, eq=False)
class DataTerm:
    """r_b = u(x_b) − y_b on observations (x, y), all or ``batch_size`` of them per step.

    Subsampling draws ``batch_size`` distinct indices per step from the key
    (uniformly, without replacement), so the term's mean is unbiased for the
    mean over all observations.

    Parameters
    ----------
    x : array (N, n)
    y : array (N,)
    batch_size : int, optional
        Default all N, every step.
    weight : float
        w ≥ 0.

    Raises
    ------
    ValueError
        If ``x`` is not 2-D, ``y`` is not of shape (N,), or ``batch_size`` is not in 1..N.
    """

    x: Any
    y: Any
    batch_size: int | None = None
    weight: float = 1.0

    def __post_init__(self):
        if len(self.x.shape) != 2:
            raise ValueError(f"DataTerm: x must have shape (N, n), got {tuple(self.x.shape)}")
        n = self.x.shape[0]
        if tuple(self.y.shape) != (n,):
            raise ValueError(
                f"DataTerm: y must have shape (N,) = ({n},) to match x {tuple(self.x.shape)}, "
                f"got {tuple(self.y.shape)}"
            )
        k = self.batch_size
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n):
            raise ValueError(f"DataTerm: batch_size must be an int in 1..{n}, got {k!r}")
        object.__setattr__(self, "weight", _weight("DataTerm", self.weight))

    def sample(self, key: Key):
        """(x_b, y_b): all observations, or ``batch_size`` drawn from ``key``."""
        if self.batch_size is None:
            return self.x, self.y
        xp = array_namespace(self.x)
        index = backend_of(self.x).choice(key, self.x.shape[0], self.batch_size)
        return xp.take(self.x, index, axis=0), xp.take(self.y, index, axis=0)

    def residuals(self, model, params, xi) -> tuple:
        x, target = xi
        return (_values(model, params, x) - target,)


class TermsSample(NamedTuple):
    """ξ of a :class:`WeightedLoss`: one sample per term, in the terms' order."""

    terms: tuple


@dataclass(frozen=True)
class WeightedLoss:
    """ℓ(θ; ξ) = Σ_j w_j (1/B_j) Σ_b r_{j,b}², a weighted sum of per-point terms.

    An unbiased :class:`InteriorTerm` contributes w (1/B) Σ_b r̂_{1,b} r̂_{2,b}.

    :meth:`residuals` returns the per-point residuals of all terms,
    concatenated in the terms' order (the order their points are evaluated),
    each scaled by √(N w_j / B_j) with N = Σ_j B_j, so that the per-point losses
    ℓ_b = (N / B_j) w_j r_{j,b}² have mean (1/N) Σ_b ℓ_b = ℓ. The activity
    engine's estimate Ĝ = (1/N) Σ_b g_b ζ_b ⊗ in_b, with g_b ≈ ⟨∂ℓ_b/∂a_b, ζ_b⟩,
    is then unbiased for ∇ℓ (up to O(ε²)).

    Parameters
    ----------
    model : MLP, Ansatz or HardConstraint
        Evaluated by every term; a trainer replaces it by a perturbed copy
        (:func:`~sdze_core.objectives.with_model`).
    terms : tuple
        The terms, each with ``sample(key)``, ``residuals(model, params, xi)`` and ``weight``.

    Raises
    ------
    ValueError
        If ``terms`` is empty.
    """

    model: Any
    terms: tuple

    def __post_init__(self):
        terms = tuple(self.terms)
        if not terms:
            raise ValueError("WeightedLoss: terms must hold at least one term")
        object.__setattr__(self, "terms", terms)

    @property
    def unbiased(self) -> bool:
        """Whether some term gives two residual estimates (its product form)."""
        return any(getattr(t, "unbiased", False) for t in self.terms)

    def sample(self, key: Key) -> TermsSample:
        """ξ: term j's sample from ``fold_in(key, j)``."""
        return TermsSample(tuple(t.sample(fold_in(key, j)) for j, t in enumerate(self.terms)))

    def _pairs(self, params, xi: TermsSample) -> list:
        """Per term, (r_1, r_2): r_2 is r_1 unless the term gives two estimates."""
        out = []
        for term, sample in zip(self.terms, xi.terms, strict=True):
            r = term.residuals(self.model, params, sample)
            out.append((r[0], r[-1]))
        return out

    def __call__(self, params, xi: TermsSample):
        """ℓ(θ; ξ): shape (), or (Q,) when the model evaluates Q perturbed copies."""
        total = 0.0
        for term, (r1, r2) in zip(self.terms, self._pairs(params, xi), strict=True):
            total = total + term.weight * array_namespace(r1).mean(r1 * r2, axis=-1)
        return total

    def residuals(self, params, xi: TermsSample) -> tuple:
        """The scaled per-point residuals (see the class docstring): one array (…, N),
        or two whose product is the per-point loss when some term is unbiased."""
        pairs = self._pairs(params, xi)
        xp = array_namespace(pairs[0][0])
        n = sum(r1.shape[-1] for r1, _ in pairs)
        scaled = [[], []]
        for term, (r1, r2) in zip(self.terms, pairs, strict=True):
            c = math.sqrt(n * term.weight / r1.shape[-1])
            scaled[0].append(c * r1)
            scaled[1].append(c * r2)
        shape = _common_lead(scaled[0] + scaled[1])
        joined = [
            xp.concat([xp.broadcast_to(r, (*shape, r.shape[-1])) for r in side], axis=-1)
            for side in scaled
        ]
        return tuple(joined) if self.unbiased else (joined[0],)


def _common_lead(arrays) -> tuple:
    """The broadcast of the arrays' shapes without their last axis ((Q,) or ())."""
    lead = ()
    for a in arrays:
        s = tuple(a.shape[:-1])
        if len(s) > len(lead):
            lead = (1,) * (len(s) - len(lead)) + lead
        s = (1,) * (len(lead) - len(s)) + s
        lead = tuple(max(p, q) for p, q in zip(lead, s, strict=True))
    return lead
