"""Operators as composable terms (docs/operators.md#operator-terms).

Oracles (the :class:`~sdze_core.oracles.Oracle` interface: ``sample``,
``estimate``, ``order``) for the pieces that PDEs are assembled from, and one
oracle that adds them:

* :class:`SubsetDiagonal` / :func:`SubsetLaplacian`: Σ_{i ∈ S} ∂^k u/∂x_i^k
  over a subset S of the coordinates (e.g. the space coordinates of a
  space-time point), exact or sampled within S;
* :class:`Drift`: b·∇u, exactly, from one 1-jet along b(x) per point;
* :class:`GradientNormPower`: ‖∇u‖^c (the Hamilton–Jacobi–Bellman term),
  exactly, from d 1-jets;
* :class:`MixedPartial`: ∂^k u/∂x_{i_1}…∂x_{i_k} (k <= 4), exactly, by
  polarization from k-jets along signed sums of coordinate directions;
* :class:`LinearCombination`: Σ_j a_j L_j u, each term's randomness drawn
  from its own key;
* :class:`PartialPowerSum`: Σ_{i ∈ S} |∂u/∂x_i|^c (HJB-LIN's Hamiltonian),
  exact or sampled within S;
* :class:`Convection`: u ∂u/∂x_j (Burgers' and KdV's u u_x), exactly, from
  one 1-jet.

The first-order, trace, diagonal and biharmonic operators of
:mod:`sdze_core.oracles` are terms too. Like every oracle, these never see a
perturbation: a perturbed model's coefficients carry query axes after the
direction axis, and everything here reduces over axis 0 only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from math import factorial, prod
from numbers import Real
from typing import Any, ClassVar

from array_api_compat import array_namespace, device

from .jets import SparseDirections
from .keys import fold_in
from .models import conform
from .oracles import (
    OperatorEstimate,
    Oracle,
    _check_count,
    _coefficients,
    _dimension,
    _sparse_for,
    _top_sum,
)
from .registry import backend_of, check_one_library

__all__ = [
    "SubsetDiagonal",
    "SubsetLaplacian",
    "Drift",
    "GradientNormPower",
    "MixedPartial",
    "LinearCombination",
    "PartialPowerSum",
    "Convection",
    "polarization_weights",
    "MAX_MIXED_ORDER",
]

#: The highest order of a :class:`MixedPartial` (2^(k−1) k-jets per point).
MAX_MIXED_ORDER = 4


def _check_indices(name: str, indices) -> tuple[int, ...]:
    """``indices`` as a tuple of ints; a ValueError naming ``name`` otherwise."""
    values = tuple(indices) if isinstance(indices, Sequence) else None
    if (
        values is None
        or not values
        or not all(isinstance(j, int) and not isinstance(j, bool) for j in values)
    ):
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {indices!r}")
    return values


def _resolve(name: str, indices: tuple[int, ...], d: int) -> list[int]:
    """Coordinates in range(d) (negative ones count from the end); a ValueError otherwise."""
    bad = [j for j in indices if not -d <= j < d]
    if bad:
        raise ValueError(f"{name}: coordinate index {bad[0]} out of range for d = {d}")
    return [j % d for j in indices]


def _distinct(name: str, indices) -> tuple[int, ...]:
    values = _check_indices(name, indices)
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct, got {values!r}")
    return values


def _subset_array(coordinates, x):
    """The coordinates S (all of range(d) for ``None``) as an index array; checked against d."""
    d = _dimension(x)
    resolved = list(range(d)) if coordinates is None else _resolve("coordinates", coordinates, d)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"coordinates {coordinates!r} name a coordinate twice for d = {d}")
    b = backend_of(x)
    return b.asarray(resolved, dtype=b.index_dtype)


# -- diagonal operators over a subset of the coordinates --------------------------------


@dataclass(frozen=True)
class SubsetDiagonal(Oracle):
    """Σ_{i ∈ S} ∂^k u/∂x_i^k over a subset S of the coordinates, exact or sampled.

    With ``num_directions=None`` the value is exact, from |S| k-jets along
    the coordinates of S (gathers). With V = ``num_directions``::

        (|S| / V) Σ_{v=1..V} ∂^k u/∂x_{j_v}^k,   j_1, ..., j_V uniform on S without replacement,

    unbiased since each j_v is marginally uniform on S; its variance is
    |S|² σ² (|S| − V) / (V (|S| − 1)), σ² the population variance of the |S|
    terms, zero at V = |S|. Cost O(h V) per point and order.

    E.g. the spatial Laplacian Δ_x u of u(x, t), time last, for x ∈ R^n:
    ``SubsetDiagonal(2, range(n))`` (:func:`SubsetLaplacian`).

    Parameters
    ----------
    k : int
        Derivative order (>= 1).
    coordinates : sequence of int
        The distinct coordinates S (negative ones count from the end).
    num_directions : int or None
        V <= |S| sampled coordinates, shared by the batch; ``None``: exact.
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    k: int
    coordinates: Sequence[int]
    num_directions: int | None = None
    collapse: bool = True

    def __post_init__(self):
        _check_count("k", self.k)
        coordinates = _distinct("coordinates", self.coordinates)
        object.__setattr__(self, "coordinates", coordinates)
        _check_count("num_directions", self.num_directions, allow_none=True)
        if self.num_directions is not None and self.num_directions > len(coordinates):
            raise ValueError(
                f"num_directions must be at most |coordinates| = {len(coordinates)} (sampled "
                f"without replacement; None is exact), got {self.num_directions}"
            )

    @property
    def order(self) -> int:
        return self.k

    def sample(self, key, x):
        """V coordinates of S (index array (V,)), or ``None`` when exact."""
        subset = _subset_array(self.coordinates, x)
        if self.num_directions is None:
            return None
        chosen = backend_of(x).choice(key, subset.shape[0], self.num_directions)
        return array_namespace(subset).take(subset, chosen, axis=0)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        index = _subset_array(self.coordinates, x) if sample is None else sample
        jet = model.jet(params, x, index, self.k, collapse=self.collapse)
        scale = len(self.coordinates) / index.shape[0]
        return OperatorEstimate(jet.primal, scale * _top_sum(jet))


def SubsetLaplacian(  # noqa: N802 (a class-like factory, as a partial would be)
    coordinates: Sequence[int], num_directions: int | None = None, collapse: bool = True
) -> SubsetDiagonal:
    """Σ_{i ∈ S} ∂²u/∂x_i²: :class:`SubsetDiagonal` with k = 2 (e.g. Δ_x u of u(x, t))."""
    return SubsetDiagonal(2, coordinates, num_directions, collapse)


# -- first-order terms ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Drift(Oracle):
    """b·∇u = D¹u[b(x)] exactly, from one 1-jet per point along b(x).

    Formula::

        (b·∇u)(x) = Σ_i b_i(x) ∂u/∂x_i = d/dt u(x + t b(x)) at t = 0.

    A callable drift gives per-point tangents (1, B, d): O(h d) per point in
    the first layer; a constant drift one shared tangent (1, d).
    Deterministic (``sample`` returns ``None``).

    Parameters
    ----------
    drift : callable or array
        ``drift(x) -> (B, d)`` for points x of shape (B, d), or a constant
        vector of shape (d,) in the backend of the points.
    """

    drift: Callable[[Any], Any] | Any = field(repr=False)

    order: ClassVar[int] = 1

    def __post_init__(self):
        if not callable(self.drift) and getattr(self.drift, "ndim", None) != 1:
            raise ValueError(
                "drift must be a callable drift(x) -> (B, d) or a constant vector of shape (d,), "
                f"got {type(self.drift).__name__} of shape {getattr(self.drift, 'shape', None)}"
            )

    def _tangents(self, x):
        B, d = x.shape[0], _dimension(x)
        xp = array_namespace(x)
        b = self.drift(x) if callable(self.drift) else self.drift
        check_one_library(drift=b, x=x)
        expected = (B, d) if callable(self.drift) else (d,)
        if tuple(b.shape) != expected:
            raise ValueError(f"drift must have shape {expected} for x of shape {(B, d)}, "
                             f"got {tuple(b.shape)}")  # fmt: skip
        return xp.astype(b, x.dtype, copy=False)[None, ...]

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _dimension(x)
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        x, _ = conform(params, x)
        jet = model.jet(params, x, self._tangents(x), 1)
        return OperatorEstimate(jet.primal, _coefficients(jet, 1, 1)[0, ...])


@dataclass(frozen=True)
class GradientNormPower(Oracle):
    """‖∇_S u‖^c exactly, from 1-jets along the coordinates S (gathers): O(h |S|) per point.

    Formula, S all d coordinates by default::

        ‖∇_S u‖^c = (Σ_{i ∈ S} (∂u/∂x_i)²)^(c/2).

    Exact, not sampled: for c ≠ 2 no unbiased estimator from sampled
    coordinates exists in general (a sampled ‖∇u‖² is unbiased, but a power
    c/2 ≠ 1 of it is not, by Jensen's inequality). For c = 2 the unbiased
    sampled estimator is :class:`~sdze_core.oracles.SparseGradientNormSquared`.
    For c < 1 the term is not differentiable in θ where ∇u = 0.

    Parameters
    ----------
    c : float
        The power, > 0.
    coordinates : sequence of int or None
        The distinct coordinates S (negative ones count from the end), e.g.
        the space coordinates of u(x, t); ``None``: all d.
    """

    c: float = 2.0
    coordinates: Sequence[int] | None = None

    order: ClassVar[int] = 1

    def __post_init__(self):
        if isinstance(self.c, bool) or not isinstance(self.c, Real) or not self.c > 0:
            raise ValueError(f"c must be a positive real number, got {self.c!r}")
        if self.coordinates is not None:
            object.__setattr__(self, "coordinates", _distinct("coordinates", self.coordinates))

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _dimension(x)
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        index = _subset_array(self.coordinates, x)
        jet = model.jet(params, x, index, 1)
        first = _coefficients(jet, 1, index.shape[0])
        squared = array_namespace(x).sum(first * first, axis=0)
        return OperatorEstimate(jet.primal, squared if self.c == 2 else squared ** (self.c / 2))


# -- mixed partials by polarization ------------------------------------------------------------


def polarization_weights(k: int) -> list[tuple[tuple[int, ...], float]]:
    """The (signs ε, weight) pairs of the polarization identity of order k, ε_1 = +1.

    For the symmetric k-linear form D^k u(x)::

        D^k u[v_1, ..., v_k]
            = 1 / (2^(k−1) k!) Σ_{ε ∈ {±1}^k, ε_1 = +1} ε_1 ⋯ ε_k D^k u[Σ_j ε_j v_j],

    the full sum over {±1}^k halved by the symmetry ε → −ε (both the sign
    product and D^k u[−w] = (−1)^k D^k u[w] change by (−1)^k).
    """
    scale = 2 ** (k - 1) * factorial(k)
    return [((1,) + rest, prod(rest) / scale) for rest in product((1, -1), repeat=k - 1)]


@dataclass(frozen=True)
class MixedPartial(Oracle):
    """∂^k u/∂x_{i_1}⋯∂x_{i_k} exactly, by polarization, for k <= 4.

    Formula (:func:`polarization_weights`), with v_j = e_{i_j}::

        ∂^k u/∂x_{i_1}⋯∂x_{i_k} = 1 / (2^(k−1) k!) Σ_{ε_1 = +1, ε_2..ε_k = ±1}
                                    ε_2 ⋯ ε_k D^k u[e_{i_1} + ε_2 e_{i_2} + ⋯ + ε_k e_{i_k}].

    2^(k−1) k-jets along k-sparse directions
    (:class:`~sdze_core.jets.SparseDirections`: the first layer gathers k
    columns each, O(2^(k−1) h k), whatever d is). Indices may repeat
    (``(0, 0, 1)`` is ∂³u/∂x_0²∂x_1). Deterministic.

    Parameters
    ----------
    index : sequence of int
        The multi-index (i_1, ..., i_k), 1 <= k <= 4; negative entries count
        from the end (``(-1, 0)`` is ∂²u/∂t∂x_0 with time last).
    """

    index: Sequence[int]

    def __post_init__(self):
        index = _check_indices("index", self.index)
        if len(index) > MAX_MIXED_ORDER:
            raise ValueError(
                f"index must have at most {MAX_MIXED_ORDER} entries (the order k), got {index!r}"
            )
        object.__setattr__(self, "index", index)

    @property
    def order(self) -> int:
        return len(self.index)

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _resolve("index", self.index, _dimension(x))
        return None

    def _directions(self, x):
        """The 2^(k−1) k-sparse directions Σ_j ε_j e_{i_j} and their weights (2^(k−1),)."""
        b = backend_of(x)
        index = _resolve("index", self.index, _dimension(x))
        pairs = polarization_weights(len(index))
        signs = b.xp.asarray([s for s, _ in pairs], dtype=x.dtype, device=device(x))
        rows = b.asarray([index] * len(pairs), dtype=b.index_dtype)
        weights = b.xp.asarray([w for _, w in pairs], dtype=x.dtype, device=device(x))
        return SparseDirections(rows, signs), weights

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        x, _ = conform(params, x)
        xp = array_namespace(x)
        directions, weights = self._directions(x)
        jet = model.jet(params, x, _sparse_for(model, x, directions), self.order)
        top = _coefficients(jet, self.order, weights.shape[0])
        weights = xp.reshape(weights, (weights.shape[0],) + (1,) * (top.ndim - 1))
        return OperatorEstimate(jet.primal, xp.sum(weights * top, axis=0))


# -- sums of terms ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearCombination(Oracle):
    """L u = Σ_j a_j L_j u for oracles L_j and real constants a_j.

    Estimator::

        Σ_j a_j L̂_j u,   L̂_j from ξ_j = L_j.sample(fold_in(key, j), x),

    unbiased whenever every L̂_j is (linearity of expectation), exact when
    every term is; the terms' draws are independent, so the variance is
    Σ_j a_j² Var L̂_j. Each term computes its own jets; the result's u is the
    first term's (all terms' u agree to round-off: the same network at the
    same points).

    Example: the HJB operator u_t + Δ_x u − ‖∇_x u‖^c of u(x, t), x ∈ R^n, time last::

        LinearCombination(((1.0, FirstDerivative(-1)), (1.0, SubsetLaplacian(range(n), 4)),
                           (-1.0, GradientNormPower(c, range(n)))))

    Parameters
    ----------
    terms : sequence of (float, Oracle)
        The pairs (a_j, L_j); every L_j's value must have the shape of u.
    """

    terms: Sequence[tuple[float, Oracle]]

    def __post_init__(self):
        terms = tuple(self.terms) if isinstance(self.terms, Sequence) else ()
        ok = terms and all(
            isinstance(t, tuple)
            and len(t) == 2
            and isinstance(t[0], Real)
            and not isinstance(t[0], bool)
            and isinstance(t[1], Oracle)
            for t in terms
        )
        if not ok:
            raise ValueError(
                "terms must be a non-empty sequence of (coefficient, oracle) pairs, a real "
                f"coefficient and an Oracle each, got {self.terms!r}"
            )
        object.__setattr__(self, "terms", terms)

    @property
    def order(self) -> int:
        return max(oracle.order for _, oracle in self.terms)

    def sample(self, key, x):
        """A tuple of the terms' samples, term j's drawn from ``fold_in(key, j)``."""
        return tuple(oracle.sample(fold_in(key, j), x) for j, (_, oracle) in enumerate(self.terms))

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        u, value = None, None
        for (a, oracle), xi in zip(self.terms, sample, strict=True):
            estimate = oracle.estimate(model, params, x, xi)
            if tuple(estimate.value.shape) != tuple(estimate.u.shape):
                raise ValueError(
                    f"every term's value must have the shape of u, {tuple(estimate.u.shape)}; "
                    f"{oracle!r} gives {tuple(estimate.value.shape)}"
                )
            term = a * estimate.value
            u, value = (estimate.u, term) if u is None else (u, value + term)
        return OperatorEstimate(u, value)


# -- per-coordinate powers and convection ---------------------------------------------------


@dataclass(frozen=True)
class PartialPowerSum(Oracle):
    """Σ_{i ∈ S} |∂u/∂x_i|^c over a subset S of the coordinates, exact or sampled.

    With ``num_directions=None`` the value is exact, from |S| 1-jets along
    the coordinates of S (gathers). With V = ``num_directions``::

        (|S| / V) Σ_{v=1..V} |∂u/∂x_{j_v}|^c,   j_1, ..., j_V uniform on S without replacement,

    unbiased for every c > 0, since the sum is linear in the per-coordinate
    terms |u_i|^c and each j_v is marginally uniform on S (unlike
    :class:`GradientNormPower`'s ‖∇u‖^c = (Σ_i u_i²)^(c/2), a power of a sum).
    Variance |S|² σ² (|S| − V) / (V (|S| − 1)), σ² the population variance of
    the |S| terms, zero at V = |S|. Cost O(h V) per point.

    E.g. HJB-LIN's (1/d) Σ_i |∂u/∂x_i|^c over the space coordinates of u(x, t),
    x ∈ R^d: ``(1 / d) * PartialPowerSum(c, range(d), V)`` as a
    :class:`LinearCombination` term. For c <= 1 the term is not
    differentiable in θ where a u_i vanishes.

    Parameters
    ----------
    c : float
        The power, > 0.
    coordinates : sequence of int or None
        The distinct coordinates S (negative ones count from the end);
        ``None``: all d.
    num_directions : int or None
        V <= |S| sampled coordinates, shared by the batch; ``None``: exact.
    """

    c: float = 2.0
    coordinates: Sequence[int] | None = None
    num_directions: int | None = None

    order: ClassVar[int] = 1

    def __post_init__(self):
        if isinstance(self.c, bool) or not isinstance(self.c, Real) or not self.c > 0:
            raise ValueError(f"c must be a positive real number, got {self.c!r}")
        if self.coordinates is not None:
            object.__setattr__(self, "coordinates", _distinct("coordinates", self.coordinates))
        _check_count("num_directions", self.num_directions, allow_none=True)

    def sample(self, key, x):
        """V coordinates of S (index array (V,)), or ``None`` when exact."""
        subset = _subset_array(self.coordinates, x)
        if self.num_directions is None:
            return None
        if self.num_directions > subset.shape[0]:
            raise ValueError(
                f"num_directions must be at most |coordinates| = {subset.shape[0]} (sampled "
                f"without replacement; None is exact), got {self.num_directions}"
            )
        chosen = backend_of(x).choice(key, subset.shape[0], self.num_directions)
        return array_namespace(subset).take(subset, chosen, axis=0)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        subset = _subset_array(self.coordinates, x)
        index = subset if sample is None else sample
        jet = model.jet(params, x, index, 1)
        first = _coefficients(jet, 1, index.shape[0])
        xp = array_namespace(x)
        total = xp.sum(xp.abs(first) ** self.c, axis=0)
        return OperatorEstimate(jet.primal, (subset.shape[0] / index.shape[0]) * total)


@dataclass(frozen=True)
class Convection(Oracle):
    """u ∂u/∂x_j = ½ ∂(u²)/∂x_j exactly, from one 1-jet along e_j (a gather).

    The jet of u along x + s e_j carries u itself (its primal) and ∂u/∂x_j
    (its first coefficient), so the product costs one 1-jet per point. The
    term is nonlinear in u, but it is an operator of the model like any
    other: a :class:`LinearCombination` term (KdV's u_t + u u_x + ν u_xxx),
    and a perturbed model's query axes broadcast through the product.
    Deterministic.

    Parameters
    ----------
    index : int
        The coordinate j (negative counts from the end).
    """

    index: int

    order: ClassVar[int] = 1

    def __post_init__(self):
        if isinstance(self.index, bool) or not isinstance(self.index, int):
            raise ValueError(f"index must be an int, got {self.index!r}")

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _resolve("index", (self.index,), _dimension(x))
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        b = backend_of(x)
        (j,) = _resolve("index", (self.index,), _dimension(x))
        jet = model.jet(params, x, b.asarray([j], dtype=b.index_dtype), 1)
        return OperatorEstimate(jet.primal, jet.primal * _coefficients(jet, 1, 1)[0, ...])
