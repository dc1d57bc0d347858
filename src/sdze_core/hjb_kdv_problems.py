"""Space-time built-ins written with the public API: HJB-LIN and KdV (docs/problems.md).

Both are assembled from domains (:mod:`sdze_core.domains`), operator terms
(:mod:`sdze_core.operator_terms`) and the problem protocol
(:class:`~sdze_core.problem_protocol.PDEProblem`), and registered as
built-ins; the solver treats them like any user problem. Points are (x, t),
time last.

**HJB-LIN** (STDE's Hamilton–Jacobi–Bellman test, docs/problems.md), on
R^d × [0, 1]::

    u_t + Δ_x u − (1/d) Σ_i |∂u/∂x_i|^c = −2,   c = 1.75,   u(x, 1) = Σ_i x_i,

with the exact solution u*(x, t) = Σ_i x_i + 1 − t (every ∂_i u* = 1, so the
Hamiltonian is −1 and u*_t = −1). Points x ~ N(0, I_d), t ~ U[0, 1]; the
terminal condition by the ansatz u = Σ_i x_i + (1 − t) N(x, t). The
Hamiltonian is a sum of per-coordinate terms, so V sampled coordinates
estimate it without bias (:class:`~sdze_core.operator_terms.PartialPowerSum`).

**KdV** (a third-order problem in one space dimension), on [−1, 1] × [0, 1]::

    u_t + u u_x + ν u_xxx = f(x, t),   ν = 0.0025,

with the manufactured travelling wave u*(x, t) = A sech²(k (x − c t − x0))
(A = 1, k = 3, c = 0.5, x0 = −0.25: not a soliton of this ν, so f ≠ 0).
With ξ = k (x − c t − x0), S = sech² ξ, T = tanh ξ (S' = −2ST, T' = S)::

    u_x = −2AkST,   u_t = 2AkcST,   u_xxx = A k³ S T (16 − 24 T²),
    f = 2AkcST − 2A²k S²T + ν A k³ S T (16 − 24 T²).

KdV on an interval is well posed with u given at both ends and u_x at the
right one (dispersion ν > 0), besides the initial profile. The ansatz meets
all four exactly: u = g + τ(t) ψ(x) N(x, t) with τ = t, ψ ∝ (x + 1)(1 − x)²
(:class:`ClampedInterval`: zero at both ends, zero slope at the right), and
the lift g built from the data alone (:meth:`KdV.lift`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from array_api_compat import array_namespace

from . import jets
from .domains import Domain, HardConstraint, SpaceTime, WholeSpace
from .keys import Key, fold_in
from .models import MLP
from .operator_terms import (
    Convection,
    LinearCombination,
    PartialPowerSum,
    SubsetDiagonal,
    SubsetLaplacian,
)
from .oracles import FirstDerivative
from .problem_registry import _register_builtin

__all__ = ["HJBLin", "KdV", "ClampedInterval", "make_hjb_lin", "make_kdv", "HJB_KDV_PROBLEMS"]


def _affine(x_jet: jets.Jet, j: int, scale: float, constant: float = 0.0) -> jets.Jet:
    """The jet of scale · x_j + constant from the jet of the input curve."""
    return jets.linear_map(
        x_jet, lambda y, is_primal: scale * y[..., j] + constant if is_primal else scale * y[..., j]
    )


def _network(dim: int, width: int, depth: int, activation: str) -> MLP:
    return MLP((dim,) + (width,) * depth + (1,), activation)


# -- HJB-LIN --------------------------------------------------------------------------------


def _sum_of_space(x_jet: jets.Jet) -> jets.Jet:
    """g(x, t) = Σ_i x_i, the terminal data (a jet function: linear in the input)."""
    return jets.linear_map(x_jet, lambda y, _: array_namespace(y).sum(y[..., :-1], axis=-1))


@dataclass(frozen=True, eq=False)
class HJBLin:
    """HJB-LIN on R^d × [0, 1]: u_t + Δ_x u − (1/d) Σ_i |u_{x_i}|^c = −2 (module docstring).

    Build one with :func:`make_hjb_lin` (registered as ``"hjb-lin"``). A point
    is (x, t), so :attr:`dim` = d + 1.

    Parameters
    ----------
    space_dim : int
        d.
    backend : Backend
        Where the points are drawn.
    c : float
        The Hamiltonian's power (1.75).
    """

    space_dim: int
    backend: Any
    c: float = 1.75
    domain: SpaceTime = field(init=False)

    def __post_init__(self):
        terminal = SpaceTime(WholeSpace(), 0.0, 1.0, condition="terminal")
        object.__setattr__(self, "domain", terminal)

    @property
    def dim(self) -> int:
        """d + 1: the space coordinates and time."""
        return self.space_dim + 1

    def sample_domain(self, key: Key, num_points: int, backend=None):
        """x ~ N(0, I_d), t ~ U[0, 1): shape (num_points, d + 1)."""
        return self.domain.sample(backend or self.backend, key, num_points, self.space_dim)

    def model(self, width: int = 128, depth: int = 4, activation: str = "tanh") -> HardConstraint:
        """u = Σ_i x_i + (1 − t) N(x, t): the terminal condition for every network N."""
        net = _network(self.dim, width, depth, activation)
        return HardConstraint(self.domain, net, lift=_sum_of_space)

    def oracle(self, num_directions: int = 16) -> LinearCombination:
        """u_t + Δ_x u − (1/d) Σ_i |u_{x_i}|^c, Δ_x and the sum on V = min(num_directions, d)
        sampled space coordinates (each unbiased; exact at V = d)."""
        space, count = range(self.space_dim), min(num_directions, self.space_dim)
        return LinearCombination(
            (
                (1.0, FirstDerivative(-1)),
                (1.0, SubsetLaplacian(space, count)),
                (-1.0 / self.space_dim, PartialPowerSum(self.c, space, count)),
            )
        )

    def forcing(self, x):
        """f = −2, shape (B,)."""
        return 0.0 * x[:, -1] - 2.0

    def exact(self, x):
        """u*(x, t) = Σ_i x_i + 1 − t, shape (B,)."""
        return array_namespace(x).sum(x[:, :-1], axis=1) + 1.0 - x[:, -1]

    def exact_jet(self, x_jet: jets.Jet) -> jets.Jet:
        """The jet of u* from the jet of the input curve (u* is affine)."""
        return jets.linear_map(
            x_jet,
            lambda y, is_primal: array_namespace(y).sum(y[..., :-1], axis=-1)
            + ((1.0 - y[..., -1]) if is_primal else -y[..., -1]),
        )


def make_hjb_lin(dim: int, seed: int | Key = 0, backend=None, c: float = 1.75) -> HJBLin:
    """u_t + Δ_x u − (1/d) Σ_i |∂_i u|^1.75 = −2 on R^d × [0, 1], u* = Σ_i x_i + 1 − t (HJB-LIN).

    ``dim`` is d >= 1; nothing is random (``seed`` is unused).
    """
    from .registry import get_backend

    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"hjb-lin needs an integer space dimension >= 1, got {dim!r}")
    return HJBLin(dim, backend or get_backend(), c)


# -- the interval clamped at its right end --------------------------------------------------


@dataclass(frozen=True)
class ClampedInterval(Domain):
    """[a, b] with φ(x) = C (x − a)(b − x)², C = 27 / (4 (b − a)³): zero at both ends, φ' = 0 at b.

    A hard constraint u = g + φ N on it fixes u at a and b and u_x at b (the
    data of KdV's boundary-value problem with ν > 0). φ peaks at
    x = a + (b − a)/3 with value 1. One space dimension only.

    Parameters
    ----------
    low, high : float
        a < b.
    """

    low: float = -1.0
    high: float = 1.0
    name: ClassVar[str] = "clamped-interval"

    def __post_init__(self):
        low, high = float(self.low), float(self.high)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"ClampedInterval needs finite low < high, got {low} and {high}")
        object.__setattr__(self, "low", low)
        object.__setattr__(self, "high", high)

    def _one_dimensional(self, num_points, dim) -> int:
        if dim != 1:
            raise ValueError(f"{self!r} is one-dimensional, got dim = {dim}")
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be an int >= 1, got {num_points!r}")
        return num_points

    def sample(self, backend, key, num_points, dim):
        """x ~ U[a, b), shape (num_points, 1)."""
        num_points = self._one_dimensional(num_points, dim)
        u = backend.uniform(fold_in(key, "uniform"), (num_points, 1))
        return self.low + (self.high - self.low) * u

    def sample_boundary(self, backend, key, num_points, dim):
        """a or b, each with probability 1/2, shape (num_points, 1)."""
        num_points = self._one_dimensional(num_points, dim)
        xp = backend.xp
        high = xp.astype(backend.uniform(fold_in(key, "end"), (num_points, 1)) < 0.5, backend.dtype)
        return self.low + (self.high - self.low) * high

    def contains(self, x, atol=0.0):
        return (x[..., 0] >= self.low - atol) & (x[..., 0] <= self.high + atol)

    def boundary_factor(self, x_jet):
        """C (x − a)(b − x)² by Leibniz products of the two affine jets."""
        if x_jet.primal.shape[-1] != 1:
            raise ValueError(f"{self!r} is one-dimensional, got points of shape "
                                  f"{tuple(x_jet.primal.shape)}")  # fmt: skip
        length = self.high - self.low
        scale = 27.0 / (4.0 * length**3)
        left = _affine(x_jet, 0, scale, -scale * self.low)
        right = _affine(x_jet, 0, -1.0, self.high)
        return jets.mul(left, jets.mul(right, right))


# -- KdV ------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class KdV:
    """u_t + u u_x + ν u_xxx = f on [−1, 1] × [0, 1], u* = A sech²(k (x − c t − x0)).

    Build one with :func:`make_kdv` (registered as ``"kdv"``); :attr:`dim` = 2
    (x, t). The initial profile u*(x, 0), the end values u*(±1, t) and the
    right-end slope u*_x(1, t) are built into the model (:meth:`model`).

    Parameters
    ----------
    backend : Backend
    nu : float
        ν (0.0025).
    amplitude, wavenumber, speed, shift : float
        A, k, c and x0 of the exact solution.
    """

    backend: Any
    nu: float = 0.0025
    amplitude: float = 1.0
    wavenumber: float = 3.0
    speed: float = 0.5
    shift: float = -0.25
    domain: SpaceTime = field(init=False)

    dim: ClassVar[int] = 2
    space_dim: ClassVar[int] = 1

    def __post_init__(self):
        space = ClampedInterval(-1.0, 1.0)
        object.__setattr__(self, "domain", SpaceTime(space, 0.0, 1.0, "initial", hard_space=True))

    # -- the exact solution
    def _phase(self, x, t):
        return self.wavenumber * (x - self.speed * t - self.shift)

    def _profile_value(self, xi):
        """A sech² ξ for a number ξ."""
        return self.amplitude / math.cosh(xi) ** 2

    def _slope_value(self, xi):
        """∂/∂x of A sech²(k(x − ...)): −2Ak sech² ξ tanh ξ, for a number ξ."""
        return -2.0 * self.wavenumber * self._profile_value(xi) * math.tanh(xi)

    def _profile_jet(self, xi: jets.Jet) -> jets.Jet:
        """The jet of A sech² ξ = A (1 − tanh² ξ) from the jet of ξ."""
        tanh = jets.tanh(xi)
        return jets.shift(jets.scale(jets.mul(tanh, tanh), -self.amplitude), self.amplitude)

    def _slope_jet(self, xi: jets.Jet) -> jets.Jet:
        """The jet of −2Ak sech² ξ tanh ξ from the jet of ξ."""
        return jets.scale(jets.mul(self._profile_jet(xi), jets.tanh(xi)), -2.0 * self.wavenumber)

    def _sech_tanh(self, x):
        xp = array_namespace(x)
        tanh = xp.tanh(self._phase(x[:, 0], x[:, 1]))
        return 1.0 - tanh * tanh, tanh

    def exact(self, x):
        """u*(x, t) = A sech²(k (x − c t − x0)), shape (B,)."""
        return self.amplitude * self._sech_tanh(x)[0]

    def exact_jet(self, x_jet: jets.Jet) -> jets.Jet:
        """The jet of u* from the jet of the input curve (Taylor mode, no closed form)."""
        k, c = self.wavenumber, self.speed
        xi = jets.linear_map(
            x_jet,
            lambda y, p: k * (y[..., 0] - c * y[..., 1] - self.shift)
            if p else k * (y[..., 0] - c * y[..., 1]),
        )
        return self._profile_jet(xi)

    def forcing(self, x):
        """f = 2AkcST − 2A²kS²T + νAk³ST(16 − 24T²), S = sech² ξ, T = tanh ξ; shape (B,)."""
        A, k, c = self.amplitude, self.wavenumber, self.speed
        S, T = self._sech_tanh(x)
        ST = S * T
        return 2 * A * k * c * ST - 2 * A * A * k * S * ST + self.nu * A * k**3 * ST * (
            16 - 24 * T * T
        )

    # -- the data and the ansatz
    def lift(self, x_jet: jets.Jet) -> jets.Jet:
        """g = u0(x) + p_a(x) Δh_a(t) + p_b(x) Δh_b(t) + p_s(x) Δs_b(t), from the data alone.

        u0 = u*(·, 0) the initial profile, h_a, h_b = u*(a, ·), u*(b, ·) the end
        values and s_b = u*_x(b, ·) the right-end slope, a = −1, b = 1; Δh(t) =
        h(t) − h(0). The quadratics p_a = ((x − b)/(a − b))², p_b = 1 − p_a and
        p_s = (x − a)(x − b)/(b − a) are dual to the data (p_a(a) = 1, p_a(b) =
        p_a'(b) = 0; p_b(b) = 1, p_b(a) = p_b'(b) = 0; p_s'(b) = 1, p_s(a) =
        p_s(b) = 0), and u0 meets the end data at t = 0, so g = u0 at t = 0,
        g = h_a at a, g = h_b and g_x = s_b at b.
        """
        a, b = self.domain.space.low, self.domain.space.high
        k, c, x0 = self.wavenumber, self.speed, self.shift
        u0 = self._profile_jet(_affine(x_jet, 0, k, -k * x0))

        def end(x_end):  # ξ(x_end, t) = k (x_end − x0) − k c t
            return _affine(x_jet, 1, -k * c, k * (x_end - x0))

        h_a = jets.shift(self._profile_jet(end(a)), -self._profile_value(k * (a - x0)))
        h_b = jets.shift(self._profile_jet(end(b)), -self._profile_value(k * (b - x0)))
        s_b = jets.shift(self._slope_jet(end(b)), -self._slope_value(k * (b - x0)))
        from_b = _affine(x_jet, 0, 1.0 / (a - b), -b / (a - b))
        p_a = jets.mul(from_b, from_b)
        p_b = jets.shift(jets.scale(p_a, -1.0), 1.0)
        p_s = jets.mul(_affine(x_jet, 0, 1.0 / (b - a), -a / (b - a)), _affine(x_jet, 0, 1.0, -b))
        g = jets.add(u0, jets.mul(p_a, h_a))
        return jets.add(jets.add(g, jets.mul(p_b, h_b)), jets.mul(p_s, s_b))

    def sample_domain(self, key: Key, num_points: int, backend=None):
        """x ~ U[−1, 1), t ~ U[0, 1): shape (num_points, 2)."""
        return self.domain.sample(backend or self.backend, key, num_points, 1)

    def model(self, width: int = 128, depth: int = 4, activation: str = "tanh") -> HardConstraint:
        """u = g + t ψ(x) N(x, t): initial, end and right-slope data for every network N."""
        return HardConstraint(self.domain, _network(self.dim, width, depth, activation), self.lift)

    def oracle(self, num_directions: int = 16) -> LinearCombination:
        """u_t + u u_x + ν u_xxx, exactly (three jets per point; ``num_directions`` is unused)."""
        return LinearCombination(
            (
                (1.0, FirstDerivative(-1)),
                (1.0, Convection(0)),
                (self.nu, SubsetDiagonal(3, (0,))),
            )
        )


def make_kdv(dim: int = 1, seed: int | Key = 0, backend=None) -> KdV:
    """u_t + u u_x + 0.0025 u_xxx = f on [−1, 1] × [0, 1], u* a travelling sech² (KdV, --dim 1).

    One space dimension only; nothing is random (``seed`` is unused).
    """
    from .registry import get_backend

    if isinstance(dim, bool) or not isinstance(dim, int) or dim != 1:
        raise ValueError(f"kdv is a problem in one space dimension: use --dim 1, got {dim!r}")
    return KdV(backend or get_backend())


#: The built-ins of this module: name -> factory.
HJB_KDV_PROBLEMS = {"hjb-lin": make_hjb_lin, "kdv": make_kdv}

for _name, _factory in HJB_KDV_PROBLEMS.items():
    _register_builtin(_name, _factory)
