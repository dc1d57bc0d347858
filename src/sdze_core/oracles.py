"""Jet oracles: unbiased estimates of (L u)(x) from Taylor jets (docs/method.md#oracles).

An oracle turns a model, its parameters and a batch of points x (B, d) into
an :class:`OperatorEstimate`: the model output u(x) and an estimate of
(L u)(x) at each point. Random oracles are unbiased over their spatial
randomness ξ; exact ones (the references for small d) are deterministic.

The randomness is drawn and used in two steps, so that a zeroth-order trainer
can draw ξ once per step and reuse it for the +ε and −ε evaluations (CRNS,
docs/method.md#crns)::

    xi = oracle.sample(key, x)                      # directions or indices
    plus = oracle.estimate(model_plus, params, x, xi)
    minus = oracle.estimate(model_minus, params, x, xi)

The perturbation belongs to the model (``model_plus`` is the model with a
perturbed network, :func:`sdze_core.models.with_layer_map`): an oracle is
pure maths about u(x) and never sees it.

``oracle(model, params, x, key)`` does both at once. The same key gives the
same estimate. One draw of ξ is shared by all points of the batch: each
point's estimate is unbiased, the points' errors are correlated.

Notation: u_i = ∂u/∂x_i, u_ii = ∂²u/∂x_i², u_iiii = ∂⁴u/∂x_i⁴,
u_iikk = ∂⁴u/∂x_i²∂x_k², D^k u[v] = D^k u(x)[v, ..., v] (the k-th coefficient
of the jet of u along x + t v, docs/method.md#jets).

Cost. Along a coordinate direction e_j the network's first layer is the
gather W[:, j] (``model.jet`` with an integer index array), so the sparse
oracles cost O(h V) per point and order for the first layer, whatever d is,
on top of the primal x Wᵀ that every forward pass pays. Dense directions
(Hutchinson, the dense biharmonic, the trace operator) cost O(h V d). With
``collapse=True`` the top Taylor coefficient is propagated already summed
over the directions (docs/method.md#jets): it costs one vector instead of V.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from array_api_compat import array_namespace, device

from .jets import SparseDirections
from .keys import split
from .models import conform
from .registry import backend_of, check_one_library

__all__ = [
    "OperatorEstimate",
    "Oracle",
    "SparseLaplacian",
    "NestedAutodiffLaplacian",
    "HutchinsonLaplacian",
    "ExactLaplacian",
    "SparseDiagonal",
    "ExactDiagonal",
    "DenseBiharmonic",
    "SparseBiharmonic",
    "ExactBiharmonic",
    "TraceOperator",
    "FirstDerivative",
    "SparseGradientNormSquared",
    "residual",
    "squared_residual_loss",
    "DISTRIBUTIONS",
]

#: Tangent distributions of the dense oracles: E[ξ ξᵀ] = I for both.
DISTRIBUTIONS = ("rademacher", "gaussian")


class OperatorEstimate(NamedTuple):
    """What an oracle returns for a batch of B points (a NamedTuple, so a JAX pytree).

    Attributes
    ----------
    u : array, shape (B,)
        The model output at the points (the jets' primal).
    value : array, shape (B,)
        The estimate of (L u)(x) at each point ((n, B) for a
        :class:`FirstDerivative` with n > 1 indices).
    """

    u: Any
    value: Any


class Oracle(ABC):
    """Unbiased estimate of (L u)(x) per point from Taylor jets (docs/method.md#oracles).

    Subclasses implement :meth:`sample` (the spatial randomness ξ, drawn from
    the key only) and :meth:`estimate` (a deterministic function of the
    model, the points and ξ); :meth:`__call__` chains them.

    Attributes
    ----------
    order : int
        The highest derivative order used (the jets' order).
    """

    order: int

    @abstractmethod
    def sample(self, key, x) -> Any:
        """The spatial randomness for points x of shape (B, d), drawn from ``key`` only.

        ``None`` for a deterministic oracle. Draws go through the backend of x.
        """

    @abstractmethod
    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        """The estimate of (L u)(x) for the spatial randomness ``sample``.

        Parameters
        ----------
        model : MLP or Ansatz
            Anything with ``jet(params, x, directions, order, collapse)``. A
            perturbed model (whose outputs carry leading query axes) is
            evaluated like any other.
        params : list of dict
            The model's parameters.
        x : array, shape (B, d)
            Points.
        sample : Any
            What :meth:`sample` returned for these points.
        """

    def __call__(self, model, params, x, key) -> OperatorEstimate:
        """``estimate(model, params, x, sample(key, x))``, x first conformed to the
        parameters (:func:`~sdze_core.models.conform`), so ξ is drawn in their dtype."""
        x, _ = conform(params, x)
        return self.estimate(model, params, x, self.sample(key, x))


# -- helpers --------------------------------------------------------------------------


def _dimension(x) -> int:
    """d for points of shape (B, d); a ValueError otherwise."""
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"x must have shape (B, d), got shape {tuple(getattr(x, 'shape', ()))}")
    return int(x.shape[1])


def _check_count(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_distribution(distribution: str, allowed=DISTRIBUTIONS) -> str:
    if distribution not in allowed:
        raise ValueError(f"unknown distribution {distribution!r}; known: {', '.join(allowed)}")
    return distribution


def _top_sum(jet):
    """Σ_v f_K[v] over the direction axis, shape (B,) (zero where f_K is an exact zero)."""
    xp = array_namespace(jet.primal)
    top = jet.coeffs[-1]
    if top is None:
        return xp.zeros_like(jet.primal)
    if not jet.collapsed:
        top = xp.sum(top, axis=0)
    return xp.broadcast_to(top, jet.primal.shape)


def _coefficients(jet, k: int, count: int):
    """f_k of shape (V, B) for V = ``count`` directions (zeros where f_k is an exact zero)."""
    xp = array_namespace(jet.primal)
    c = jet.coeffs[k - 1]
    shape = (count,) + tuple(jet.primal.shape)
    if c is None:
        return xp.zeros(shape, dtype=jet.primal.dtype, device=device(jet.primal))
    return xp.broadcast_to(c, shape)


def _sample_coordinates(key, x, count: int):
    """``count`` distinct coordinates of range(d), uniform, as an index array (V,)."""
    d = _dimension(x)
    if count > d:
        raise ValueError(
            f"cannot sample {count} distinct coordinates without replacement in dimension "
            f"d = {d}; use at most d (V = d is the exact operator)"
        )
    return backend_of(x).choice(key, d, count)


def _all_coordinates(x):
    b = backend_of(x)
    return b.arange(_dimension(x), dtype=b.index_dtype)


def _dense_tangents(key, x, count: int, distribution: str):
    """(count, d) tangents with i.i.d. Rademacher or N(0, 1) entries, in x's dtype."""
    b = backend_of(x)
    draw = b.rademacher if distribution == "rademacher" else b.normal
    return draw(key, (count, _dimension(x)))


def _diagonal_sum(model, params, x, index, k, collapse):
    """(u, Σ_v ∂^k u/∂x_{j_v}^k) from k-jets along the coordinates j = ``index`` (a gather)."""
    jet = model.jet(params, x, index, k, collapse=collapse)
    return jet.primal, _top_sum(jet)


# -- unordered coordinate pairs (biharmonic polarization) ---------------------------


def _num_pairs(d: int) -> int:
    return d * (d - 1) // 2


def _decode_pairs(codes, d: int):
    """Unordered pairs {i, k}, i ≠ k, of range(d) from codes in range(d (d − 1) / 2).

    Code c names the pair (i, k) = (c mod d, (c mod d + s) mod d) with
    s = ⌊c / d⌋ + 1: the "circulant" enumeration, s = 1, ..., ⌊(d − 1)/2⌋ for
    all i, and for even d also s = d/2 for i < d/2. Every unordered pair
    appears exactly once, and decoding is O(1) integer work per code.
    """
    i = codes % d
    k = (i + codes // d + 1) % d
    return i, k


def _pair_directions(x, i, k, kinds):
    """2-sparse directions for the pairs (i_p, k_p), kind by kind: for each w in
    ``kinds`` (a tuple of weight pairs) the P directions w_0 e_{i_p} + w_1 e_{k_p}."""
    xp = array_namespace(x)
    P = i.shape[0]
    pair = xp.stack([i, k], axis=1)
    index = xp.concat([pair] * len(kinds), axis=0)
    rows = xp.asarray(kinds, dtype=x.dtype, device=device(x))
    weights = xp.reshape(xp.broadcast_to(xp.expand_dims(rows, axis=1), (len(kinds), P, 2)), (-1, 2))
    return SparseDirections(index, weights)


def _sparse_for(model, x, directions: SparseDirections):
    """``directions`` as ``model.jet`` takes them: sparse if it says it does
    (``model.sparse_directions``), else the dense (V, d) array."""
    if getattr(model, "sparse_directions", False):
        return directions
    return directions.dense(_dimension(x))


#: Kinds of pair directions: e_i, e_k (diagonal) and e_i + e_k, e_i − e_k (polarization).
_DIAGONAL = ((1.0, 0.0), (0.0, 1.0))
_POLAR = ((1.0, 1.0), (1.0, -1.0))


def _pair_sums(model, params, x, i, k, collapse):
    """(u, S, Q) for the pairs (i_p, k_p): S = Σ_p (u_{i_p}⁴ + u_{k_p}⁴) and
    Q = Σ_p (D⁴u[e_{i_p} + e_{k_p}] + D⁴u[e_{i_p} − e_{k_p}]), each of shape (B,).

    Every direction is 2-sparse, so the first layer is a gather of 2 columns
    per direction, O(h P), whatever d is. Uncollapsed, the 4P directions share
    one jet (one primal pass, the x Wᵀ that costs O(h d) per point); collapsed,
    S and Q need two jets (the estimators weight them with opposite signs),
    each with its top coefficient summed.
    """
    x, _ = conform(params, x)
    if collapse:
        u, S = _diagonal_sum(model, params, x, array_namespace(x).concat([i, k]), 4, True)
        polar = _sparse_for(model, x, _pair_directions(x, i, k, _POLAR))
        return u, S, _top_sum(model.jet(params, x, polar, 4, collapse=True))
    directions = _sparse_for(model, x, _pair_directions(x, i, k, _DIAGONAL + _POLAR))
    jet = model.jet(params, x, directions, 4)
    xp = array_namespace(x)
    top = _coefficients(jet, 4, 4 * i.shape[0])
    half = 2 * i.shape[0]
    return jet.primal, xp.sum(top[:half, ...], axis=0), xp.sum(top[half:, ...], axis=0)


# -- Laplacian and diagonal operators ------------------------------------------------------


@dataclass(frozen=True)
class SparseDiagonal(Oracle):
    """Σ_i ∂^k u/∂x_i^k from k-jets along V sampled coordinates (docs/method.md#oracles).

    Estimator::

        (d / V) Σ_{v=1..V} ∂^k u/∂x_{j_v}^k,   j_1, ..., j_V uniform without replacement,

    unbiased since each j_v is marginally uniform on range(d). Its variance
    is d² σ² (d − V) / (V (d − 1)), σ² the population variance of the d
    diagonal terms: zero at V = d. The first layer is a gather of V columns,
    so the cost is O(h V) per point and order, independent of d.

    Parameters
    ----------
    k : int
        Derivative order (>= 1).
    num_directions : int
        V <= d, the number of sampled coordinates (shared by the batch).
    collapse : bool
        Propagate the top coefficient summed over the V directions.
    """

    k: int
    num_directions: int = 16
    collapse: bool = True

    def __post_init__(self):
        _check_count("k", self.k)
        _check_count("num_directions", self.num_directions)

    @property
    def order(self) -> int:
        return self.k

    def sample(self, key, x):
        """V distinct coordinates j_v, an index array of shape (V,)."""
        return _sample_coordinates(key, x, self.num_directions)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        d = _dimension(x)
        u, total = _diagonal_sum(model, params, x, sample, self.k, self.collapse)
        return OperatorEstimate(u, (d / sample.shape[0]) * total)


@dataclass(frozen=True)
class ExactDiagonal(Oracle):
    """Σ_i ∂^k u/∂x_i^k exactly, from k-jets along all d coordinates (docs/method.md#oracles).

    The reference for small d: :class:`SparseDiagonal` with V = d. Costs
    O(h d) per point and order.

    Parameters
    ----------
    k : int
        Derivative order (>= 1).
    collapse : bool
        Propagate the top coefficient summed over the d directions.
    """

    k: int
    collapse: bool = True

    def __post_init__(self):
        _check_count("k", self.k)

    @property
    def order(self) -> int:
        return self.k

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _dimension(x)
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        index = _all_coordinates(x)
        u, total = _diagonal_sum(model, params, x, index, self.k, self.collapse)
        return OperatorEstimate(u, total)


@dataclass(frozen=True)
class _SampledCoordinates(Oracle):
    """Shared by the estimators on V coordinates j_v drawn uniformly without replacement."""

    num_directions: int = 16

    def __post_init__(self):
        _check_count("num_directions", self.num_directions)

    def sample(self, key, x):
        """V distinct coordinates j_v, an index array of shape (V,)."""
        return _sample_coordinates(key, x, self.num_directions)


@dataclass(frozen=True)
class SparseLaplacian(_SampledCoordinates):
    """Δu from 2-jets along V sampled coordinates (docs/method.md#oracles, STDE's sparse estimator).

    Estimator::

        (d / V) Σ_{v=1..V} ∂²u/∂x_{j_v}²,   j_1, ..., j_V uniform without replacement

    (:class:`SparseDiagonal` with k = 2). Unbiased; variance
    d² σ² (d − V) / (V (d − 1)) with σ² the population variance of the
    u_ii, zero at V = d. Cost O(h V) per point beyond the primal, whatever d.
    With ``collapse=True`` only Σ_v u_2[v] is propagated at the top order.

    Parameters
    ----------
    num_directions : int
        V <= d.
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    order: ClassVar[int] = 2
    collapse: bool = True

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        d = _dimension(x)
        u, total = _diagonal_sum(model, params, x, sample, 2, self.collapse)
        return OperatorEstimate(u, (d / sample.shape[0]) * total)


@dataclass(frozen=True)
class NestedAutodiffLaplacian(_SampledCoordinates):
    """SDGD's Laplacian: the estimator of :class:`SparseLaplacian` by nested autodiff.

    Estimator (the same coordinates as :class:`SparseLaplacian` for the same key)::

        (d / V) Σ_{v=1..V} ∂²u/∂x_{j_v}²,   j_1, ..., j_V uniform without replacement

    with each ∂²u/∂x_j² computed by reverse mode through the gradient ∇u
    (:meth:`Backend.hessian_diagonal <sdze_core.backend.Backend.hessian_diagonal>`),
    as stochastic dimension gradient descent (SDGD, Hu et al.) does. It is the
    baseline of docs/method.md#baselines: the same numbers as the jet oracle, at O(V B d)
    memory and O(V) backward passes instead of O(h V) per point. Autodiff
    backends only (torch, jax), and only a model with one output per point:
    one that evaluates several networks at once (SDZE's perturbed copies,
    output (Q, B)) is refused.

    Parameters
    ----------
    num_directions : int
        V <= d.
    """

    order: ClassVar[int] = 2

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        x, _ = conform(params, x)
        xp = array_namespace(x)

        def one_network(y):
            u = model.apply(params, y)
            if tuple(u.shape) != (y.shape[0],):
                raise TypeError(
                    "NestedAutodiffLaplacian differentiates one network, with one output per "
                    f"point; this model's output has shape {tuple(u.shape)} for "
                    f"{y.shape[0]} points (several networks at once, such as SDZE's "
                    "perturbed copies): use SparseLaplacian"
                )
            return u

        u, second = backend_of(x).hessian_diagonal(one_network, x, sample)
        d = _dimension(x)
        return OperatorEstimate(u, (d / sample.shape[0]) * xp.sum(second, axis=0))


@dataclass(frozen=True)
class ExactLaplacian(Oracle):
    """Δu = Σ_i ∂²u/∂x_i² from 2-jets along all d coordinates (the small-d reference).

    Parameters
    ----------
    collapse : bool
        Propagate the top coefficient summed over the d directions.
    """

    order: ClassVar[int] = 2
    collapse: bool = True

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _dimension(x)
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        u, total = _diagonal_sum(model, params, x, _all_coordinates(x), 2, self.collapse)
        return OperatorEstimate(u, total)


@dataclass(frozen=True)
class _DenseTangentOracle(Oracle):
    """Shared by the dense estimators: (1 / (m V)) Σ_{v=1..V} D^K u[ξ_v].

    K is the subclass's ``order`` and m its ``moment``, the constant with
    E D^K u[ξ] = m (L u)(x) for the subclass's tangent distribution.
    """

    moment: ClassVar[int] = 1
    num_directions: int = 16
    distribution: str = "rademacher"
    collapse: bool = True

    def __post_init__(self):
        _check_count("num_directions", self.num_directions)
        _check_distribution(self.distribution)

    def sample(self, key, x):
        """Tangents ξ of shape (V, d), shared by all points."""
        return _dense_tangents(key, x, self.num_directions, self.distribution)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        _dimension(x)
        jet = model.jet(params, x, sample, self.order, collapse=self.collapse)
        return OperatorEstimate(jet.primal, _top_sum(jet) / (self.moment * sample.shape[0]))


@dataclass(frozen=True)
class HutchinsonLaplacian(_DenseTangentOracle):
    """Δu by Hutchinson's trace estimator on dense tangents (docs/method.md#oracles).

    Estimator::

        (1 / V) Σ_{v=1..V} D²u[ξ_v],   ξ_v ∈ R^d i.i.d. with E[ξ ξᵀ] = I,

    unbiased since E D²u[ξ] = tr(∇²u E[ξ ξᵀ]) = Δu. One (V, d) draw is shared
    by the batch. Variance with H = ∇²u: (2/V) Σ_{i≠j} H_ij² for Rademacher
    entries (the lowest possible), (2/V) ‖H‖_F² for Gaussian ones. Cost
    O(h V d) per point: dense tangents go through the whole first layer.
    :meth:`estimate` also accepts per-point tangents of shape (V, B, d)
    (independent draws per point; each estimate stays unbiased).

    Parameters
    ----------
    num_directions : int
        V.
    distribution : {"rademacher", "gaussian"}
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    order: ClassVar[int] = 2
    moment: ClassVar[int] = 1
    distribution: str = "rademacher"


# -- biharmonic ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseBiharmonic(_DenseTangentOracle):
    """Δ²u from 4-jets along Gaussian tangents (docs/method.md#oracles).

    Estimator::

        (1 / (3V)) Σ_{v=1..V} D⁴u[ξ_v],   ξ_v ~ N(0, I_d) i.i.d.,

    unbiased because E[ξ_i ξ_j ξ_k ξ_l] = δ_ij δ_kl + δ_ik δ_jl + δ_il δ_jk
    (Isserlis), so E D⁴u[ξ] = 3 Σ_{i,j} u_iijj = 3 Δ²u.

    ``distribution="rademacher"`` exists only to show why the tangents must
    be Gaussian: for Rademacher ξ, E[ξ_i⁴] = 1 instead of 3, so
    E D⁴u[ξ] = 3 Σ_{i≠j} u_iijj + Σ_i u_iiii and the estimator's mean is
    Δ²u − (2/3) Σ_i u_iiii: **biased**. Never train with it.

    One (V, d) draw is shared by the batch; cost O(h V d) per point.
    :meth:`estimate` also accepts per-point tangents of shape (V, B, d).

    Parameters
    ----------
    num_directions : int
        V.
    distribution : {"gaussian", "rademacher"}
        Default (and the only unbiased choice) ``"gaussian"``.
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    order: ClassVar[int] = 4
    moment: ClassVar[int] = 3
    distribution: str = "gaussian"


@dataclass(frozen=True)
class SparseBiharmonic(Oracle):
    """Δ²u from sampled coordinate pairs by polarization (docs/method.md#oracles).

    Δ²u = Σ_i u_iiii + 2 Σ_{i<k} u_iikk, and for i ≠ k (the odd terms cancel)::

        u_iikk = (D⁴u[e_i + e_k] + D⁴u[e_i − e_k] − 2 u_iiii − 2 u_kkkk) / 12.

    Estimator, with P distinct unordered pairs {i_p, k_p} drawn uniformly
    without replacement from the N = d(d − 1)/2 pairs::

        (1 / P) Σ_{p=1..P} [ (d/2) (u_{i_p i_p i_p i_p} + u_{k_p k_p k_p k_p})
                             + d (d − 1) u_{i_p i_p k_p k_p} ].

    Unbiased: each endpoint of a uniform pair is uniform on range(d), so the
    first term has mean Σ_i u_iiii, and the second has mean
    d (d − 1) · (2/(d(d−1))) Σ_{i<k} u_iikk. At P = N it is exact. The
    diagonal terms reuse the pairs' endpoints: 4P jets in all (along e_i,
    e_k, e_i + e_k, e_i − e_k), and the estimate only needs the sums over p
    of each kind, so ``collapse=True`` applies.

    Cost: every direction is 2-sparse, so the first layer gathers two columns
    of W per direction, O(h P) whatever d is (``model.jet`` with
    :class:`~sdze_core.jets.SparseDirections`; a model without them gets the
    dense (4P, d) directions). With ``collapse=False`` (the default) the 4P
    directions share one jet, hence one primal pass x Wᵀ: beyond the forward
    pass, the time and memory per point are flat in d
    (docs/operators.md#biharmonic-cost). ``collapse=True`` sums the top
    coefficient as it goes, which needs the diagonal and polarization sums in
    two jets (their weights differ in sign for d > 4): less memory for the top
    order, one more primal pass.

    Parameters
    ----------
    num_pairs : int
        P <= d (d − 1) / 2.
    collapse : bool
        Two collapsed jets instead of one shared uncollapsed jet (default False).
    """

    order: ClassVar[int] = 4
    num_pairs: int = 16
    collapse: bool = False

    def __post_init__(self):
        _check_count("num_pairs", self.num_pairs)

    def sample(self, key, x):
        """P distinct unordered pairs as two index arrays (i, k) of shape (P,), i ≠ k."""
        d = _dimension(x)
        if self.num_pairs > _num_pairs(d):
            raise ValueError(
                f"cannot sample {self.num_pairs} distinct coordinate pairs without replacement "
                f"in dimension d = {d}: there are d (d - 1) / 2 = {_num_pairs(d)}"
            )
        return _decode_pairs(backend_of(x).choice(key, _num_pairs(d), self.num_pairs), d)

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        d = _dimension(x)
        i, k = sample
        P = i.shape[0]
        u, diagonal, polar = _pair_sums(model, params, x, i, k, self.collapse)
        mixed = (polar - 2 * diagonal) / 12  # Σ_p u_{i_p i_p k_p k_p}
        value = ((d / 2) * diagonal + d * (d - 1) * mixed) / P
        return OperatorEstimate(u, value)


@dataclass(frozen=True)
class ExactBiharmonic(Oracle):
    """Δ²u exactly, by polarization over all coordinates and pairs (the small-d reference).

    With S = Σ_i u_iiii (d coordinate 4-jets) and
    Q = Σ_{i<k} (D⁴u[e_i + e_k] + D⁴u[e_i − e_k]) (d (d − 1) 4-jets along
    2-sparse directions, whose first layer is a gather)::

        Δ²u = S + 2 Σ_{i<k} u_iikk = S + (Q − 2 (d − 1) S) / 6,

    since Σ_{i<k} (u_iiii + u_kkkk) = (d − 1) S. Costs d² jets per point.

    Parameters
    ----------
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    order: ClassVar[int] = 4
    collapse: bool = True

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        _dimension(x)
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        d = _dimension(x)
        u, S = _diagonal_sum(model, params, x, _all_coordinates(x), 4, self.collapse)
        if d == 1:
            return OperatorEstimate(u, S)
        b = backend_of(x)
        i, k = _decode_pairs(b.arange(_num_pairs(d), dtype=b.index_dtype), d)
        polar = _sparse_for(model, x, _pair_directions(conform(params, x)[0], i, k, _POLAR))
        Q = _top_sum(model.jet(params, x, polar, 4, collapse=self.collapse))
        return OperatorEstimate(u, S + (Q - 2 * (d - 1) * S) / 6)


# -- general second-order trace operators ------------------------------------------------


@dataclass(frozen=True, eq=False)
class TraceOperator(Oracle):
    """tr(A ∇²u) with A = σ σᵀ given by its factor σ, or a symmetric A (docs/method.md#oracles).

    A factor σ (d × m) with columns σ_1..σ_m gives, exactly
    (``num_directions=None``) and by sampling::

        tr(σ σᵀ ∇²u) = Σ_{k=1..m} D²u[σ_k]
                     ≈ (1 / V) Σ_{v=1..V} D²u[σ ξ_v],   ξ_v ∈ R^m, E[ξ ξᵀ] = I_m,

    the second unbiased since E D²u[σ ξ] = tr(σᵀ ∇²u σ E[ξ ξᵀ]).

    A symmetric A is diagonalised once, A = Σ_k λ_k q_k q_kᵀ (``eigh``), and
    split into A = σ₊σ₊ᵀ − σ₋σ₋ᵀ with σ₊ = Q diag(√max(λ, 0)) and
    σ₋ = Q diag(√max(−λ, 0)); the value is the σ₊ term minus the σ₋ term (the
    same ξ serves both). For a positive semi-definite A (every
    λ_k >= −10 d ε max|λ|, ε the dtype's epsilon) the σ₋ term is dropped.
    The exact value is then Σ_k λ_k D²u[q_k].

    Tangents are dense: O(h V d) per point (m directions when exact).
    :meth:`estimate` also accepts per-point ξ of shape (V, B, m).

    Parameters
    ----------
    sigma : array, shape (d, m), optional
        The factor of A = σ σᵀ (e.g. a diffusion coefficient).
    A : array, shape (d, d), optional
        A symmetric matrix; exactly one of ``sigma`` and ``A``.
    num_directions : int or None
        V for the random estimator; ``None`` for the exact value.
    distribution : {"rademacher", "gaussian"}
        Law of the entries of ξ (random estimator only).
    collapse : bool
        Propagate the top coefficient summed over the directions.
    """

    sigma: Any = field(default=None, repr=False)
    A: Any = field(default=None, repr=False)
    num_directions: int | None = None
    distribution: str = "rademacher"
    collapse: bool = True
    #: ((factor (d, m), sign), ...): tr(A ∇²u) = Σ sign · tr(factor factorᵀ ∇²u).
    parts: tuple = field(init=False, repr=False)

    order: ClassVar[int] = 2

    def __post_init__(self):
        _check_count("num_directions", self.num_directions, allow_none=True)
        _check_distribution(self.distribution)
        if (self.sigma is None) == (self.A is None):
            raise ValueError("give exactly one of sigma (A = sigma sigmaᵀ) and A")
        if self.sigma is not None:
            if self.sigma.ndim != 2:
                raise ValueError(f"sigma must have shape (d, m), got {tuple(self.sigma.shape)}")
            parts = ((self.sigma, 1.0),)
        else:
            parts = _symmetric_parts(self.A)
        object.__setattr__(self, "parts", parts)

    @property
    def dimension(self) -> int:
        """d, the number of rows of σ (or of A)."""
        return int(self.parts[0][0].shape[0])

    def _check_points(self, x) -> int:
        d = _dimension(x)
        if d != self.dimension:
            raise ValueError(
                f"x has d = {d} coordinates but the operator is {self.dimension}-dimensional"
            )
        return d

    def sample(self, key, x):
        """ξ of shape (V, m), shared by the batch (and by the σ₊, σ₋ parts); ``None`` if exact."""
        self._check_points(x)
        if self.num_directions is None:
            return None
        b = backend_of(x)
        draw = b.rademacher if self.distribution == "rademacher" else b.normal
        return draw(key, (self.num_directions, int(self.parts[0][0].shape[1])))

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        x, _ = conform(params, x)
        xp = array_namespace(x)
        self._check_points(x)
        value = None
        for factor, sign in self.parts:
            check_one_library(**{"sigma or A": factor, "x": x})
            factor = xp.astype(factor, x.dtype, copy=False)
            if sample is None:
                directions, count = xp.permute_dims(factor, (1, 0)), 1
            else:
                directions, count = sample @ xp.permute_dims(factor, (1, 0)), sample.shape[0]
            jet = model.jet(params, x, directions, 2, collapse=self.collapse)
            term = (sign / count) * _top_sum(jet)
            value = term if value is None else value + term
        return OperatorEstimate(jet.primal, value)


def _symmetric_parts(A) -> tuple:
    """Factors (σ₊, +1) and, if A is indefinite, (σ₋, −1) with A = σ₊σ₊ᵀ − σ₋σ₋ᵀ."""
    xp = array_namespace(A)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
    eps = xp.finfo(A.dtype).eps
    scale = float(xp.max(xp.abs(A))) if A.shape[0] else 0.0
    if float(xp.max(xp.abs(A - A.T))) > 100 * eps * max(scale, 1.0):
        raise ValueError("A must be symmetric")
    lam, Q = xp.linalg.eigh(A)
    zero = xp.zeros_like(lam)
    positive = Q * xp.sqrt(xp.maximum(lam, zero))[None, :]
    tol = 10 * A.shape[0] * eps * float(xp.max(xp.abs(lam)))
    if float(xp.min(lam)) >= -tol:
        return ((positive, 1.0),)
    negative = Q * xp.sqrt(xp.maximum(-lam, zero))[None, :]
    return ((positive, 1.0), (negative, -1.0))


# -- first-order operators ------------------------------------------------------------


@dataclass(frozen=True)
class FirstDerivative(Oracle):
    """∂u/∂x_j for given coordinates j, exactly, from 1-jets along e_j (a gather).

    E.g. ``FirstDerivative(-1)`` is u_t when time is the last coordinate.

    Parameters
    ----------
    index : int or sequence of int
        Coordinates j (negative ones count from the end, as in Python).
        For one int the estimate's value has shape (B,); for a sequence of n
        it has shape (n, B), row r being ∂u/∂x_{index[r]}.
    """

    order: ClassVar[int] = 1
    index: int | Sequence[int]

    def __post_init__(self):
        indices = (self.index,) if isinstance(self.index, int) else tuple(self.index)
        if not indices or not all(isinstance(j, int) and not isinstance(j, bool) for j in indices):
            raise ValueError(
                f"index must be an int or a non-empty sequence of ints, got {self.index!r}"
            )
        if not isinstance(self.index, int):
            object.__setattr__(self, "index", indices)

    def _indices(self, d: int) -> list[int]:
        indices = [self.index] if isinstance(self.index, int) else list(self.index)
        bad = [j for j in indices if not -d <= j < d]
        if bad:
            raise ValueError(f"coordinate index {bad[0]} out of range for d = {d}")
        return [j % d for j in indices]

    def sample(self, key, x):
        """``None``: nothing is random (the key is not used)."""
        self._indices(_dimension(x))
        return None

    def estimate(self, model, params, x, sample=None) -> OperatorEstimate:
        b = backend_of(x)
        indices = self._indices(_dimension(x))
        jet = model.jet(params, x, b.asarray(indices, dtype=b.index_dtype), 1)
        first = _coefficients(jet, 1, len(indices))
        return OperatorEstimate(jet.primal, first[0, ...] if isinstance(self.index, int) else first)


@dataclass(frozen=True)
class SparseGradientNormSquared(_SampledCoordinates):
    """‖∇u‖² from 1-jets along V sampled coordinates.

    Estimator::

        (d / V) Σ_{v=1..V} (∂u/∂x_{j_v})²,   j_1, ..., j_V uniform without replacement,

    unbiased for Σ_i u_i² (exact at V = d). Cost O(h V) per point beyond
    the primal.

    Parameters
    ----------
    num_directions : int
        V <= d.
    """

    order: ClassVar[int] = 1

    def estimate(self, model, params, x, sample) -> OperatorEstimate:
        xp = array_namespace(x)
        d = _dimension(x)
        V = sample.shape[0]
        jet = model.jet(params, x, sample, 1)
        first = _coefficients(jet, 1, V)
        return OperatorEstimate(jet.primal, (d / V) * xp.sum(first * first, axis=0))


# -- residual losses ------------------------------------------------------------------


def residual(
    oracle: Oracle,
    model,
    params,
    x,
    key,
    rhs_fn: Callable[[Any, Any], Any],
):
    """The estimated PDE residual per point, r̂ = L̂u − rhs_fn(u, x) (docs/method.md#oracles).

    For an equation written L u = F(u, x), ``rhs_fn(u, x)`` returns F at the
    points (shape (B,)), given the model output u (B,) and x (B, d). Since
    F is evaluated at the exact u, r̂ is unbiased for r = L u − F(u, x)
    whenever L̂u is. Examples: Poisson Δu = f: ``rhs_fn = lambda u, x: f(x)``;
    Allen–Cahn Δu + u − u³ = f: ``rhs_fn = lambda u, x: f(x) - u + u**3``.

    Parameters
    ----------
    oracle : Oracle
        The estimator of L u.
    model, params, x
        As for :meth:`Oracle.estimate`.
    key : Key
        The oracle's spatial key (the same key gives the same r̂).
    rhs_fn : callable
        ``rhs_fn(u, x) -> (B,)``.

    Returns
    -------
    array, shape (B,)
    """
    estimate = oracle(model, params, x, key)
    return estimate.value - rhs_fn(estimate.u, x)


def squared_residual_loss(
    oracle: Oracle,
    model,
    params,
    x,
    key,
    rhs_fn: Callable[[Any, Any], Any],
    unbiased: bool = False,
):
    """Mean squared residual over the points, plain or unbiased (docs/method.md#oracles).

    * ``unbiased=False``: (1/B) Σ_b r̂_b², with r̂ = :func:`residual` drawn
      from ``key``. Its mean is (1/B) Σ_b (r_b² + Var r̂_b): biased upwards
      by the estimator's variance.
    * ``unbiased=True``: (1/B) Σ_b r̂_{1,b} r̂_{2,b}, with r̂_1 and r̂_2 from
      the two independent keys ``split(key)``. Its mean is (1/B) Σ_b r_b²
      exactly; it costs two oracle evaluations and can be negative.

    Returns
    -------
    array, shape ()
    """
    xp = array_namespace(x)
    if unbiased:
        first, second = split(key)
        r1 = residual(oracle, model, params, x, first, rhs_fn)
        r2 = residual(oracle, model, params, x, second, rhs_fn)
        return xp.mean(r1 * r2)
    r = residual(oracle, model, params, x, key, rhs_fn)
    return xp.mean(r * r)
