"""Benchmark PDEs with exact solutions and closed-form forcing (STDE's suite,
docs/method.md#benchmark-problems).

Every problem has an exact solution u* = g(x) s(x): a boundary factor g that
vanishes on the domain's boundary (κ φ, φ the domain's factor, docs/domains.md)
times a sum of few-variable terms

* two-body:   s(x) = Σ_{i=1}^{d−1} c_i sin(x_i + cos(x_{i+1}) + x_{i+1} cos(x_i)),
* three-body: s(x) = Σ_{i=1}^{d−2} c_i exp(x_i x_{i+1} x_{i+2}),

with c_i ~ N(0, 1) drawn from the problem's key (portable draws: the same
seed gives the same problem on every backend). The forcing f is built from
u* so that u* solves the equation. It is evaluated in closed form, O(d) per
point, from the derivatives of s, which are sums over the terms of
derivatives of one few-variable function: the sums over terms of

    s,  x·∇s,  Δs,  xᵀ(∇²s)x,  x·∇Δs,  Δ²s.

What depends on the domain, φ and its derivatives in L(φ s), is the
domain's closed form (:meth:`~sdze_core.domains.Domain.factor_product`): for
the ball's φ = 1 − ρ, ρ = ‖x‖², Δu* = −2d s − 4 x·∇s + (1 − ρ) Δs. A problem
on a domain without the closed form its operator needs is refused when it is
built (:class:`~sdze_core.domains.MissingClosedFormError`): it never trains
against another domain's forcing.

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

The built-in problems live on the unit ball (g = 1 − ‖x‖²) or the annulus
1 ≤ ‖x‖ ≤ 2 (g = (1 − ‖x‖²)(4 − ‖x‖²) = −(9/4) φ); ``make_problem(name, d,
domain=...)`` puts the same equation and solution on another domain, with
u* = φ s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

from array_api_compat import array_namespace

from . import jets
from .domains import Annulus, Ball, Domain, HardConstraint, MissingClosedFormError, _scale_rows
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

#: Columns per block when summing the terms of s and its derivatives. Small enough
#: for a block's temporaries to stay in cache: with B = 100, 512 columns ran the
#: two-body sums 1.6 times and the three-body sums 1.3 times as fast as 4096 at
#: d = 10⁶ (``benchmarks/bench_forcing.py``, forcing_d1000000.json).
DEFAULT_CHUNK = 1 << 9


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
        """With w = a + cos b + b cos a: s = sin w, x·∇φ = cos w (a w_a + b w_b) and
        Δφ = cos w Δw − sin w (w_a² + w_b²), where w_a = 1 − b sin a,
        w_b = cos a − sin b and Δw = −b cos a − cos b = a − w."""
        if order != 2:
            raise ValueError("the two-body solution has closed-form sums up to order 2")
        xp = array_namespace(block)
        cos_x, sin_x = xp.cos(block), xp.sin(block)
        # Contiguous copies of the shifted columns that are read more than once:
        # elementwise operations on the strided views cost ~2.5 times as much.
        a = xp.asarray(block[:, :-1], copy=True)
        b = xp.asarray(block[:, 1:], copy=True)
        cos_a = xp.asarray(cos_x[:, :-1], copy=True)
        w = b * cos_a
        w += cos_x[:, 1:]
        w += a
        sin_w, cos_w = xp.sin(w), xp.cos(w)
        lap = a - w
        lap *= cos_w
        minus_w_a = b * sin_x[:, :-1]
        minus_w_a -= 1
        w_b = cos_a - sin_x[:, 1:]
        x_grad = b * w_b
        x_grad -= a * minus_w_a
        x_grad *= cos_w
        minus_w_a *= minus_w_a
        w_b *= w_b
        minus_w_a += w_b
        minus_w_a *= sin_w
        lap -= minus_w_a
        return {"s": sin_w, "x_grad": x_grad, "lap": lap}

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


#: The operator L of an equation of each order (the keys of
#: :data:`~sdze_core.domains.PRODUCT_OPERATORS`).
OPERATORS = {2: "laplacian", 4: "biharmonic"}


@dataclass(frozen=True)
class Equation:
    """L u + N(u) = f, with L = Δ^(order/2); :attr:`nonlinearity` is N."""

    name: str
    order: int
    boundary: str
    nonlinearity: str | None  # "allen-cahn" (u − u³), "sine-gordon" (sin u) or None

    @property
    def operator(self) -> str:
        """L by name: ``"laplacian"`` (order 2) or ``"biharmonic"`` (order 4)."""
        return OPERATORS[self.order]

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
    return _scale_rows(backend, g, r / xp.sqrt(jets.rowwise_squared_norm(g)))


def sample_annulus(backend, key: Key, num_points: int, dim: int):
    """Uniform points in 1 ≤ ‖x‖ ≤ 2: :meth:`sdze_core.domains.Annulus.sample` (docs/domains.md)."""
    return Annulus(1.0, 2.0).sample(backend, key, num_points, dim)


#: Point distributions: uniform in volume, or uniform in radius (STDE's; ball only).
SAMPLINGS = ("volume", "radius")

#: The built-in problems' domains (by :attr:`Equation.boundary`) and the scale κ of their
#: exact solutions' factor g = κ φ: the ball's 1 − ‖x‖² is φ, the annulus' (1 − ‖x‖²)(4 − ‖x‖²)
#: is −(9/4) φ.
BENCHMARK_DOMAINS: dict[str, tuple[Domain, float]] = {
    "ball": (Ball(), 1.0),
    "annulus": (Annulus(1.0, 2.0), -2.25),
}


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
        with a uniform radius (STDE's; a ball only).
    domain : Domain, optional
        Where the equation is posed, u* = φ s with φ the domain's factor.
        Default: the built-in's (:data:`BENCHMARK_DOMAINS`, u* = κ φ s).

    Raises
    ------
    MissingClosedFormError
        If the domain has no closed form for L(φ s), L the equation's operator
        (:meth:`~sdze_core.domains.Domain.factor_product`): the forcing would
        be another domain's.
    """

    name: str
    dim: int
    coefficients: Any
    backend: Any
    chunk: int = DEFAULT_CHUNK
    sampling: str = "volume"
    domain: Domain | None = None
    equation: Equation = field(init=False)
    solution: TermSum = field(init=False)
    factor_scale: float = field(init=False)

    def __post_init__(self):
        eq, sol = PROBLEMS[self.name]
        object.__setattr__(self, "equation", EQUATIONS[eq])
        object.__setattr__(self, "solution", SOLUTIONS[sol]())
        given = self.domain is not None
        domain, scale = (self.domain, 1.0) if given else BENCHMARK_DOMAINS[self.equation.boundary]
        object.__setattr__(self, "domain", self._offered(domain))
        object.__setattr__(self, "factor_scale", scale)
        offered = ["volume", "radius"] if isinstance(domain, Ball) else ["volume"]
        if self.sampling not in offered:
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

    def _offered(self, domain):
        """``domain`` if it has the closed form L(φ s) of the equation's operator, else raise."""
        if not isinstance(domain, Domain):
            raise TypeError(f"domain must be a Domain, got {type(domain).__name__}")
        operator = self.equation.operator
        if operator not in domain.product_operators:
            offered = ", ".join(domain.product_operators) or "none"
            raise MissingClosedFormError(
                f"{self.name} on {domain!r}: the forcing needs the {operator} of φ s in closed "
                f"form, which {domain.name} does not offer (it offers: {offered}); see "
                "sdze_core.domains.product_closed_forms() for the domains that do"
            )
        return domain

    # -- geometry
    @property
    def boundary(self) -> str:
        """The domain's name (:data:`~sdze_core.domains.DOMAINS`): ``"ball"``, ``"annulus"``, ..."""
        return self.domain.name

    def sample_domain(self, key: Key, num_points: int, backend=None):
        """``num_points`` uniform points of the domain, shape (num_points, d).

        ``backend`` overrides the problem's (e.g. its portable-draw variant).
        """
        backend = backend or self.backend
        if self.sampling == "volume":
            return self.domain.sample(backend, key, num_points, self.dim)
        x = sample_ball_radial(backend, key, num_points, self.dim)
        if self.domain.radius != 1.0:
            x *= self.domain.radius
        return x

    @property
    def _builtin_ansatz(self) -> bool:
        """Whether g is a built-in :class:`Ansatz`'s factor (its name as the ansatz' boundary)."""
        return BENCHMARK_DOMAINS.get(self.boundary) == (self.domain, self.factor_scale)

    # -- the exact solution and forcing
    def exact(self, x):
        """u*(x) = κ φ(x) s(x), shape (B,)."""
        x = self._check(x)
        s = term_sums(self.solution, x, self.coefficients, 2, self.chunk)["s"]
        return self._scaled(self.domain.factor(x)) * s

    def _scaled(self, value):
        return value if self.factor_scale == 1.0 else self.factor_scale * value

    def operator_exact(self, x):
        """(L u*)(x) = Δu* or Δ²u*, in closed form, shape (B,)."""
        return self._operator_and_solution(x)[0]

    def _operator_and_solution(self, x):
        """((L u*)(x), u*(x)) from one pass of block sums and the domain's closed form."""
        x = self._check(x)
        sums = term_sums(self.solution, x, self.coefficients, self.equation.order, self.chunk)
        u_star, operator = self.domain.factor_product(self.equation.operator, x, sums)
        return self._scaled(operator), self._scaled(u_star)

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
    ) -> Ansatz | HardConstraint:
        """The ansatz g(x) N(x) with N an MLP of ``depth`` hidden layers of ``width``.

        An :class:`Ansatz` on the built-in domains, else a
        :class:`~sdze_core.domains.HardConstraint` with the domain's factor φ.
        """
        network = MLP((self.dim,) + (width,) * depth + (1,), activation, init_scheme)
        if self._builtin_ansatz:
            return Ansatz(network, self.boundary)
        return HardConstraint(self.domain, network)

    def oracle(self, num_directions: int = 16):
        """STDE's sparse estimator of L: V sampled coordinates (Δ) or pairs (Δ²)."""
        if self.equation.order == 2:
            return SparseLaplacian(num_directions=min(num_directions, self.dim))
        return SparseBiharmonic(num_pairs=min(num_directions, self.dim * (self.dim - 1) // 2))

    def exact_jet(self, x: jets.Jet) -> jets.Jet:
        """The jet of u* from the jet of x (Taylor mode, no closed form: the tests' reference)."""
        s = self.solution.jet(x, self.coefficients)
        g = self.domain.boundary_factor(x)
        return jets.mul(jets.scale(g, self.factor_scale) if self.factor_scale != 1.0 else g, s)


def make_benchmark(
    name: str,
    dim: int,
    seed: int | Key = 0,
    backend=None,
    chunk=DEFAULT_CHUNK,
    sampling="volume",
    domain: Domain | None = None,
):
    """The benchmark problem ``name`` in dimension ``dim``, coefficients from ``seed``.

    The factory of every built-in (registered as ``partial(make_benchmark, name)``;
    use :func:`make_problem`). c ~ N(0, I) is drawn with portable draws from
    ``fold_in(key(seed), "coefficients")``, so a seed names the same problem
    on every backend. ``domain`` poses the equation on another domain, with
    u* = φ s (:class:`Problem`).

    Raises
    ------
    ValueError
        For an unknown name (the message lists :data:`PROBLEMS`) or a
        dimension too small for the solution's terms.
    MissingClosedFormError
        For a ``domain`` without the closed form of L(φ s) for the equation's
        operator (the message names both and what the domain offers).
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
    return Problem(name, dim, c, backend, chunk, sampling, domain)


for _name in PROBLEMS:
    _register_builtin(_name, partial(make_benchmark, _name))


def default_test_points(dim: int) -> int:
    """STDE's 20 000 test points, fewer in high dimension: min(20 000, max(100, 2·10^7 / d))."""
    return int(min(20_000, max(100, 2e7 // dim)))

