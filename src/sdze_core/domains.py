"""Domains as objects: samplers, boundary factors with jets, hard constraints (docs/domains.md).

A domain Ω knows how to

* draw collocation points, ``sample(backend, key, num_points, dim)``, uniform
  in volume for bounded domains, and points on its boundary,
  ``sample_boundary`` (where it has one);
* give a smooth boundary factor φ with φ = 0 exactly on the part of ∂Ω that a
  hard constraint enforces and φ > 0 inside, as a Taylor jet,
  ``boundary_factor(x_jet)`` (docs/method.md#jets), so that it enters
  Taylor-mode estimators like any other part of the model;
* offer the closed forms it has (the radial profile p of φ = p(‖x‖²), Δφ,
  Δ²φ, and L(φ s) for the operators of :data:`PRODUCT_OPERATORS`, which the
  benchmarks' forcing needs). A domain asked for a closed form it does not
  have raises :class:`MissingClosedFormError`, naming itself and the form: it
  never computes another domain's formula.

Every factor is scaled so that max_Ω φ = 1 (docs/domains.md, "Scale of the
factors"). ``dim`` is the dimension d of the space; a :class:`SpaceTime`
domain takes the same d and returns points (x, t) with t the last of d + 1
coordinates (:meth:`Domain.input_dim`).

:class:`HardConstraint` is the PINN ansatz u(x) = g(x) + φ(x) N(x): u equals
the data g on the constrained boundary whatever the network N. :data:`DOMAINS`
maps names to domain classes; :func:`register_domain` adds a user's.

Only the Python array API standard is used, so every domain runs on every
backend; draws come from the backend's keyed ``normal`` and ``uniform``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import isfinite
from typing import Any, ClassVar

from array_api_compat import array_namespace, device

from . import jets
from .keys import Key, fold_in
from .models import conform

__all__ = [
    "Domain",
    "Ball",
    "Annulus",
    "Box",
    "WholeSpace",
    "SpaceTime",
    "Diffusion",
    "HardConstraint",
    "DOMAINS",
    "register_domain",
    "make_domain",
    "MissingClosedFormError",
    "NoBoundaryError",
    "PRODUCT_OPERATORS",
    "product_closed_forms",
]


class MissingClosedFormError(NotImplementedError):
    """A closed form was asked of a domain that does not have it."""


class NoBoundaryError(ValueError):
    """A boundary (sampler or factor) was asked of a domain without one."""


def _missing(domain, what: str) -> MissingClosedFormError:
    return MissingClosedFormError(f"{domain!r} has no closed form for {what}")


#: Operators L for which a domain may offer L(φ s) in closed form (:meth:`Domain.factor_product`),
#: each with the contractions of the derivatives of s it reads, by key: "s" (s), "x_grad"
#: (x·∇s), "lap" (Δs), "x_hess_x" (xᵀ(∇²s)x), "x_grad_lap" (x·∇Δs), "bilap" (Δ²s).
PRODUCT_OPERATORS: dict[str, tuple[str, ...]] = {
    "laplacian": ("s", "x_grad", "lap"),
    "biharmonic": ("s", "x_grad", "lap", "x_hess_x", "x_grad_lap", "bilap"),
}


def _check_operator(operator) -> str:
    if operator not in PRODUCT_OPERATORS:
        raise ValueError(
            f"operator must be one of {', '.join(PRODUCT_OPERATORS)}, got {operator!r}"
        )
    return operator


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    return value


def _positive_float(value, what: str) -> float:
    value = float(value)
    if not (isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite positive number, got {value!r}")
    return value


def _is_index_array(directions) -> bool:
    return array_namespace(directions).isdtype(directions.dtype, "integral")


def _one_hot(x, index):
    """The coordinate directions e_j, j in ``index`` (shape (V,)): a (V, n) array, x's dtype."""
    xp = array_namespace(x, index)
    columns = xp.arange(x.shape[-1], device=device(x))
    return xp.astype(xp.expand_dims(index, axis=1) == columns, x.dtype)


def _scale_rows(backend, g, factor):
    """g * factor[:, None] in g's own memory (:meth:`Backend.scale`; g may be gigabytes)."""
    return backend.scale(g, factor[:, None])


def _unit_rows(backend, key: Key, num_points: int, dim: int):
    """(ξ, ‖ξ‖) for ξ ~ N(0, I_d) row by row: ξ/‖ξ‖ is uniform on the unit sphere."""
    g = backend.normal(key, (num_points, dim))
    return g, backend.xp.sqrt(jets.rowwise_squared_norm(g))


def _sized(num_points, dim) -> tuple[int, int]:
    return _positive_int(num_points, "num_points"), _positive_int(dim, "dim")


# -- the contract -------------------------------------------------------------------------


class Domain(ABC):
    """A domain Ω ⊂ R^n with its samplers, boundary factor and closed forms.

    Subclasses set :attr:`name`, implement :meth:`sample` and :meth:`contains`,
    and, where Ω has a boundary, :meth:`sample_boundary` and
    :meth:`boundary_factor`. Every other method has a default: the closed forms
    raise :class:`MissingClosedFormError`, :meth:`factor_jet` builds the input
    jet and calls :meth:`boundary_factor`.
    """

    #: Registry name (:data:`DOMAINS`).
    name: ClassVar[str] = "abstract"

    @property
    def has_boundary(self) -> bool:
        """Whether Ω has a boundary that a factor can enforce."""
        return True

    def input_dim(self, dim: int) -> int:
        """The number of coordinates of a point for a space of dimension ``dim`` (d)."""
        return dim

    @abstractmethod
    def sample(self, backend, key: Key, num_points: int, dim: int):
        """Collocation points of Ω.

        Parameters
        ----------
        backend : Backend
            Draws come from its keyed ``normal`` and ``uniform``.
        key : Key
            The same key gives the same points (docs/keys.md).
        num_points : int
            B.
        dim : int
            The dimension d of the space.

        Returns
        -------
        array, shape (B, input_dim(d)), the backend's dtype
        """

    def sample_boundary(self, backend, key: Key, num_points: int, dim: int):
        """Points on the constrained boundary, shape (num_points, input_dim(dim))."""
        raise NoBoundaryError(f"{self!r} has no boundary to sample")

    @abstractmethod
    def contains(self, x, atol: float = 0.0):
        """Whether each point lies in the closure of Ω, widened by ``atol``: shape (B,), bool."""

    def boundary_factor(self, x_jet: jets.Jet) -> jets.Jet:
        """The jet of φ along the input curve whose jet is ``x_jet`` (primal (B, n)).

        φ is smooth, φ = 0 on the constrained boundary, φ > 0 inside, max φ = 1.
        """
        raise NoBoundaryError(f"{self!r} has no boundary: there is no boundary factor")

    def factor(self, x):
        """φ(x) for points x of shape (B, n): shape (B,)."""
        return self.boundary_factor(jets.Jet(x, ())).primal

    def factor_jet(self, x, directions, order: int) -> jets.Jet:
        """The jet of φ along x + t v for each direction v (the convention of ``MLP.jet``).

        ``directions``: integer indices j of shape (V,) (coordinate directions
        e_j) or floats of shape (V, n) or (V, B, n). This default forms the
        one-hot (V, n) array for coordinate directions, O(V n) memory; radial
        domains override it with an O(V B) gather.
        """
        if _is_index_array(directions):
            directions = _one_hot(x, directions)
        return self.boundary_factor(jets.input_jet(x, directions, order))

    # -- closed forms (none by default) --------------------------------------------------

    def radial_profile(self, rho, order: int) -> list:
        """[p(ρ), p'(ρ), ..., p^(order)(ρ)] for a radial factor φ(x) = p(‖x‖²)."""
        raise _missing(self, "a radial profile p with φ(x) = p(‖x‖²)")

    def factor_laplacian(self, x):
        """Δφ(x), shape (B,)."""
        raise _missing(self, "the Laplacian Δφ of its boundary factor")

    def factor_bilaplacian(self, x):
        """Δ²φ(x), shape (B,)."""
        raise _missing(self, "the biharmonic Δ²φ of its boundary factor")

    #: The operators (keys of :data:`PRODUCT_OPERATORS`) :meth:`factor_product` has.
    product_operators: ClassVar[tuple[str, ...]] = ()

    def factor_product(self, operator: str, x, sums: dict) -> tuple:
        """(φ s, L(φ s)) at x, in closed form from contractions of the derivatives of s.

        The exact solution and forcing of a manufactured solution u* = φ s
        (docs/domains.md#closed-forms).

        Parameters
        ----------
        operator : {"laplacian", "biharmonic"}
            L = Δ or Δ² (:data:`PRODUCT_OPERATORS`).
        x : array, shape (B, n)
        sums : dict
            The contractions ``PRODUCT_OPERATORS[operator]`` of s at x, each shape (B,).

        Raises
        ------
        MissingClosedFormError
            If the domain has no such closed form (``operator`` not in
            :attr:`product_operators`).
        """
        _check_operator(operator)
        offered = ", ".join(self.product_operators) or "none"
        raise _missing(self, f"the {operator} of φ s (it offers: {offered})")


def product_closed_forms() -> dict[str, tuple[str, ...]]:
    """The operators L with a closed-form L(φ s), by registered domain name (:data:`DOMAINS`)."""
    return {name: cls.product_operators for name, cls in DOMAINS.items()}


# -- radial domains -------------------------------------------------------------------------


class _RadialDomain(Domain):
    """A domain whose factor is φ(x) = p(ρ), ρ = ‖x‖², p a polynomial.

    The jet of φ is Faà di Bruno's formula applied to the jet of ρ with the
    derivatives of p (:meth:`radial_profile`); along coordinate directions
    the jet of ρ is (ρ, 2 x_j, 2, 0, ...), one gather. The closed forms
    follow from p: for a radial f(ρ) in R^d, Δf = 2d f' + 4ρ f'', hence

        Δφ  = 2d p' + 4ρ p'',
        Δ²φ = 4d(d + 2) p'' + 16(d + 2) ρ p''' + 16 ρ² p''''.

    With ∇φ = 2p' x, ∇²φ = 2p' I + 4p'' xxᵀ and ∇Δφ = 2q x,
    q = (2d + 4) p'' + 4ρ p''', Leibniz's rule gives L(φ s) for any s from
    the contractions of :data:`PRODUCT_OPERATORS`:

        Δ(φ s)  = Δφ s + 4p' x·∇s + p Δs,
        Δ²(φ s) = Δ²φ s + 8q x·∇s + (2Δφ + 8p') Δs + 16p'' xᵀ(∇²s)x
                  + 8p' x·∇Δs + p Δ²s.
    """

    product_operators: ClassVar[tuple[str, ...]] = ("laplacian", "biharmonic")

    def boundary_factor(self, x_jet):
        rho = jets.squared_norm(x_jet)
        return jets.compose(rho, self.radial_profile(rho.primal, rho.order))

    def factor_jet(self, x, directions, order):
        if not _is_index_array(directions):
            return super().factor_jet(x, directions, order)
        rho = jets.coordinate_squared_norm(x, directions, order)
        return jets.compose(rho, self.radial_profile(rho.primal, order))

    def factor_laplacian(self, x):
        rho = jets.rowwise_squared_norm(x)
        p = _zeros_as_none(self.radial_profile(rho, 2), rho)
        return 2 * x.shape[-1] * p[1] + 4 * rho * p[2]

    def factor_bilaplacian(self, x):
        rho = jets.rowwise_squared_norm(x)
        d = x.shape[-1]
        p = _zeros_as_none(self.radial_profile(rho, 4), rho)
        return 4 * d * (d + 2) * p[2] + 16 * (d + 2) * rho * p[3] + 16 * rho * rho * p[4]

    def factor(self, x):
        """φ(x) = p(‖x‖²), shape (B,): one row-wise dot product per point, no jet."""
        return self.radial_profile(jets.rowwise_squared_norm(x), 0)[0]

    def factor_product(self, operator, x, sums):
        order = 2 if _check_operator(operator) == "laplacian" else 4
        rho = jets.rowwise_squared_norm(x)
        d = x.shape[-1]
        p = _zeros_as_none(self.radial_profile(rho, order), rho)
        s, x_grad, lap = sums["s"], sums["x_grad"], sums["lap"]
        lap_factor = 2 * d * p[1] + 4 * rho * p[2]
        if order == 2:
            return p[0] * s, lap_factor * s + 4 * p[1] * x_grad + p[0] * lap
        bilap_factor = 4 * d * (d + 2) * p[2] + 16 * (d + 2) * rho * p[3] + 16 * rho * rho * p[4]
        q = (2 * d + 4) * p[2] + 4 * rho * p[3]
        return p[0] * s, (
            bilap_factor * s
            + 8 * q * x_grad
            + (2 * lap_factor + 8 * p[1]) * lap
            + 16 * p[2] * sums["x_hess_x"]
            + 8 * p[1] * sums["x_grad_lap"]
            + p[0] * sums["bilap"]
        )

    def contains(self, x, atol=0.0):
        r = array_namespace(x).sqrt(jets.rowwise_squared_norm(x))
        inner, outer = self._radii()
        return (r >= inner - atol) & (r <= outer + atol)

    @abstractmethod
    def _radii(self) -> tuple[float, float]:
        """(inner, outer) radius: 0 inside a ball."""


def _zeros_as_none(profile: list, like) -> list:
    """The profile with ``None`` (an exact zero) replaced by 0.0, broadcastable like ``like``."""
    return [0.0 * like if p is None else p for p in profile]


def _profile(order: int, values: Sequence) -> list:
    """``values`` (p, p', ...) padded with ``None`` (zero) to length order + 1."""
    values = list(values[: order + 1])
    return values + [None] * (order + 1 - len(values))


@dataclass(frozen=True)
class Ball(_RadialDomain):
    """The ball ‖x‖ ≤ R, with φ(x) = 1 − ‖x‖²/R² (zero on the sphere, 1 at the centre).

    Parameters
    ----------
    radius : float
        R > 0 (default 1).
    """

    radius: float = 1.0
    name: ClassVar[str] = "ball"

    def __post_init__(self):
        object.__setattr__(self, "radius", _positive_float(self.radius, "radius"))

    def _radii(self):
        return 0.0, self.radius

    def sample(self, backend, key, num_points, dim):
        """Uniform in volume: x = R (1 − U)^{1/d} ξ / ‖ξ‖, ξ ~ N(0, I_d), U ~ U[0, 1).

        P(‖x‖ ≤ r) = (r/R)^d. The Gaussian batch is rescaled in place: the
        peak is one (B, d) array.
        """
        num_points, dim = _sized(num_points, dim)
        xp = backend.xp
        g, norm = _unit_rows(backend, fold_in(key, "direction"), num_points, dim)
        u = backend.uniform(fold_in(key, "radius"), (num_points,))
        radius = xp.exp(xp.log1p(-u) / dim)  # (1 − U)^{1/d} ∈ (0, 1]: 1 − U has the law of U
        if self.radius != 1.0:
            radius = self.radius * radius
        return _scale_rows(backend, g, radius / norm)

    def sample_boundary(self, backend, key, num_points, dim):
        """Uniform on the sphere ‖x‖ = R: x = R ξ / ‖ξ‖, ξ ~ N(0, I_d)."""
        num_points, dim = _sized(num_points, dim)
        g, norm = _unit_rows(backend, fold_in(key, "direction"), num_points, dim)
        return _scale_rows(backend, g, self.radius / norm)

    def radial_profile(self, rho, order):
        """p(ρ) = 1 − ρ/R², p' = −1/R², higher derivatives zero."""
        inverse = 1.0 / (self.radius * self.radius)
        return _profile(order, [1.0 - inverse * rho, -inverse])


@dataclass(frozen=True)
class Annulus(_RadialDomain):
    """The shell a ≤ ‖x‖ ≤ b, with φ(x) = c (‖x‖² − a²)(b² − ‖x‖²), c = 4/(b² − a²)².

    φ vanishes on both spheres, is positive between them and reaches its
    maximum 1 at ‖x‖² = (a² + b²)/2. (The built-in biharmonic problem's
    (1 − ‖x‖²)(4 − ‖x‖²) is −(9/4) φ for a = 1, b = 2.)

    Parameters
    ----------
    inner, outer : float
        0 < a < b (default 1 and 2).
    """

    inner: float = 1.0
    outer: float = 2.0
    name: ClassVar[str] = "annulus"

    def __post_init__(self):
        inner = _positive_float(self.inner, "inner")
        outer = _positive_float(self.outer, "outer")
        if not inner < outer:
            raise ValueError(f"the annulus needs inner < outer, got {inner} and {outer}")
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "outer", outer)

    def _radii(self):
        return self.inner, self.outer

    def sample(self, backend, key, num_points, dim):
        """Uniform in volume: the radius has the CDF (r^d − a^d)/(b^d − a^d) on [a, b].

        Inverting it without overflow: r = b (U + (1 − U)(a/b)^d)^{1/d}, U ~ U[0, 1);
        the direction is ξ / ‖ξ‖, ξ ~ N(0, I_d), rescaled in place.
        """
        num_points, dim = _sized(num_points, dim)
        xp = backend.xp
        g, norm = _unit_rows(backend, fold_in(key, "direction"), num_points, dim)
        u = backend.uniform(fold_in(key, "radius"), (num_points,))
        floor = (self.inner / self.outer) ** dim  # underflows to 0.0 in high d, harmlessly
        radius = self.outer * xp.exp(xp.log(u + (1 - u) * floor) / dim)
        radius = xp.clip(radius, self.inner, self.outer)
        return _scale_rows(backend, g, radius / norm)

    def sample_boundary(self, backend, key, num_points, dim):
        """Uniform on each sphere, the inner one with probability 1/2.

        Not in proportion to area: the inner sphere's share of the area,
        (a/b)^{d−1}, vanishes in high d, and a boundary loss would never see it.
        """
        num_points, dim = _sized(num_points, dim)
        xp = backend.xp
        g, norm = _unit_rows(backend, fold_in(key, "direction"), num_points, dim)
        inner = xp.astype(backend.uniform(fold_in(key, "sphere"), (num_points,)) < 0.5, g.dtype)
        radius = self.outer + (self.inner - self.outer) * inner  # exactly a or b
        return _scale_rows(backend, g, radius / norm)

    def radial_profile(self, rho, order):
        """p(ρ) = c (ρ − a²)(b² − ρ), p' = c (a² + b² − 2ρ), p'' = −2c, higher zero."""
        a2, b2 = self.inner**2, self.outer**2
        c = 4.0 / (b2 - a2) ** 2
        return _profile(order, [c * (rho - a2) * (b2 - rho), c * (a2 + b2 - 2 * rho), -2 * c])


# -- the box ----------------------------------------------------------------------------------


def _bound(value, what: str):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    values = tuple(float(v) for v in value)
    if not values:
        raise ValueError(f"{what} needs at least one coordinate")
    return values


def _length(value) -> int | None:
    return None if isinstance(value, float) else len(value)


def _short(value) -> str:
    """A bound for a repr: the number, the tuple if short, else its length."""
    if isinstance(value, float) or len(value) <= 6:
        return repr(value)
    return f"<{len(value)} values>"


def _pad_columns(jet: jets.Jet, count: int) -> jets.Jet:
    """Append ``count`` columns to a jet over the last axis: primal 1, coefficients 0."""
    xp = array_namespace(jet.primal)

    def pad(c, fill):
        if c is None:
            return None
        extra = xp.full(tuple(c.shape[:-1]) + (count,), fill, dtype=c.dtype, device=device(c))
        return xp.concat([c, extra], axis=-1)

    coeffs = [pad(c, 0.0) for c in jet.coeffs]
    return type(jet)(pad(jet.primal, 1.0), tuple(coeffs))


def _columns(jet: jets.Jet, start: int, stop: int) -> jets.Jet:
    return jets.linear_map(jet, lambda y, is_primal: y[..., start:stop])


def _product_over_last_axis(jet: jets.Jet) -> jets.Jet:
    """The jet of Π_i f_i over the last axis, from the jets of the f_i (primal (..., n)).

    A pairwise tree of Leibniz products, (f g)_k = Σ_j C(k, j) f_j g_{k−j}: the
    columns are padded with f = 1 to a power of two, then halves are
    multiplied ⌈log₂ n⌉ times. Exact, O(K² n) per point and direction, with
    no division (a factor may be zero).
    """
    n = jet.primal.shape[-1]
    width = 1 << (n - 1).bit_length()
    if width > n:
        jet = _pad_columns(jet, width - n)
    while width > 1:
        half = width // 2
        jet = jets.mul(_columns(jet, 0, half), _columns(jet, half, width))
        width = half
    return jets.linear_map(jet, lambda y, is_primal: y[..., 0])


@dataclass(frozen=True, repr=False)
class Box(Domain):
    """The box Π_i [l_i, h_i], with φ(x) = Π_i 4 (x_i − l_i)(h_i − x_i)/(h_i − l_i)².

    Each ψ_i is 0 on the faces x_i = l_i, x_i = h_i and 1 at the midpoint, so
    φ vanishes on every face and max φ = φ(centre) = 1. The product is C^∞ and
    exact in Taylor mode, but its size falls with d: for uniform points
    E[log ψ_i] = log 4 − 2, so φ is typically (4/e²)^d ≈ 0.54^d, with a
    log-normal spread (Var log ψ_i = 2 − π²/3 ≈ 0.71 per coordinate): about
    10⁻³ at d = 10, 10⁻²⁷ at d = 100, below float32's smallest normal number
    near d = 140. The network then has to grow as 1/φ, so a hard box
    constraint suits moderate d; in high d, prefer a boundary loss
    (:meth:`sample_boundary`) or a ball.

    Parameters
    ----------
    low, high : float or sequence of float
        The bounds l and h; a number applies to every coordinate, a sequence
        fixes d. h_i > l_i (defaults: the unit cube [0, 1]^d).
    """

    low: float | tuple = 0.0
    high: float | tuple = 1.0
    name: ClassVar[str] = "box"

    def __post_init__(self):
        low, high = _bound(self.low, "low"), _bound(self.high, "high")
        lengths = {n for n in (_length(low), _length(high)) if n is not None}
        if len(lengths) > 1:
            raise ValueError(f"low and high have different lengths: {sorted(lengths)}")
        n = lengths.pop() if lengths else 1
        pairs = zip(self._broadcast(low, n), self._broadcast(high, n), strict=True)
        for i, (lo, hi) in enumerate(pairs):
            if not (isfinite(lo) and isfinite(hi) and lo < hi):
                raise ValueError(f"the box needs finite low < high; coordinate {i}: {lo}, {hi}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def __repr__(self) -> str:
        return f"Box(low={_short(self.low)}, high={_short(self.high)})"

    @staticmethod
    def _broadcast(value, n: int) -> tuple:
        return (value,) * n if isinstance(value, float) else value

    def _host_bounds(self, dim: int):
        """(l, h − l) as floats (scalar bounds) or tuples of length ``dim``."""
        n = _length(self.low) or _length(self.high)
        if n is not None and n != dim:
            raise ValueError(f"{self!r} has {n} coordinates, not dim = {dim}")
        if n is None:
            return self.low, self.high - self.low
        low, high = self._broadcast(self.low, n), self._broadcast(self.high, n)
        return low, tuple(h - lo for lo, h in zip(low, high, strict=True))

    def _bounds(self, like, dim: int):
        """(l, h − l) as floats or (dim,) arrays of ``like``'s dtype and device."""
        xp = array_namespace(like)
        return tuple(
            v if isinstance(v, float) else xp.asarray(v, dtype=like.dtype, device=device(like))
            for v in self._host_bounds(dim)
        )

    def sample(self, backend, key, num_points, dim):
        """Uniform: x_i = l_i + (h_i − l_i) U_i, U_i ~ U[0, 1) independent (in place)."""
        num_points, dim = _sized(num_points, dim)
        x = backend.uniform(fold_in(key, "uniform"), (num_points, dim))
        low, width = self._bounds(x, dim)
        x *= width
        x += low
        return x

    def sample_boundary(self, backend, key, num_points, dim):
        """Uniform on the faces (surface measure).

        The face x_i ∈ {l_i, h_i} is chosen with probability ∝ its area
        Π_{j≠i} (h_j − l_j), i.e. coordinate i with probability
        ∝ 1/(h_i − l_i) and either side with probability 1/2; the other
        coordinates are uniform. One (B, d) mask is formed.
        """
        num_points, dim = _sized(num_points, dim)
        xp = backend.xp
        x = self.sample(backend, fold_in(key, "interior"), num_points, dim)
        face = self._draw_faces(backend, fold_in(key, "face"), num_points, dim)
        high_side = backend.uniform(fold_in(key, "side"), (num_points,)) < 0.5
        low, width = self._bounds(x, dim)
        if isinstance(low, float):
            low = xp.full((dim,), low, dtype=x.dtype, device=device(x))
        high = low + width
        value = xp.where(high_side, xp.take(high, face), xp.take(low, face))
        on_face = xp.expand_dims(face, axis=1) == xp.arange(dim, device=device(x))
        return xp.where(on_face, xp.expand_dims(value, axis=1), x)

    def _draw_faces(self, backend, key, num_points, dim):
        """Coordinates i with P(i) = (1/w_i) / Σ_j (1/w_j), w = h − l."""
        _, width = self._host_bounds(dim)
        if isinstance(width, float):
            return backend.integers(key, (num_points,), 0, dim)
        xp = backend.xp
        weights = [1.0 / w for w in width]
        total, running, cdf = sum(weights), 0.0, []
        for w in weights:
            running += w
            cdf.append(running / total)
        cdf[-1] = 1.0
        u = backend.uniform(key, (num_points,))
        cdf = xp.asarray(cdf, dtype=u.dtype, device=device(u))
        return xp.clip(xp.searchsorted(cdf, u, side="right"), 0, dim - 1)

    def contains(self, x, atol=0.0):
        xp = array_namespace(x)
        low, width = self._bounds(x, x.shape[-1])
        inside = (x >= low - atol) & (x <= low + width + atol)
        return xp.all(inside, axis=-1)

    def boundary_factor(self, x_jet):
        """Π_i ψ_i, ψ_i = 4 s_i (1 − s_i), s_i = (x_i − l_i)/(h_i − l_i).

        Each ψ_i is a quadratic in s_i (derivatives 4(1 − 2 s_i) and −8), its
        jet by Faà di Bruno; the product over i by
        :func:`_product_over_last_axis`.
        """
        x0 = x_jet.primal
        low, width = self._bounds(x0, x0.shape[-1])
        s = jets.linear_map(x_jet, lambda y, primal: (y - low) / width if primal else y / width)
        s0 = s.primal
        psi = jets.compose(s, _profile(s.order, [4 * s0 * (1 - s0), 4 - 8 * s0, -8.0]))
        return _product_over_last_axis(psi)


# -- the whole space ------------------------------------------------------------------------


@dataclass(frozen=True)
class WholeSpace(Domain):
    """R^d with Gaussian collocation points N(0, σ² I); no boundary, no factor.

    Parameters
    ----------
    scale : float
        σ > 0 (default 1).
    """

    scale: float = 1.0
    name: ClassVar[str] = "whole-space"

    def __post_init__(self):
        object.__setattr__(self, "scale", _positive_float(self.scale, "scale"))

    @property
    def has_boundary(self) -> bool:
        return False

    def sample(self, backend, key, num_points, dim):
        """x = σ ξ, ξ ~ N(0, I_d) (scaled in place)."""
        num_points, dim = _sized(num_points, dim)
        x = backend.normal(fold_in(key, "normal"), (num_points, dim))
        if self.scale != 1.0:
            x *= self.scale
        return x

    def contains(self, x, atol=0.0):
        xp = array_namespace(x)
        return xp.all(xp.isfinite(x), axis=-1)


# -- space × time -----------------------------------------------------------------------------

#: Conditions a :class:`SpaceTime` factor enforces.
CONDITIONS = ("initial", "terminal")


@dataclass(frozen=True)
class SpaceTime(Domain):
    """Ω × [t0, t1], points (x, t) with t the last coordinate (d + 1 in all).

    The factor enforces the initial condition at t = t0 or the terminal one at
    t = t1, and also Ω's boundary if ``hard_space``:

        τ(t) = (t − t0)/(t1 − t0)  (initial)  or  (t1 − t)/(t1 − t0)  (terminal),
        φ(x, t) = τ(t) φ_Ω(x)  (hard_space)  or  τ(t).

    With a lift g equal to the data at that time, u = g + φ N meets it for
    every N: the ansatz (T − t) N + g of a terminal-value problem.

    Parameters
    ----------
    space : Domain
        Ω (not itself a :class:`SpaceTime`).
    t0, t1 : float
        The time interval, t0 < t1 (default [0, 1]).
    condition : {"initial", "terminal"}
        Which end of the interval the factor vanishes at.
    hard_space : bool
        Multiply by Ω's factor, so that u = g on ∂Ω × [t0, t1] as well
        (default False: the spatial boundary, if any, is left to a loss term;
        :meth:`sample_lateral` draws its points).
    """

    space: Domain
    t0: float = 0.0
    t1: float = 1.0
    condition: str = "initial"
    hard_space: bool = False
    name: ClassVar[str] = "space-time"

    def __post_init__(self):
        if not isinstance(self.space, Domain) or isinstance(self.space, SpaceTime):
            raise TypeError(f"space must be a spatial Domain, got {self.space!r}")
        t0, t1 = float(self.t0), float(self.t1)
        if not (isfinite(t0) and isfinite(t1) and t0 < t1):
            raise ValueError(f"SpaceTime needs finite t0 < t1, got {t0} and {t1}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition must be one of {CONDITIONS}, got {self.condition!r}")
        if self.hard_space and not self.space.has_boundary:
            raise NoBoundaryError(f"hard_space=True, but {self.space!r} has no boundary")
        object.__setattr__(self, "t0", t0)
        object.__setattr__(self, "t1", t1)

    def input_dim(self, dim):
        return self.space.input_dim(dim) + 1

    @property
    def _end(self) -> float:
        return self.t0 if self.condition == "initial" else self.t1

    def _with_time(self, backend, x, t):
        xp = backend.xp
        return xp.concat([x, xp.expand_dims(t, axis=1)], axis=1)

    def _times(self, backend, key, num_points):
        t = backend.uniform(key, (num_points,))
        return self.t0 + (self.t1 - self.t0) * t

    def sample(self, backend, key, num_points, dim):
        """x from Ω's sampler, t ~ U[t0, t1) independent; peak: the (B, d) and (B, d + 1) arrays."""
        x = self.space.sample(backend, fold_in(key, "space"), num_points, dim)
        return self._with_time(backend, x, self._times(backend, fold_in(key, "time"), num_points))

    def sample_boundary(self, backend, key, num_points, dim):
        """The condition's slice: x from Ω's sampler, t = t0 (initial) or t1 (terminal)."""
        x = self.space.sample(backend, fold_in(key, "space"), num_points, dim)
        t = backend.xp.full((num_points,), self._end, dtype=x.dtype, device=device(x))
        return self._with_time(backend, x, t)

    def sample_lateral(self, backend, key, num_points, dim):
        """∂Ω × [t0, t1]: x from Ω's boundary sampler, t ~ U[t0, t1)."""
        x = self.space.sample_boundary(backend, fold_in(key, "space"), num_points, dim)
        return self._with_time(backend, x, self._times(backend, fold_in(key, "time"), num_points))

    def contains(self, x, atol=0.0):
        t = x[..., -1]
        in_time = (t >= self.t0 - atol) & (t <= self.t1 + atol)
        return self.space.contains(x[..., :-1], atol) & in_time

    @property
    def _rate(self) -> float:
        """dτ/dt: 1/(t1 − t0) (initial) or −1/(t1 − t0) (terminal)."""
        sign = 1.0 if self.condition == "initial" else -1.0
        return sign / (self.t1 - self.t0)

    def _time_map(self, y, is_primal):
        """τ as an affine map of the last coordinate: τ = rate (t − end)."""
        t = y[..., -1]
        return self._rate * (t - self._end) if is_primal else self._rate * t

    def boundary_factor(self, x_jet):
        tau = jets.linear_map(x_jet, self._time_map)
        if not self.hard_space:
            return tau
        space = jets.linear_map(x_jet, lambda y, is_primal: y[..., :-1])
        return jets.mul(tau, self.space.boundary_factor(space))

    def factor_jet(self, x, directions, order):
        """Along coordinate directions, index n − 1 is t; the others go to Ω's own gather.

        For e_t the spatial factor's coefficients are zero and τ's first is
        ±1/(t1 − t0); for e_j, j < n − 1, the reverse. No one-hot is formed
        unless Ω's own factor forms one.
        """
        if not _is_index_array(directions):
            return super().factor_jet(x, directions, order)
        xp = array_namespace(x, directions)
        is_time = directions == x.shape[-1] - 1
        rate = self._rate * xp.astype(is_time, x.dtype)  # ±1/(t1 − t0) along e_t, else 0
        tau = jets.Jet(
            self._time_map(x, True), (xp.expand_dims(rate, axis=1),) + (None,) * (order - 1)
        )
        if not self.hard_space:
            return tau
        space_index = xp.where(is_time, xp.zeros_like(directions), directions)
        space = self.space.factor_jet(x[..., :-1], space_index, order)
        moves = xp.astype(~is_time, x.dtype)
        return jets.mul(tau, _mask_directions(space, moves))

    def factor_laplacian(self, x):
        """Δφ over all d + 1 coordinates: τ Δφ_Ω (τ is linear in t and φ_Ω free of t), or 0."""
        if not self.hard_space:
            return 0.0 * x[..., -1]
        return self._time_map(x, True) * self._space_closed_form("factor_laplacian", x)

    def factor_bilaplacian(self, x):
        """Δ²φ over all d + 1 coordinates: τ Δ²φ_Ω, or 0."""
        if not self.hard_space:
            return 0.0 * x[..., -1]
        return self._time_map(x, True) * self._space_closed_form("factor_bilaplacian", x)

    def _space_closed_form(self, method: str, x):
        try:
            return getattr(self.space, method)(x[..., :-1])
        except MissingClosedFormError as exc:
            raise MissingClosedFormError(f"{self!r}: {exc}") from exc


@dataclass(frozen=True)
class Diffusion(SpaceTime):
    """R^d × [t0, t1] with points that follow the diffusion of u_t + κΔu from the origin.

    Points (x, t), time last::

        t ~ U[t0, t1),   x | t ~ N(0, 2κ (t − t0) I_d),

    the law of √(2κ) W_{t − t0} for a Brownian motion W started at 0 at t0:
    the region a terminal-value problem u_t + κΔu + F(u) = 0 needs to be
    right on to be right at (0, t0) (Feynman–Kac). ``space`` is always
    :class:`WholeSpace` (its scale is not used); the factor is
    :class:`SpaceTime`'s, τ(t) = (t1 − t)/(t1 − t0) for the default
    ``condition="terminal"``.

    Parameters
    ----------
    t0, t1 : float
        The time interval, t0 < t1 (default [0, 1]).
    condition : {"terminal", "initial"}
        Where the factor vanishes (default the terminal time t1).
    diffusivity : float
        κ > 0 (default 1).
    """

    space: Domain = WholeSpace()
    condition: str = "terminal"
    diffusivity: float = 1.0
    name: ClassVar[str] = "diffusion"

    def __post_init__(self):
        if not isinstance(self.space, WholeSpace):
            raise TypeError(f"Diffusion's space is the whole space R^d, got {self.space!r}")
        super().__post_init__()
        object.__setattr__(self, "diffusivity", _positive_float(self.diffusivity, "diffusivity"))

    def _positions(self, backend, key, t, dim):
        """x = √(2κ (t − t0)) ξ, ξ ~ N(0, I_d) (scaled in place)."""
        xp = backend.xp
        x = backend.normal(fold_in(key, "normal"), (t.shape[0], dim))
        return _scale_rows(backend, x, xp.sqrt(2.0 * self.diffusivity * (t - self.t0)))

    def sample(self, backend, key, num_points, dim):
        """t ~ U[t0, t1), then x ~ N(0, 2κ (t − t0) I_d): shape (B, d + 1)."""
        num_points, dim = _sized(num_points, dim)
        t = self._times(backend, fold_in(key, "time"), num_points)
        return self._with_time(backend, self._positions(backend, fold_in(key, "space"), t, dim), t)

    def sample_boundary(self, backend, key, num_points, dim):
        """The condition's slice, t = t0 or t1, with x ~ N(0, 2κ (t − t0) I_d)."""
        num_points, dim = _sized(num_points, dim)
        t = backend.xp.full((num_points,), self._end, dtype=backend.dtype, device=backend.device)
        return self._with_time(backend, self._positions(backend, fold_in(key, "space"), t, dim), t)


def _mask_directions(jet: jets.Jet, mask) -> jets.Jet:
    """Multiply each coefficient's direction v (leading axis, size V) by mask[v]."""
    xp = array_namespace(jet.primal)

    def masked(c):
        if c is None:
            return None
        return c * xp.reshape(mask, (mask.shape[0],) + (1,) * (c.ndim - 1))

    return type(jet)(jet.primal, tuple(masked(c) for c in jet.coeffs))


# -- hard constraints -------------------------------------------------------------------------

#: A lift: None (zero data), a number (constant data) or a function of the input jet.
Lift = Callable[[jets.Jet], jets.Jet] | float | None


@dataclass(frozen=True)
class HardConstraint:
    """The PINN ansatz u(x) = g(x) + φ(x) N(x) on a domain (docs/domains.md#hard-constraints).

    φ is the domain's boundary factor, zero on the constrained boundary, so
    u = g there for every network N: the boundary (or initial, or terminal)
    condition holds exactly. The lift g must

    * equal the data on that boundary (u = g where φ = 0),
    * be smooth on the whole domain (its jets are taken inside it).

    Any such g will do: the network learns u − g in the interior.

    Jets: (u)_k = g_k + Σ_j C(k, j) φ_j N_{k−j} (Leibniz), with the jets of φ
    from :meth:`Domain.factor_jet`. ``network`` is a field, so the activity
    engine can swap the network (``dataclasses.replace(model, network=...)``);
    φ and g broadcast over any leading query axis the network's jet adds.

    Parameters
    ----------
    domain : Domain
        With a boundary factor (not :class:`WholeSpace` itself).
    network : MLP
        N, with a scalar output and ``domain.input_dim(d)`` inputs.
    lift : None, float or callable, optional
        g. ``None``: zero data; a number: constant data; a callable
        ``lift(x_jet) -> Jet`` mapping the jet of the input curve (primal (B, n),
        first coefficient (V, 1, n) or (V, B, n), built with
        :mod:`sdze_core.jets` operations) to the jet of g, primal (B,). Along
        coordinate directions the input jet's tangent is the one-hot (V, n)
        array. ``apply`` calls it on an order-0 jet ``Jet(x, ())``.
    """

    domain: Domain
    network: Any
    lift: Lift = None

    def __post_init__(self):
        if not isinstance(self.domain, Domain):
            raise TypeError(f"domain must be a Domain, got {type(self.domain).__name__}")
        if not self.domain.has_boundary:
            raise NoBoundaryError(
                f"{self.domain!r} has no boundary to constrain; for an initial or terminal "
                "condition use SpaceTime(space, ...)"
            )
        sizes = getattr(self.network, "sizes", None)
        if sizes is not None and sizes[-1] != 1:
            raise ValueError("a hard constraint needs a network with a scalar output (last size 1)")
        lift = self.lift
        if not (lift is None or callable(lift) or _is_number(lift)):
            raise TypeError(f"lift must be None, a number or a callable on jets, got {lift!r}")

    def init(self, key: Key, backend):
        """The network's parameters; φ and g have none."""
        return self.network.init(key, backend)

    def apply(self, params, x):
        """u(x) = g(x) + φ(x) N(x) for x of shape (B, n); shape (B,)."""
        x, _ = conform(params, x)
        u = self.domain.factor(x) * self.network.apply(params, x)
        if self.lift is None:
            return u
        if _is_number(self.lift):
            return u + float(self.lift)
        return self._lift_jet(jets.Jet(x, ()), x).primal + u

    def jet(self, params, x, directions, order: int, collapse: bool = False) -> jets.Jet:
        """Jet of u along x + t v for each direction; arguments as ``MLP.jet``.

        Returns primal (B,) and coefficients D^k u(x)[v, ..., v] of shape (V, B)
        (with the network's query axis, if any, before B; the collapsed top
        summed over V).
        """
        x, directions = conform(params, x, directions)
        net = self.network.jet(params, x, directions, order, collapse)
        u = jets.mul(_broadcast_like(self.domain.factor_jet(x, directions, order), net), net)
        if self.lift is None:
            return u
        if _is_number(self.lift):
            return jets.shift(u, float(self.lift))
        tangents = _one_hot(x, directions) if _is_index_array(directions) else directions
        g = self._lift_jet(jets.input_jet(x, tangents, order), x)
        return jets.add(_broadcast_like(g, u), u)

    def _lift_jet(self, x_jet, x) -> jets.Jet:
        g = self.lift(x_jet)
        if not isinstance(g, jets.Jet) or g.order != x_jet.order:
            raise TypeError(
                f"the lift must return a Jet of order {x_jet.order} (use sdze_core.jets "
                f"operations on its input), got {type(g).__name__}"
            )
        if tuple(g.primal.shape) != (x.shape[0],):
            shape = tuple(g.primal.shape)
            raise ValueError(f"the lift's jet must have primal shape ({x.shape[0]},), got {shape}")
        return g


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _broadcast_like(jet: jets.Jet, target: jets.Jet) -> jets.Jet:
    """Insert the leading batch axes ``target`` has beyond ``jet`` (the engine's query axis)."""
    extra = target.primal.ndim - jet.primal.ndim
    return jets.insert_batch_axes(jet, extra) if extra > 0 else jet


# -- the registry -------------------------------------------------------------------------------

#: Domain classes by name; :func:`register_domain` adds one, :func:`make_domain` builds one.
DOMAINS: dict[str, type[Domain]] = {}


def register_domain(cls: type[Domain]) -> type[Domain]:
    """Register a :class:`Domain` subclass under its ``name`` (usable as a decorator).

    Raises ``ValueError`` if another class already holds the name, ``TypeError``
    if ``cls`` is not a named Domain subclass.
    """
    if not (isinstance(cls, type) and issubclass(cls, Domain)):
        raise TypeError(f"register_domain needs a Domain subclass, got {cls!r}")
    name = cls.name
    if not isinstance(name, str) or not name or name == Domain.name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (a non-empty str)")
    if DOMAINS.get(name, cls) is not cls:
        raise ValueError(f"domain name {name!r} is already registered by {DOMAINS[name].__name__}")
    DOMAINS[name] = cls
    return cls


def make_domain(name: str, **options) -> Domain:
    """``DOMAINS[name](**options)``; an unknown name raises ``ValueError`` naming the known."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {', '.join(sorted(DOMAINS))}")
    return DOMAINS[name](**options)


for _cls in (Ball, Annulus, Box, WholeSpace, SpaceTime, Diffusion):
    register_domain(_cls)
del _cls
