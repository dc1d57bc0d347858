"""Semilinear parabolic problems with a terminal condition (docs/problems.md#parabolic-problems).

On R^d × [0, T], T = 0.3, solved backwards from t = T::

    u_t + Δ_x u + F(u) = 0,   u(x, T) = g(x),

| name | F(u) | g(x) |
| --- | --- | --- |
| allen-cahn-parabolic | u − u³ | arctan(max_i x_i) |
| semilinear-heat-parabolic | (1 − u²)/(1 + u²) | 5 / (10 + 2‖x‖²) |
| sine-gordon-parabolic | sin u | 5 / (10 + 2‖x‖²) |

They are written with the public pieces only: the points follow the
diffusion from the origin (:class:`~sdze_core.domains.Diffusion`: t ~ U[0, T],
x ~ N(0, 2t I)); the network is the hard constraint u = h(x, t) + τ(t) N(x, t),
τ = (T − t)/T (:class:`~sdze_core.domains.HardConstraint`), with a smooth lift
h(·, T) = g (:func:`smoothed_arctan_max`, :func:`mean_field_inverse_quadratic`),
so u(·, T) = g for every N; the operator is u_t + Δ_x u, a
:class:`~sdze_core.operator_terms.LinearCombination` of
:class:`~sdze_core.oracles.FirstDerivative` (time, exact) and
:class:`~sdze_core.operator_terms.SubsetLaplacian` (V sampled space
coordinates, unbiased). In the protocol's residual r = L̂u − F̃(u) − f the
reaction is F̃(u) = −F(u) and f = 0.

A point is (x, t), time last: the problem's ``dim`` (the network's input
size) is d + 1, while the factory's ``dim`` (``sdze solve NAME --dim D``) is
the spatial dimension d, as in the reference table.

There is no exact solution. The problems are scored at (x, t) = (0, 0)
against multilevel-Picard reference values (:data:`REFERENCE_VALUES`;
``reference()`` returns ``None`` for a d without one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from math import factorial, log, sqrt
from typing import Any

from array_api_compat import array_namespace, device

from . import jets
from .domains import Diffusion, HardConstraint
from .models import MLP
from .operator_terms import LinearCombination, SubsetLaplacian
from .oracles import FirstDerivative
from .problem_registry import _register_builtin

__all__ = [
    "smoothed_arctan_max",
    "mean_field_inverse_quadratic",
    "ParabolicEquation",
    "ParabolicProblem",
    "PARABOLIC",
    "REFERENCE_VALUES",
    "HORIZON",
    "make_parabolic",
    "arctan_max",
    "inverse_quadratic",
]

#: The terminal time T of STDE's experiments.
HORIZON = 0.3


# -- terminal conditions as jets of the space coordinates ----------------------------------


def _arctan_derivatives(m, order: int) -> list:
    """[arctan m, arctan' m, ...] up to ``order`` <= 4, with s = 1/(1 + m²)::

    arctan' = s, arctan'' = −2m s², arctan''' = (6m² − 2) s³, arctan'''' = 24m(1 − m²) s⁴.
    """
    if order > 4:
        raise ValueError(f"arctan(max x) has derivatives up to order 4 here, asked for {order}")
    xp = array_namespace(m)
    s = 1.0 / (1.0 + m * m)
    table = [xp.atan(m), s, -2.0 * m * s * s, (6.0 * m * m - 2.0) * s**3,
             24.0 * m * (1.0 - m * m) * s**4]
    return table[: order + 1]


def arctan_max(x_jet: jets.Jet) -> jets.Jet:
    """The jet of g(x) = arctan(max_i x_i) from the jet of x (primal (B, d)).

    max_i x_i equals the coordinate j*(x) that attains it, a linear function
    of x near every point without ties (all but a null set): its jet is the
    jet of x_{j*}, j* = argmax of the primal, taken with a one-hot mask (B, d).
    arctan follows by Faà di Bruno (:func:`~sdze_core.jets.compose`). The
    second derivatives are those of almost every point: the ridge where two
    coordinates tie, where max has a kink, is missed (it has measure zero).
    """
    x = x_jet.primal
    xp = array_namespace(x)
    columns = xp.arange(x.shape[-1], device=device(x))
    mask = xp.astype(xp.expand_dims(xp.argmax(x, axis=-1), axis=-1) == columns, x.dtype)
    m = jets.linear_map(x_jet, lambda y, is_primal: xp.sum(y * mask, axis=-1))
    return jets.compose(m, _arctan_derivatives(m.primal, m.order))


def inverse_quadratic(x_jet: jets.Jet) -> jets.Jet:
    """The jet of g(x) = 5 / (10 + 2‖x‖²) from the jet of x (primal (B, d)).

    g = p(ρ), ρ = ‖x‖², p(ρ) = 5/q with q = 10 + 2ρ, so
    p^(k)(ρ) = 5 (−2)^k k! / q^(k+1); the jet by Faà di Bruno on the jet of ρ.
    """
    return _inverse_quadratic_of(jets.squared_norm(x_jet))


def _inverse_quadratic_of(rho: jets.Jet) -> jets.Jet:
    """The jet of p(ρ) = 5/(10 + 2ρ) from the jet of ρ (Faà di Bruno)."""
    q = 10.0 + 2.0 * rho.primal
    derivs = [5.0 * (-2.0) ** k * factorial(k) / q ** (k + 1) for k in range(rho.order + 1)]
    return jets.compose(rho, derivs)


def _power_derivatives(x0, p: float, order: int) -> list:
    """[x^p, (x^p)', ..., (x^p)^(order)] = p (p − 1) ⋯ (p − n + 1) x^(p − n), x > 0."""
    table, falling = [x0**p], 1.0
    for n in range(1, order + 1):
        falling *= p - n + 1
        table.append(falling * x0 ** (p - n))
    return table


#: The smallest T − t the smoothed max is taken at: at t = T its width s is
#: 2 √(1e−8 / ln d) < 2e−4, so the lift is g to within s ln d < 1e−3.
_MIN_REMAINING = 1e-8


def smoothed_arctan_max(x_jet: jets.Jet, horizon: float) -> jets.Jet:
    """The Allen–Cahn lift: arctan of a log-sum-exp max whose width shrinks to 0 at t = T.

    For points (x, t), time last, with d >= 2 space coordinates::

        h(x, t) = arctan(s ln Σ_i exp(x_i / s)),   s(t) = 2 √((T − t) / ln d),

    so that s ln d, the smoothed max at x = 0, is √(2 ln d) σ with
    σ² = 2(T − t): the asymptotic mean of the max of d Gaussians of the
    diffusion's variance. max_i x_i <= s ln Σ exp(x_i/s) <= max_i x_i + s ln d,
    so h → g = arctan(max_i x_i) as t → T (T − t is floored at 1e−8: at
    t = T, |h − g| < 1e−3).

    Why not g itself: max has kinks where two coordinates tie, and its
    Laplacian there is a positive singular measure that pointwise
    derivatives never see (they give Δ max = 0 almost everywhere). A
    residual built on g + τN would then solve u_t + Δu + F(u) = (that
    measure), whose solution is far below the true one (at d = 10, u(0, 0)
    near 0 instead of 0.89). h is smooth for t < T, so its pointwise
    derivatives are its derivatives and the network learns u − h.

    The jet: s and 1/s from the jet of T − t (powers ±1/2 by Faà di Bruno),
    y = x/s by Leibniz, exp, the sum over i and log, with each point's
    max_i y_i subtracted as a constant (log Σ e^{y_i} = c + log Σ e^{y_i − c}
    for any constant c) so that nothing overflows.
    """
    x = x_jet.primal
    xp = array_namespace(x)
    dim = x.shape[-1] - 1
    scale = 2.0 / sqrt(log(max(dim, 2)))
    remaining = jets.linear_map(
        x_jet, lambda y, is_primal: horizon - y[..., -1] if is_primal else -y[..., -1]
    )
    tau = xp.clip(remaining.primal, _MIN_REMAINING, None)
    width = jets.scale(jets.compose(remaining, _power_derivatives(tau, 0.5, x_jet.order)), scale)
    inverse = jets.scale(
        jets.compose(remaining, _power_derivatives(tau, -0.5, x_jet.order)), 1.0 / scale
    )
    y = jets.mul(jets.linear_map(x_jet, _space), jets.linear_map(inverse, _column))
    top = xp.max(y.primal, axis=-1)
    shifted = jets.shift(y, -xp.expand_dims(top, axis=-1))
    total = jets.linear_map(jets.exp(shifted), lambda v, is_primal: xp.sum(v, axis=-1))
    smooth_max = jets.mul(width, jets.shift(jets.log(total), top))
    return jets.compose(smooth_max, _arctan_derivatives(smooth_max.primal, smooth_max.order))


def mean_field_inverse_quadratic(x_jet: jets.Jet, horizon: float) -> jets.Jet:
    """The lift of g = 5/(10 + 2‖x‖²): ‖x‖² replaced by its mean at T along the diffusion.

    For points (x, t), time last, with d space coordinates::

        h(x, t) = 5 / (10 + 2‖x‖² + 4d (T − t)),

    since E‖x + √2 W_{T−t}‖² = ‖x‖² + 2d(T − t). h = g at t = T and h is the
    linear (F = 0) solution to first order in the spread of ‖X_T‖², so the
    network learns a small remainder: at d = 1000, h(0, 0) = 4.1e−3 against
    u(0, 0) = 5.6e−3 for Sine–Gordon, where g(0) = 0.5 would leave the
    network to cancel 0.494 to within 5.6e−5 (the 1e−2 target).
    """
    dim = x_jet.primal.shape[-1] - 1
    rho = jets.squared_norm(jets.linear_map(x_jet, _space))
    def spread(y, is_primal):  # 2d (T − t), affine in t
        return 2.0 * dim * ((horizon - y[..., -1]) if is_primal else -y[..., -1])

    return _inverse_quadratic_of(jets.add(rho, jets.linear_map(x_jet, spread)))


def _column(y, is_primal):
    """y[..., None]: a per-point jet broadcast over the coordinates."""
    return array_namespace(y).expand_dims(y, axis=-1)


# -- the equations ------------------------------------------------------------------------


def _allen_cahn(u):
    return u - u * u * u


def _heat(u):
    square = u * u
    return (1.0 - square) / (1.0 + square)


def _sine_gordon(u):
    return array_namespace(u).sin(u)


@dataclass(frozen=True)
class ParabolicEquation:
    """u_t + Δ_x u + F(u) = 0 with u(x, T) = g(x), and its reference values u(0, 0).

    Attributes
    ----------
    name : str
        The registered name.
    nonlinearity : callable
        F(u), elementwise.
    terminal : callable
        The jet of g from the jet of the space coordinates x (primal (B, d)).
    formula : str
        F and g in words (for listings).
    references : dict
        u(0, 0) by spatial dimension d (multilevel Picard, STDE's table).
    lift : callable or None
        ``lift(x_jet, T)``: the jet of the hard constraint's lift h(x, t)
        from the jet of (x, t), smooth for t < T with h(·, T) = g: for a g
        that is not smooth (:func:`smoothed_arctan_max`) or one far from the
        solution before T (:func:`mean_field_inverse_quadratic`); ``None``: h = g.
    """

    name: str
    nonlinearity: Callable[[Any], Any] = field(repr=False)
    terminal: Callable[[jets.Jet], jets.Jet] = field(repr=False)
    formula: str
    references: dict = field(repr=False)
    lift: Callable[[jets.Jet, float], jets.Jet] | None = field(default=None, repr=False)


#: u(0, 0) at T = 0.3 (docs/problems.md#parabolic-problems; STDE's multilevel-Picard values).
REFERENCE_VALUES = {
    "allen-cahn-parabolic": {10: 0.89060, 100: 1.04510, 1000: 1.09100, 10_000: 1.11402},
    "semilinear-heat-parabolic": {10: 0.47006, 100: 0.31674, 1000: 0.28753, 10_000: 0.28433},
    "sine-gordon-parabolic": {
        10: 0.3229470, 100: 0.0528368, 1000: 0.0055896, 10_000: 0.0005621
    },
}

#: The built-in parabolic equations by name.
PARABOLIC = {
    eq.name: eq
    for eq in (
        ParabolicEquation("allen-cahn-parabolic", _allen_cahn, arctan_max,
                          "F = u − u³, g = arctan(max_i x_i)",
                          REFERENCE_VALUES["allen-cahn-parabolic"], smoothed_arctan_max),
        ParabolicEquation("semilinear-heat-parabolic", _heat, inverse_quadratic,
                          "F = (1 − u²)/(1 + u²), g = 5/(10 + 2‖x‖²)",
                          REFERENCE_VALUES["semilinear-heat-parabolic"],
                          mean_field_inverse_quadratic),
        ParabolicEquation("sine-gordon-parabolic", _sine_gordon, inverse_quadratic,
                          "F = sin u, g = 5/(10 + 2‖x‖²)",
                          REFERENCE_VALUES["sine-gordon-parabolic"],
                          mean_field_inverse_quadratic),
    )
}


# -- the problem ----------------------------------------------------------------------------


def _space(y, is_primal):
    """The space coordinates of (x, t): all but the last."""
    return y[..., :-1]


@dataclass(frozen=True, eq=False)
class ParabolicProblem:
    """A semilinear parabolic problem in d space dimensions (the module docstring).

    Has the members of :class:`~sdze_core.problem_protocol.PDEProblem` with
    ``reaction`` and ``reference``; no ``exact`` and no ``forcing`` (f = 0).

    Parameters
    ----------
    equation : ParabolicEquation
    space_dim : int
        d; a point is (x, t), ``dim`` = d + 1 coordinates.
    backend : Backend
        Where the points are drawn.
    horizon : float
        T (default 0.3, the reference values' T).
    """

    equation: ParabolicEquation
    space_dim: int
    backend: Any
    horizon: float = HORIZON

    @property
    def dim(self) -> int:
        """d + 1: the network's input (x, t)."""
        return self.space_dim + 1

    @property
    def domain(self) -> Diffusion:
        """[0, T] with diffusion points, the factor τ = (T − t)/T."""
        return Diffusion(t0=0.0, t1=self.horizon, condition="terminal")

    def sample_domain(self, key, num_points: int, backend=None):
        """(x, t) with t ~ U[0, T), x ~ N(0, 2t I_d): shape (num_points, d + 1)."""
        return self.domain.sample(backend or self.backend, key, num_points, self.space_dim)

    def terminal(self, x):
        """g(x) at points (x, t) of shape (B, d + 1) (t is ignored): shape (B,)."""
        return self.equation.terminal(jets.linear_map(jets.Jet(x, ()), _space)).primal

    def lift_jet(self, x_jet: jets.Jet) -> jets.Jet:
        """The jet of the lift h(x, t) from the jet of (x, t): g(x), or the equation's
        smooth lift (:attr:`ParabolicEquation.lift`) when g has kinks."""
        if self.equation.lift is not None:
            return self.equation.lift(x_jet, self.horizon)
        return self.equation.terminal(jets.linear_map(x_jet, _space))

    def model(self, width: int = 128, depth: int = 4, activation: str = "tanh") -> HardConstraint:
        """u = h(x, t) + (T − t)/T · N(x, t), N an MLP of ``depth`` hidden layers of ``width``.

        h(·, T) = g: the equation's lift (:meth:`lift_jet`).
        """
        network = MLP((self.dim,) + (width,) * depth + (1,), activation)
        return HardConstraint(self.domain, network, self.lift_jet)

    def oracle(self, num_directions: int = 16) -> LinearCombination:
        """u_t + Δ_x u: u_t exactly, Δ_x u from min(V, d) sampled space coordinates."""
        laplacian = SubsetLaplacian(range(self.space_dim), min(num_directions, self.space_dim))
        return LinearCombination(((1.0, FirstDerivative(-1)), (1.0, laplacian)))

    def reaction(self, u, x):
        """−F(u): the residual r = u_t + Δu − (−F(u)) vanishes on the solution."""
        return -self.equation.nonlinearity(u)

    def reference(self):
        """((0, 0) as points of shape (1, d + 1), u(0, 0) of shape (1,)), or ``None``.

        ``None`` when no reference value is known for this d or when T is
        not the reference's T = 0.3.
        """
        value = self.equation.references.get(self.space_dim)
        if value is None or self.horizon != HORIZON:
            return None
        b = self.backend
        return b.zeros((1, self.dim)), b.asarray([value], dtype=b.dtype)


def make_parabolic(name: str, dim: int, seed=0, backend=None, horizon: float = HORIZON):
    """The parabolic problem ``name`` in ``dim`` = d space dimensions.

    The factory of the built-ins ``allen-cahn-parabolic``,
    ``semilinear-heat-parabolic`` and ``sine-gordon-parabolic`` (registered
    as ``partial(make_parabolic, name)``). Nothing is random: ``seed`` is
    accepted for the factory's signature and not used.

    Raises
    ------
    ValueError
        For an unknown name, a dimension that is not an int >= 1, or a
        horizon that is not positive.
    """
    from .registry import get_backend

    if name not in PARABOLIC:
        raise ValueError(f"unknown parabolic problem {name!r}; known: {', '.join(PARABOLIC)}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"{name} needs an integer space dimension >= 1, got {dim!r}")
    if not float(horizon) > 0:
        raise ValueError(f"{name} needs a horizon T > 0, got {horizon!r}")
    return ParabolicProblem(PARABOLIC[name], dim, backend or get_backend(), float(horizon))


for _name in PARABOLIC:
    _register_builtin(_name, partial(make_parabolic, _name))
