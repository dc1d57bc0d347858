"""Benchmark PDEs with exact solutions and closed-form forcing (STDE's suite,
docs/method.md#benchmark-problems).

Every problem has an exact solution u* = g(x) s(x): a boundary factor g that
vanishes on the domain's boundary times a sum of few-variable terms

* two-body:   s(x) = Σ_{i=1}^{d−1} c_i sin(x_i + cos(x_{i+1}) + x_{i+1} cos(x_i)),
* three-body: s(x) = Σ_{i=1}^{d−2} c_i exp(x_i x_{i+1} x_{i+2}),

with c_i ~ N(0, 1) drawn from the problem's key (portable draws: the same
seed gives the same problem on every backend). The forcing f is built from
u* so that u* solves the equation. It is evaluated in closed form, O(d) per
point, from the derivatives of s, which are sums over the terms of
derivatives of one few-variable function. With ρ = ‖x‖² and the sums over
terms

    s,  x·∇s,  Δs,  xᵀ(∇²s)x,  x·∇Δs,  Δ²s,

the ball's g = 1 − ρ gives (∇g = −2x, Δg = −2d)::

    Δu* = −2d s − 4 x·∇s + (1 − ρ) Δs,

and the annulus' h = (1 − ρ)(4 − ρ) (∇h = (4ρ − 10)x,
∇²h = (4ρ − 10)I + 8xxᵀ, Δh = (4d + 8)ρ − 10d, Δ²h = 8d(d + 2)), from
Δ²(hs) = Δ²h s + 4∇Δh·∇s + 2ΔhΔs + 4∇²h : ∇²s + 4∇h·∇Δs + hΔ²s::

    Δ²u* = 8d(d+2) s + 4(8d + 16) x·∇s + (2Δh + 4(4ρ − 10)) Δs
           + 32 xᵀ(∇²s)x + 4(4ρ − 10) x·∇Δs + h Δ²s.

The sums are accumulated over column blocks of x (``chunk`` columns at a
time, overlapping by the terms' reach), so the temporaries are
(B × chunk), never (B × d) several times over: at d = 10^7 a batch of 100
points is 4 GB, and the forcing must not multiply it.

Equations (L u = Δu or Δ²u; residual r = L u − F(u) − f):

| name | equation | F(u) |
| --- | --- | --- |
| poisson | Δu = f | 0 |
| allen-cahn | Δu + u − u³ = f | u³ − u |
| sine-gordon | Δu + sin u = f | −sin u |
| biharmonic | Δ²u = f (annulus 1 ≤ ‖x‖ ≤ 2) | 0 |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from array_api_compat import array_namespace

from . import jets
from .domains import Annulus, Ball
from .keys import Key, as_key, fold_in
from .models import MLP, Ansatz, conform_to
from .oracles import SparseBiharmonic, SparseLaplacian
from .problem_registry import _register_builtin, make_problem

__all__ = [
    "TwoBody",
    "ThreeBody",
    "EQUATIONS",
    "PROBLEMS",
    "Problem",
    "make_problem",
    "make_benchmark",
    "sample_ball",
    "sample_annulus",
]

#: Columns per block when summing the terms of s and its derivatives.
DEFAULT_CHUNK = 1 << 12


# -- the exact solutions' sums s(x) ------------------------------------------------------


class TermSum(ABC):
    """s(x) = Σ_i c_i φ(x_i, ..., x_{i+arity−1}) and its derivative sums, block by block."""

    arity: ClassVar[int]
    name: ClassVar[str]

    @classmethod
    def num_terms(cls, dim: int) -> int:
        return dim - cls.arity + 1

    @staticmethod
    @abstractmethod
    def local(block, order: int) -> dict:
        """Per-term quantities (each of shape (B, n)) for a block of columns.

        ``block`` holds the columns [i0, i1 + arity − 1) of x; term i of the
        block reads its columns i, ..., i + arity − 1 (so elementwise
        functions of x are computed once per column, then sliced).

        ``order`` 2 gives {"s", "x_grad", "lap"}: φ, Σ_j x_j ∂_jφ, Σ_j ∂_jjφ over
        the term's variables; order 4 adds {"x_hess_x", "x_grad_lap", "bilap"}:
        Σ_jk x_j x_k ∂_jkφ, Σ_j x_j ∂_j Δφ and Δ²φ.
        """

    @abstractmethod
    def jet(self, x: jets.Jet, c) -> jets.Jet:
        """The jet of s along a curve, from the jet of x (for tests: no closed form)."""


class TwoBody(TermSum):
    """φ(a, b) = sin(a + cos b + b cos a) (docs/method.md#benchmark-problems)."""

    arity: ClassVar[int] = 2
    name: ClassVar[str] = "two-body"

    @staticmethod
    def local(block, order):
        if order != 2:
            raise ValueError("the two-body solution has closed-form sums up to order 2")
        xp = array_namespace(block)
        a, b = block[:, :-1], block[:, 1:]
        cos_x, sin_x = xp.cos(block), xp.sin(block)
        cos_a, sin_a, cos_b, sin_b = cos_x[:, :-1], sin_x[:, :-1], cos_x[:, 1:], sin_x[:, 1:]
        w = a + cos_b + b * cos_a
        w_a, w_b = 1 - b * sin_a, cos_a - sin_b
        w_aa, w_bb = -b * cos_a, -cos_b
        sin_w, cos_w = xp.sin(w), xp.cos(w)
        return {
            "s": sin_w,
            "x_grad": cos_w * (a * w_a + b * w_b),
            "lap": cos_w * (w_aa + w_bb) - sin_w * (w_a * w_a + w_b * w_b),
        }

    def jet(self, x, c):
        a = jets.linear_map(x, lambda y, p: y[..., :-1])
        b = jets.linear_map(x, lambda y, p: y[..., 1:])
        w = jets.add(jets.add(a, jets.cos(b)), jets.mul(b, jets.cos(a)))
        return jets.linear_map(jets.sin(w), lambda y, p: y @ c)


class ThreeBody(TermSum):
    """φ(a, b, c) = exp(abc) (docs/method.md#benchmark-problems).

    With p = abc, n = a² + b² + c², Q = b²c² + a²c² + a²b² (and x·∇p = 3p,
    x·∇Q = 4Q, ΔQ = 4n, ∇Q·∇p = 4pn): x·∇φ = 3pφ, Δφ = Qφ,
    xᵀ∇²φ x = (9p² + 6p)φ, x·∇Δφ = (4 + 3p)Qφ, Δ²φ = (4n(1 + 2p) + Q²)φ.
    """

    arity: ClassVar[int] = 3
    name: ClassVar[str] = "three-body"

    @staticmethod
    def local(block, order):
        xp = array_namespace(block)
        a, b, c = block[:, :-2], block[:, 1:-1], block[:, 2:]
        p = a * b * c
        e = xp.exp(p)
        aa, bb, cc = a * a, b * b, c * c
        Q = bb * cc + aa * cc + aa * bb
        out = {"s": e, "x_grad": 3 * p * e, "lap": Q * e}
        if order >= 4:
            out["x_hess_x"] = (9 * p * p + 6 * p) * e
            out["x_grad_lap"] = (4 + 3 * p) * Q * e
            out["bilap"] = (4 * (aa + bb + cc) * (1 + 2 * p) + Q * Q) * e
        return out

    def jet(self, x, c):
        a = jets.linear_map(x, lambda y, p: y[..., :-2])
        b = jets.linear_map(x, lambda y, p: y[..., 1:-1])
        cc = jets.linear_map(x, lambda y, p: y[..., 2:])
        return jets.linear_map(jets.exp(jets.mul(jets.mul(a, b), cc)), lambda y, p: y @ c)


SOLUTIONS = {cls.name: cls for cls in (TwoBody, ThreeBody)}


def term_sums(solution: TermSum, x, c, order: int, chunk: int = DEFAULT_CHUNK) -> dict:
    """Σ_i c_i (per-term quantities of :meth:`TermSum.local`), shape (B,) each.

    The terms are taken ``chunk`` at a time: the block of terms [i0, i1) reads
    the columns [i0, i1 + arity − 1) of x.
    """
    n = solution.num_terms(x.shape[-1])
    k = solution.arity
    totals: dict[str, Any] = {}
    for i0 in range(0, n, chunk):
        i1 = min(i0 + chunk, n)
        weights = c[i0:i1]
        for name, value in solution.local(x[:, i0 : i1 + k - 1], order).items():
            # (B, n) @ (n,): a matrix-vector product, no (B, n) product temporary.
            term = value @ weights
            totals[name] = term if name not in totals else totals[name] + term
    return totals


# -- equations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Equation:
    """L u + N(u) = f, with L = Δ^(order/2); :attr:`nonlinearity` is N."""

    name: str
    order: int
    boundary: str
    nonlinearity: str | None  # "allen-cahn" (u − u³), "sine-gordon" (sin u) or None

    def nonlinear_term(self, u):
        """N(u): u − u³ (Allen–Cahn), sin u (Sine–Gordon) or 0."""
        if self.nonlinearity is None:
            return 0.0
        if self.nonlinearity == "allen-cahn":
            return u - u * u * u
        return array_namespace(u).sin(u)


EQUATIONS = {
    "poisson": Equation("poisson", 2, "ball", None),
    "allen-cahn": Equation("allen-cahn", 2, "ball", "allen-cahn"),
    "sine-gordon": Equation("sine-gordon", 2, "ball", "sine-gordon"),
    "biharmonic": Equation("biharmonic", 4, "annulus", None),
}

#: Problem names: equation and exact solution (the biharmonic on the annulus).
PROBLEMS = {
    f"{eq}-{sol}": (eq, sol)
    for eq in ("poisson", "allen-cahn", "sine-gordon")
    for sol in ("two-body", "three-body")
} | {"biharmonic-three-body": ("biharmonic", "three-body")}


# -- domains --------------------------------------------------------------------------------


def _scale_rows(g, factor):
    """g * factor[:, None], in place where the arrays are mutable (g may be 4 GB)."""
    g *= factor[:, None]
    return g


def sample_ball(backend, key: Key, num_points: int, dim: int):
    """Uniform points in the unit ball: :meth:`sdze_core.domains.Ball.sample` (docs/domains.md)."""
    return Ball().sample(backend, key, num_points, dim)


def sample_ball_radial(backend, key: Key, num_points: int, dim: int):
    """Points of the unit ball with a uniform radius: x = r ξ / ‖ξ‖, ξ ~ N(0, I), r ~ U[0, 1).

    STDE's sampling (training and test points alike). Not uniform in volume:
    the density ∝ ‖x‖^{1−d} puts as many points at every radius, where
    uniform-in-volume points in high d all lie near the sphere.
    """
    xp = backend.xp
    g = backend.normal(fold_in(key, "direction"), (num_points, dim))
    r = backend.uniform(fold_in(key, "radius"), (num_points,))
    return _scale_rows(g, r / xp.sqrt(jets.rowwise_squared_norm(g)))


def sample_annulus(backend, key: Key, num_points: int, dim: int):
    """Uniform points in 1 ≤ ‖x‖ ≤ 2: :meth:`sdze_core.domains.Annulus.sample` (docs/domains.md)."""
    return Annulus(1.0, 2.0).sample(backend, key, num_points, dim)


_SAMPLERS = {
    ("ball", "volume"): sample_ball,
    ("ball", "radius"): sample_ball_radial,
    ("annulus", "volume"): sample_annulus,
}
#: Point distributions: uniform in volume, or uniform in radius (STDE's; ball only).
SAMPLINGS = ("volume", "radius")


# -- the problem ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Problem:
    """A benchmark PDE in dimension d with its exact solution (docs/method.md#benchmark-problems).

    Build one with :func:`make_problem`. It has every member of
    :class:`~sdze_core.problem_protocol.PDEProblem`, the optional ones
    included. The coefficients c live on the problem's backend
    (``c.shape == (d − arity + 1,)``).

    Parameters
    ----------
    name : str
        A key of :data:`PROBLEMS`, e.g. ``"allen-cahn-two-body"``.
    dim : int
        d.
    coefficients : array
        c_i of the exact solution.
    backend : Backend
        Where points and forcing are computed.
    chunk : int
        Columns per block for the closed-form sums.
    sampling : {"volume", "radius"}
        Training and test points uniform in the domain's volume (default), or
        with a uniform radius (STDE's; the ball only).
    """

    name: str
    dim: int
    coefficients: Any
    backend: Any
    chunk: int = DEFAULT_CHUNK
    sampling: str = "volume"
    equation: Equation = field(init=False)
    solution: TermSum = field(init=False)

    def __post_init__(self):
        eq, sol = PROBLEMS[self.name]
        object.__setattr__(self, "equation", EQUATIONS[eq])
        object.__setattr__(self, "solution", SOLUTIONS[sol]())
        if (self.boundary, self.sampling) not in _SAMPLERS:
            offered = [m for (b, m) in _SAMPLERS if b == self.boundary]
            raise ValueError(
                f"sampling {self.sampling!r} is not offered on the {self.boundary} "
                f"({self.name}); choose one of {', '.join(offered)}"
            )
        expected = self.solution.num_terms(self.dim)
        if tuple(self.coefficients.shape) != (expected,):
            raise ValueError(
                f"{self.name} in d = {self.dim} needs {expected} coefficients, "
                f"got shape {tuple(self.coefficients.shape)}"
            )

    # -- geometry
    @property
    def boundary(self) -> str:
        """The domain: ``"ball"`` (unit ball) or ``"annulus"`` (1 ≤ ‖x‖ ≤ 2)."""
        return self.equation.boundary

    def sample_domain(self, key: Key, num_points: int, backend=None):
        """``num_points`` uniform points of the domain, shape (num_points, d).

        ``backend`` overrides the problem's (e.g. its portable-draw variant).
        """
        sampler = _SAMPLERS[self.boundary, self.sampling]
        return sampler(backend or self.backend, key, num_points, self.dim)

    def _g(self, norm2):
        g = 1 - norm2
        return g * (4 - norm2) if self.boundary == "annulus" else g

    # -- the exact solution and forcing
    def exact(self, x):
        """u*(x), shape (B,)."""
        x = self._check(x)
        s = term_sums(self.solution, x, self.coefficients, 2, self.chunk)["s"]
        return self._g(jets.rowwise_squared_norm(x)) * s

    def operator_exact(self, x):
        """(L u*)(x) = Δu* or Δ²u*, in closed form, shape (B,)."""
        return self._operator_and_solution(x)[0]

    def _operator_and_solution(self, x):
        """((L u*)(x), u*(x)) from one pass of block sums."""
        x = self._check(x)
        d = self.dim
        sums = term_sums(self.solution, x, self.coefficients, self.equation.order, self.chunk)
        rho = jets.rowwise_squared_norm(x)
        s, xg, lap = sums["s"], sums["x_grad"], sums["lap"]
        u_star = self._g(rho) * s
        if self.equation.order == 2:
            return -2 * d * s - 4 * xg + (1 - rho) * lap, u_star
        lap_h = (4 * d + 8) * rho - 10 * d
        radial = 4 * rho - 10
        return (
            8 * d * (d + 2) * s
            + 4 * (8 * d + 16) * xg
            + (2 * lap_h + 4 * radial) * lap
            + 32 * sums["x_hess_x"]
            + 4 * radial * sums["x_grad_lap"]
            + self._g(rho) * sums["bilap"]
        ), u_star

    def forcing(self, x):
        """f(x) = (L u*)(x) + N(u*(x)), shape (B,)."""
        f, u_star = self._operator_and_solution(x)
        if self.equation.nonlinearity is None:
            return f
        return f + self.equation.nonlinear_term(u_star)

    def reaction(self, u, x):
        """F(u) = −N(u) in r = L u − F(u) − f (:class:`ResidualLoss`'s ``rhs``)."""
        return -self.equation.nonlinear_term(u)

    def _check(self, x):
        """x of shape (B, d), conformed to the coefficients (:func:`~sdze_core.models.conform`)."""
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"{self.name}: x must have shape (B, {self.dim}), got {x.shape}")
        return conform_to(self.coefficients, x, owner="problem")[0]

    # -- what the solver builds on top
    def model(
        self, width: int = 128, depth: int = 4, activation: str = "tanh", init_scheme="glorot"
    ) -> Ansatz:
        """The ansatz g(x) N(x) with N an MLP of ``depth`` hidden layers of ``width``."""
        sizes = (self.dim,) + (width,) * depth + (1,)
        return Ansatz(MLP(sizes, activation, init_scheme), self.boundary)

    def oracle(self, num_directions: int = 16):
        """STDE's sparse estimator of L: V sampled coordinates (Δ) or pairs (Δ²)."""
        if self.equation.order == 2:
            return SparseLaplacian(num_directions=min(num_directions, self.dim))
        return SparseBiharmonic(num_pairs=min(num_directions, self.dim * (self.dim - 1) // 2))

    def exact_jet(self, x: jets.Jet) -> jets.Jet:
        """The jet of u* from the jet of x (Taylor mode, no closed form: the tests' reference)."""
        s = self.solution.jet(x, self.coefficients)
        norm2 = jets.squared_norm(x)
        g = jets.shift(jets.scale(norm2, -1.0), 1.0)
        if self.boundary == "annulus":
            g = jets.mul(g, jets.shift(jets.scale(norm2, -1.0), 4.0))
        return jets.mul(g, s)


def make_benchmark(
    name: str, dim: int, seed: int | Key = 0, backend=None, chunk=DEFAULT_CHUNK, sampling="volume"
):
    """The benchmark problem ``name`` in dimension ``dim``, coefficients from ``seed``.

    The factory of every built-in (registered as ``partial(make_benchmark, name)``;
    use :func:`make_problem`). c ~ N(0, I) is drawn with portable draws from
    ``fold_in(key(seed), "coefficients")``, so a seed names the same problem
    on every backend.

    Raises
    ------
    ValueError
        For an unknown name (the message lists :data:`PROBLEMS`) or a
        dimension too small for the solution's terms.
    """
    from .registry import get_backend

    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; known: {', '.join(PROBLEMS)}")
    solution = SOLUTIONS[PROBLEMS[name][1]]
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < solution.arity:
        raise ValueError(f"{name} needs an integer dimension >= {solution.arity}, got {dim!r}")
    backend = backend or get_backend()
    portable = backend.with_config(rng="portable")
    c = portable.normal(fold_in(as_key(seed), "coefficients"), (solution.num_terms(dim),))
    return Problem(name, dim, c, backend, chunk, sampling)


for _name in PROBLEMS:
    _register_builtin(_name, partial(make_benchmark, _name))


def default_test_points(dim: int) -> int:
    """STDE's 20 000 test points, fewer in high dimension: min(20 000, max(100, 2·10^7 / d))."""
    return int(min(20_000, max(100, 2e7 // dim)))

