"""Generalisation suite: five PDEs unlike the built-in benchmark problems.

Written as a user would write their own problem, with sdze's public pieces
(MLP, Ansatz, oracles, ResidualLoss, jets), so that defaults are chosen on
problems the library was not built around:

| name | equation | domain, condition | exact solution |
| --- | --- | --- | --- |
| poisson-sine | Δu = f | ball, u = 0 (ansatz) | (1 − ρ) sin(w·x) |
| anisotropic | tr(diag(a) ∇²u) = f | ball, u = 0 (ansatz) | (1 − ρ) cos(w·x) |
| heat | u_t − Δ_x u = f | space-time ball in R^{d+1} | (1 − ρ − t²) sin(w·x + t) |
| soft-boundary | Δu = f | ball, u = u* on the sphere by a loss term | 1 + sin(w·x) |
| lifted-sine-gordon | Δu + sin u = f | ball, u = h on the sphere (lift) |
  exp(v·x) + (1 − ρ) cos(w·x) |

ρ = ‖x‖², w = z / 2 with z ~ N(0, I_d) (so w·x ~ N(0, 1/4) for points of the
ball in high d: all coordinates matter, non-radial), v = z' / (2√d),
a_i ∈ {0.25, 1, 1.75} cycling (a 7× anisotropy). Every forcing is in closed
form, O(d) per point, and tested against autodiff (tests/test_generalisation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from typing import Any, ClassVar

from array_api_compat import array_namespace

from sdze_core import jets
from sdze_core.keys import Key, fold_in, key
from sdze_core.models import MLP, Ansatz
from sdze_core.objectives import ResidualLoss, SpatialSample
from sdze_core.oracles import OperatorEstimate, Oracle, SparseLaplacian
from sdze_core.problems import sample_ball
from sdze_core.registry import backend_of

NAMES = ("poisson-sine", "anisotropic", "heat", "soft-boundary", "lifted-sine-gordon")


def _coefficient_sum(jet, k: int):
    """Σ_v f_k[v] of an uncollapsed jet, shape (..., B)."""
    xp = array_namespace(jet.primal)
    return xp.sum(jet.coeffs[k - 1], axis=0)


@dataclass(frozen=True)
class DiagonalTrace(Oracle):
    """tr(diag(a) ∇²u) ≈ (d / V) Σ_v a_{j_v} ∂²u/∂x_{j_v}², V coordinates without replacement."""

    weights: Any
    num_directions: int = 16
    order: ClassVar[int] = 2

    def sample(self, key, x):
        return backend_of(x).choice(key, x.shape[1], self.num_directions)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        xp = array_namespace(x)
        jet = model.jet(params, x, sample, 2)
        a = xp.take(self.weights, sample)
        a = xp.reshape(a, (a.shape[0],) + (1,) * (jet.coeffs[1].ndim - 1))
        value = (x.shape[1] / sample.shape[0]) * xp.sum(a * jet.coeffs[1], axis=0)
        return OperatorEstimate(jet.primal, value)


@dataclass(frozen=True)
class HeatOperator(Oracle):
    """u_t − Δ_x u for points (x, t) of shape (B, d + 1), t last: one 2-jet along
    V sampled spatial coordinates and e_t, (d / V) Σ_v u_{jj} − u_t."""

    num_directions: int = 16
    order: ClassVar[int] = 2

    def sample(self, key, x):
        b = backend_of(x)
        d = x.shape[1] - 1
        j = b.choice(key, d, self.num_directions)
        return b.xp.concat([j, b.asarray([d], dtype=j.dtype)])

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        xp = array_namespace(x)
        d = x.shape[1] - 1
        V = sample.shape[0] - 1
        jet = model.jet(params, x, sample, 2)
        u_t = jet.coeffs[0][V, ...]
        lap = (d / V) * xp.sum(jet.coeffs[1][:V, ...], axis=0)
        return OperatorEstimate(jet.primal, u_t - lap)


@dataclass(frozen=True)
class LiftedAnsatz:
    """u = (1 − ρ) N(x) + h(x), h(x) = exp(v·x): boundary data h on the unit sphere."""

    network: Any
    v: Any

    @property
    def _ansatz(self):
        return Ansatz(self.network, "ball")

    def init(self, key, backend):
        return self.network.init(key, backend)

    def apply(self, params, x):
        xp = array_namespace(x)
        return self._ansatz.apply(params, x) + xp.exp(x @ self.v)

    def jet(self, params, x, directions, order, collapse=False):
        xp = array_namespace(x)
        inner = self._ansatz.jet(params, x, directions, order, collapse)
        h = xp.exp(x @ self.v)  # (B,)
        vj = xp.take(self.v, directions)  # along e_j: h(x + t e_j) = h exp(t v_j)
        extra = inner.primal.ndim - 1  # query axes in front of the batch axis
        hp = xp.reshape(h, (1,) * extra + (h.shape[0],))
        coeffs = []
        for k, c in enumerate(inner.coeffs, start=1):
            term = xp.reshape(vj**k, (vj.shape[0],) + (1,) * (extra + 1)) * hp
            if inner.collapsed and k == len(inner.coeffs):
                term = xp.sum(term, axis=0)
            coeffs.append(term if c is None else c + term)
        return type(inner)(inner.primal + hp, tuple(coeffs))


@dataclass(frozen=True)
class SoftBoundaryLoss:
    """(1/B) Σ r_b² over interior points plus λ (1/B) Σ (u − u*)² over sphere points.

    Per-point residuals are ``[interior r, √λ (u − u*) on the sphere]``, in
    that order (the order the points are first evaluated).
    """

    model: Any
    oracle: Any
    problem: Any
    batch_size: int
    weight: float = 10.0

    def sample(self, k: Key) -> SpatialSample:
        p = self.problem
        x = p.sample_domain(fold_in(k, "points"), self.batch_size)
        xb = p.sample_sphere(fold_in(k, "boundary"), self.batch_size)
        draw = self.oracle.sample(fold_in(k, "oracle"), x)
        return SpatialSample(x, (draw,), (p.forcing(x), xb, p.exact(xb)))

    def residuals(self, params, xi):
        xp = array_namespace(xi.x)
        est = self.oracle.estimate(self.model, params, xi.x, xi.oracle[0])
        f, xb, ub = xi.forcing
        b = backend_of(xi.x)
        zero = b.asarray([0], dtype=b.index_dtype)
        u_b = self.model.jet(params, xb, zero, 1).primal
        interior = est.value - f
        boundary = sqrt(self.weight) * (u_b - ub)
        return (xp.concat([interior, boundary], axis=-1),)

    def __call__(self, params, xi):
        r = self.residuals(params, xi)[0]
        return array_namespace(r).mean(r * r, axis=-1)


@dataclass(frozen=True)
class GeneralisationProblem:
    """One problem of the suite in dimension ``dim`` (see the module docstring)."""

    name: str
    dim: int
    backend: Any
    seed: int = 0

    def __post_init__(self):
        if self.name not in NAMES:
            raise ValueError(f"unknown problem {self.name!r}; known: {', '.join(NAMES)}")
        portable = self.backend.with_config(rng="portable")
        root = fold_in(key(self.seed), "generalisation")
        d = self.dim
        w = portable.normal(fold_in(root, "w"), (d,)) * 0.5
        v = portable.normal(fold_in(root, "v"), (d,)) * (0.5 / sqrt(d))
        xp = self.backend.xp
        a = xp.asarray([(0.25, 1.0, 1.75)[i % 3] for i in range(d)], dtype=w.dtype)
        object.__setattr__(self, "w", w)
        object.__setattr__(self, "v", v)
        object.__setattr__(self, "a", a)

    @property
    def input_dim(self) -> int:
        return self.dim + 1 if self.name == "heat" else self.dim

    def sample_domain(self, k: Key, n: int, backend=None):
        return sample_ball(backend or self.backend, k, n, self.input_dim)

    def sample_sphere(self, k: Key, n: int):
        xp = self.backend.xp
        z = self.backend.normal(k, (n, self.dim))
        return z / xp.sqrt(xp.sum(z * z, axis=1, keepdims=True))

    def _split(self, x):
        if self.name == "heat":
            return x[:, :-1], x[:, -1]
        return x, None

    def exact(self, x):
        xp = array_namespace(x)
        y, t = self._split(x)
        rho = xp.sum(y * y, axis=1)
        wx = y @ self.w
        if self.name == "poisson-sine":
            return (1 - rho) * xp.sin(wx)
        if self.name == "anisotropic":
            return (1 - rho) * xp.cos(wx)
        if self.name == "heat":
            return (1 - rho - t * t) * xp.sin(wx + t)
        if self.name == "soft-boundary":
            return 1 + xp.sin(wx)
        return xp.exp(y @ self.v) + (1 - rho) * xp.cos(wx)

    def forcing(self, x):
        """f in closed form, O(d) per point."""
        xp = array_namespace(x)
        d = self.dim
        y, t = self._split(x)
        rho = xp.sum(y * y, axis=1)
        wx = y @ self.w
        w2 = float(xp.sum(self.w * self.w))
        if self.name == "poisson-sine":
            s = xp.sin(wx)
            return -2 * d * s - 4 * wx * xp.cos(wx) - (1 - rho) * w2 * s
        if self.name == "anisotropic":
            s = xp.cos(wx)
            axw = y @ (self.a * self.w)
            return (
                -2 * float(xp.sum(self.a)) * s
                + 4 * axw * xp.sin(wx)
                - (1 - rho) * float(xp.sum(self.a * self.w * self.w)) * s
            )
        if self.name == "heat":
            theta = wx + t
            s, c = xp.sin(theta), xp.cos(theta)
            g = 1 - rho - t * t
            u_t = -2 * t * s + g * c
            lap = -2 * d * s - 4 * wx * c - g * w2 * s
            return u_t - lap
        if self.name == "soft-boundary":
            return -w2 * xp.sin(wx)
        h = xp.exp(y @ self.v)
        s = xp.cos(wx)
        lap = (
            float(xp.sum(self.v * self.v)) * h
            - 2 * d * s
            + 4 * wx * xp.sin(wx)
            - (1 - rho) * w2 * s
        )
        return lap + xp.sin(self.exact(x))

    def model(self, width: int = 128, depth: int = 4, activation: str = "tanh"):
        network = MLP((self.input_dim,) + (width,) * depth + (1,), activation)
        if self.name == "soft-boundary":
            return network
        if self.name == "lifted-sine-gordon":
            return LiftedAnsatz(network, self.v)
        return Ansatz(network, "ball")

    def oracle(self, num_directions: int = 16):
        V = min(num_directions, self.dim)
        if self.name == "anisotropic":
            return DiagonalTrace(self.a, V)
        if self.name == "heat":
            return HeatOperator(V)
        return SparseLaplacian(V)

    def loss(self, batch_size: int = 100, width: int = 128, depth: int = 4, num_directions=16):
        model = self.model(width, depth)
        oracle = self.oracle(num_directions)
        if self.name == "soft-boundary":
            return SoftBoundaryLoss(model, oracle, self, batch_size)
        rhs = (
            (lambda u, x: -array_namespace(u).sin(u))
            if self.name == "lifted-sine-gordon"
            else (lambda u, x: 0.0 * u)
        )
        return ResidualLoss(
            model, oracle, rhs, lambda k: self.sample_domain(k, batch_size), forcing=self.forcing
        )


__all__ = [
    "NAMES",
    "GeneralisationProblem",
    "DiagonalTrace",
    "HeatOperator",
    "LiftedAnsatz",
    "SoftBoundaryLoss",
    "jets",
]
