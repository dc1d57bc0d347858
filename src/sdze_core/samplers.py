"""Perturbation samplers: the directions z of zeroth-order training
(docs/method.md#subspace-perturbations).

A sampler decides what a perturbation z of the parameters looks like, and
applies it without ever forming a P-sized array where it can avoid one:

* :class:`LowRankSubspace`: per weight matrix W (m × n), Z = c U S Vᵀ with
  orthonormal U (m × r), V (n × r) from QR of Gaussian matrices, refreshed
  every T steps, S ~ N(0, I_{r×r}) drawn per query and c = sqrt(m n) / r
  (so E‖Z‖_F² = m n); biases get a full Gaussian. The perturbed layer is
  computed matrix-free, (W + s Z) x = W x + s c U (S (Vᵀ x)).
* :class:`FullGaussian`: z ~ N(0, I_P), the full-space baseline (MeZO). Its
  weight perturbations are P-sized and regenerated from their keys.

Parameters are the models' lists of ``{"W": (m, n), "b": (m,)}`` dicts.
Randomness is explicit: bases come from ``fold_in(key, "bases")`` folded with
the refresh epoch and the layer, a step's draws from that step's parameter
key folded with the layer, so the same keys always give the same z.

A step uses a sampler through five pure functions (state in, state out):

    state, params, transition = sampler.refresh(state, params, step)
    directions = sampler.draw(state, params, param_key, q)
    layers = sampler.layer_map(state, directions, query_index, scales)  # a LayerMap
    coords = sampler.project(directions, g)                       # (1/q) Σ g_i z_i
    state, params = sampler.apply(state, params, directions, updates)

``coords`` and ``updates`` are the gradient estimate and the step in the
sampler's own coordinates: for the low-rank subspace r × r per matrix (the
full-space estimate is U G Vᵀ) and a vector per bias, so an optimizer's
state (momentum, Adam moments) is O(r²) per layer, not O(P).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from math import sqrt
from typing import Any, NamedTuple

import array_api_compat
from array_api_compat import array_namespace

from .keys import Key, fold_in
from .registry import backend_of

__all__ = [
    "Sampler",
    "LowRankSubspace",
    "LowRankState",
    "LowRankDirections",
    "FullGaussian",
    "FullGaussianDirections",
    "PerturbedLayers",
    "add_low_rank",
]

#: Largest temporary (elements) of the chunked in-place rank-r update.
_CHUNK_ELEMENTS = 1 << 21


def _promote(a, b):
    """Cast the real one of ``a``, ``b`` to the other's complex dtype (explicit, as
    the standard leaves mixed real/complex matmul to the library)."""
    if a.dtype == b.dtype:
        return a, b
    xp = array_namespace(a, b)
    if xp.isdtype(b.dtype, "complex floating"):
        return xp.astype(a, b.dtype), b
    if xp.isdtype(a.dtype, "complex floating"):
        return a, xp.astype(b, a.dtype)
    return a, b


def _matmul(a, b):
    a, b = _promote(a, b)
    return a @ b


def _add(a, b):
    a, b = _promote(a, b)
    return a + b


def add_low_rank(W, U, M, V):
    """W + U M Vᵀ for U (m × r), M (r × r), V (n × r): in place where W is writeable.

    On a writeable array (NumPy, PyTorch, CuPy, array-api-strict) W is updated
    in column chunks, so the only temporary is a few MB whatever n is; on
    immutable arrays (JAX) the result is a new array (under ``jax.jit`` with a
    donated W, XLA reuses W's buffer).
    """
    xp = array_namespace(W)
    UM = U @ M
    if not array_api_compat.is_writeable_array(W):
        return _functional_low_rank(backend_of(W))(W, UM, V)
    m, n = W.shape
    chunk = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        W[:, start:stop] += UM @ xp.matrix_transpose(V[start:stop, :])
    return W


def _plus_low_rank(W, UM, V):
    return W + UM @ array_namespace(W).matrix_transpose(V)


@cache
def _functional_low_rank(backend):
    """W + UM Vᵀ compiled with W's buffer donated (JAX: updated in place by XLA)."""
    try:
        return backend.jit(_plus_low_rank, donate_argnums=(0,))
    except TypeError:  # a backend whose compiler takes no donation
        return _plus_low_rank


def _add_vector(b, delta):
    """b + delta, in place where b is writeable."""
    if array_api_compat.is_writeable_array(b):
        b += delta
        return b
    return b + delta


def _check_queries(num_queries) -> None:
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"num_queries must be an int >= 1, got {num_queries!r}")


def _mul(a, b):
    a, b = _promote(a, b)
    return a * b


def _check_params(params) -> None:
    if not isinstance(params, (list, tuple)) or not params:
        raise TypeError("params must be a non-empty list of {'W', 'b'} dicts (one per layer)")
    for layer, p in enumerate(params):
        if not isinstance(p, dict) or set(p) != {"W", "b"}:
            raise TypeError(f"layer {layer}: expected a dict with keys 'W' and 'b', got {p!r:.80}")
        if p["W"].ndim != 2 or p["b"].ndim != 1 or p["b"].shape[0] != p["W"].shape[0]:
            raise ValueError(
                f"layer {layer}: W must be (m, n) and b (m,), got {p['W'].shape}, {p['b'].shape}"
            )


class Sampler(ABC):
    """Interface of a perturbation sampler (see the module docstring).

    Attributes
    ----------
    has_coordinates : bool
        Whether :meth:`project` returns small coordinates on which an
        optimizer may keep moments (momentum, Adam). The full-space sampler's
        coordinates are one scalar per query: only plain ZO-SGD applies.
    """

    has_coordinates: bool = True
    wants_residuals: bool = False

    def observe(self, state, x, residual):
        """Take note of the step's points x (B, d) and residuals r(θ) (B,) (only
        called when :attr:`wants_residuals`): the new state."""
        return state

    @abstractmethod
    def init(self, key: Key, params) -> Any:
        """The sampler's state for parameters ``params``, from ``key``."""

    def refresh(self, state, params, step: int):
        """Prepare step ``step``: ``(state, params, transition)``.

        ``transition`` is ``None`` unless the subspace changed; then it maps
        coordinates in the old subspace to the new one (see
        :meth:`LowRankSubspace.refresh`).
        """
        return state, params, None

    @abstractmethod
    def draw(self, state, params, key: Key, num_queries: int) -> Any:
        """The step's ``num_queries`` perturbation directions, from ``key`` only."""

    @abstractmethod
    def layer_map(self, state, directions, query_index=None, scales=None) -> PerturbedLayers:
        """The :class:`~sdze_core.models.LayerMap` of the parameters θ + s_k z_{i_k}, all
        queries k at once (a model applies it through
        :func:`~sdze_core.models.with_layer_map`).

        ``query_index`` (Q,) picks the direction of each query and ``scales``
        (Q,) its step s_k (±ε, or i h for a complex-step forward gradient).
        Without them the map evaluates the current parameters (those the
        state may still hold as a pending low-rank update).
        """

    @abstractmethod
    def zero_coordinates(self, params, num_queries: int) -> list:
        """Zeros shaped like :meth:`project`'s result (an optimizer's template)."""

    @abstractmethod
    def project(self, directions, g) -> list:
        """The gradient estimate (1/q) Σ_i g_i z_i in the sampler's coordinates."""

    @abstractmethod
    def apply(self, state, params, directions, updates):
        """θ ← θ + (the step ``updates``, in coordinates): ``(state, params)``."""

    def merge(self, state, params):
        """Fold any pending update into the parameters: ``(state, params)``."""
        return state, params

    def evaluation_layer_map(self, state, params):
        """The layer map of the current network (``None``: the plain layers)."""
        return None

    def subspace_dimension(self, params) -> int:
        """k, the dimension of the space the perturbations span."""
        return sum(int(p["W"].shape[0] * p["W"].shape[1] + p["b"].shape[0]) for p in params)


# -- the layer map ----------------------------------------------------------------------------


class PerturbedLayers:
    """A sampler's :class:`~sdze_core.models.LayerMap`: each layer's affine map for all
    queries at once.

    For layer l with weights (W, b) and Q queries it returns, for input x of
    shape (..., B, n) at the first layer or (..., Q, B, n) after it,

        y_k = x (W + Δ_k)ᵀ (+ b + δ_k for the primal),   shape (..., Q, B, m),

    with Δ_k given by ``low_rank(l)`` as U C_k Vᵀ (C of shape (Q, r, r), or
    (r, r) shared) or by ``dense(l)`` as a (Q, m, n) stack. The first layer's
    x Wᵀ and Vᵀx are computed once and shared by all queries. With no query
    axis (``num_queries=None``) the map evaluates a single network.
    """

    def __init__(self, layers, num_queries: int | None):
        self.layers = layers
        self.num_queries = num_queries

    def affine(self, layer_index: int, layer_params: dict, x, is_primal: bool):
        """y_k = x (W + Δ_k)ᵀ (+ b + δ_k if ``is_primal``), shape (..., Q, B, m)."""
        xp = array_namespace(x)
        spec = self.layers[layer_index]
        W = layer_params["W"]
        batched = self.num_queries is not None
        first = layer_index == 0
        y = _matmul(x, xp.matrix_transpose(W))
        if batched and first:
            y = xp.expand_dims(y, axis=-3)
        if spec.U is not None:
            t = _matmul(x, spec.V)
            if batched and first:
                t = xp.expand_dims(t, axis=-3)
            y = _add(y, _matmul(_matmul(t, spec.CT), xp.matrix_transpose(spec.U)))
        elif spec.Z is not None:
            if first:
                # x Z_iᵀ for the q distinct directions, then picked and scaled per query.
                xz = _matmul(xp.expand_dims(x, axis=-3), xp.matrix_transpose(spec.Z))
                delta = xp.take(xz, spec.index, axis=-3)
            else:
                Z = xp.take(spec.Z, spec.index, axis=0)
                delta = _matmul(x, xp.matrix_transpose(Z))
            y = _add(y, _mul(delta, spec.scales_3d))
        if is_primal:
            y = _add(y, layer_params["b"])
            if spec.bias_delta is not None:
                y = _add(y, spec.bias_delta)
        return y

    def columns(self, layer_index: int, layer_params: dict, index):
        """(W + Δ_k)[:, index] for every query k: shape (Q, m, V) (or (m, V))."""
        xp = array_namespace(layer_params["W"])
        spec = self.layers[layer_index]
        cols = xp.take(layer_params["W"], index, axis=1)
        if spec.U is not None:
            Vj = xp.take(spec.V, index, axis=0)
            C = xp.matrix_transpose(spec.CT)
            cols = _add(cols, _matmul(_matmul(spec.U, C), xp.matrix_transpose(Vj)))
        elif spec.Z is not None:
            Zj = xp.take(xp.take(spec.Z, index, axis=2), spec.index, axis=0)
            cols = _add(cols, _mul(Zj, spec.scales_3d))
        return cols


@dataclass
class _LayerSpec:
    """What :class:`PerturbedLayers` needs for one layer (all optional)."""

    U: Any = None  # (m, r)
    V: Any = None  # (n, r)
    CT: Any = None  # (Q, r, r) or (r, r): the transposed low-rank coefficients
    Z: Any = None  # (q, m, n): dense directions
    index: Any = None  # (Q,) direction of each query (dense directions)
    scales_3d: Any = None  # (Q, 1, 1)
    bias_delta: Any = None  # (Q, 1, m)


def _query_arrays(directions_like, query_index, scales):
    """Backend arrays of the query index (Q,) and scales (Q,)."""
    if scales is None:
        raise ValueError("a layer map with query_index needs scales (the step s_k of each query)")
    count = directions_like.shape[0]
    if isinstance(query_index, (list, tuple)) and not all(0 <= i < count for i in query_index):
        raise ValueError(f"query_index must lie in range({count}), got {list(query_index)}")
    backend = backend_of(directions_like)
    xp = backend.xp
    index = backend.asarray(query_index, dtype=backend.index_dtype)
    if isinstance(scales, (list, tuple)):
        dtype = complex if any(isinstance(s, complex) for s in scales) else float
        scales = [dtype(s) for s in scales]
        if dtype is complex:
            ctype = xp.complex128 if directions_like.dtype == xp.float64 else xp.complex64
            scales = backend.asarray(scales, dtype=ctype)
        else:
            scales = backend.asarray(scales, dtype=directions_like.dtype)
    if index.shape != scales.shape or index.ndim != 1:
        raise ValueError(
            f"query_index and scales must both have shape (Q,), got {index.shape}, {scales.shape}"
        )
    return index, scales


# -- low-rank subspace ------------------------------------------------------------------------


class LowRankState(NamedTuple):
    """State of :class:`LowRankSubspace`.

    Attributes
    ----------
    key : Key
        Root of the basis keys.
    epoch : int
        Index of the current bases: they were drawn for steps
        [epoch T, (epoch + 1) T).
    bases : tuple of (U, V) or None
        The stored bases per layer (``None`` per layer for a vector-only
        layer), or ``None`` when they are regenerated from their key.
    pending : tuple of arrays or None
        Per layer the r × r update A accumulated since the bases were drawn:
        the network's weights are W + U A Vᵀ until :meth:`LowRankSubspace.merge`.
    inputs : array or None
        With ``residual_aligned``: the running mean h (d,) of the
        residual-weighted inputs (1/B) Σ_b r_b x_b; otherwise ``None``.
    """

    key: Key
    epoch: int
    bases: tuple | None
    pending: tuple | None
    inputs: Any = None


class LowRankDirections(NamedTuple):
    """One step's low-rank directions: per layer (U, V, S (q, r, r), c, z_b (q, m))."""

    bases: tuple
    S: tuple
    scale: tuple
    bias: tuple


@dataclass(frozen=True)
class LowRankSubspace(Sampler):
    """Per-layer low-rank perturbations Z = c U S Vᵀ with lazily refreshed bases.

    For each weight matrix W (m × n) with r_l = min(r, m, n): U (m × r_l) and
    V (n × r_l) are the Q factors of QR decompositions of Gaussian matrices,
    drawn from the epoch's key and kept for T steps; every query draws
    S ~ N(0, I) of shape r_l × r_l, and Z = c U S Vᵀ with c = sqrt(m n) / r_l,
    so E‖Z‖_F² = m n as for a full Gaussian (docs/method.md#subspace-perturbations). Biases get
    z_b ~ N(0, I_m). The subspace dimension is k = Σ_l (r_l² + m_l).

    The perturbed forward pass is matrix-free: (W + s Z) x = W x + s c U (S (Vᵀ x)),
    O((m + n) r) extra per point; Z and W + sZ are never formed.

    Parameters
    ----------
    rank : int
        r, the basis size per weight matrix (default 8).
    refresh_every : int
        T, the number of steps the bases are kept (default 100).
    store_bases : bool
        Keep U, V in the state (O((m + n) r) per layer, default) or regenerate
        them from their key at every step (O(1) state; one QR of an n × r
        matrix per layer and step).
    merge_every : {"refresh", "step"}
        When the optimizer's steps reach W. ``"step"``: W ← W + U D Vᵀ at
        every step, an in-place rank-r product (functional on JAX).
        ``"refresh"`` (default): within an epoch all steps lie in the span of
        the same bases, so they are summed into the r × r matrix A of the
        state and the forward pass uses W x + U (A (Vᵀ x)) for free, reusing
        Vᵀ x; A is folded into W once, when the bases change, or on
        :meth:`merge`. Call :meth:`merge` before reading the weights.
    layerwise : bool
        Perturb one layer per query: query i perturbs layer (o + i) mod L
        (weights and bias; o uniform from the step's key), scaled by √L so
        that E[vec Z vec Zᵀ] is unchanged. Each g_i then carries only that
        layer's directional derivative: the loss's sensitivity to the last
        layers (here ~10³ times the first layer's) no longer drowns the
        first layer's estimate. Same cost per step.
    residual_aligned : bool
        Make the first column of the first layer's V (the input side, R^d)
        the running mean h ← β h + (1 − β) (1/B) Σ_b r_b x_b / rms(r) of the
        inputs weighted by their residuals at θ (β = ``input_decay``), the others
        random, at every refresh. The first layer's gradient is
        (1/B) Σ_b δ_b x_bᵀ with δ_b the back-propagated error at x_b; when
        δ_b ∝ r_b times a vector (the −2d N term of a Laplacian of
        (1 − ‖x‖²) N, which dominates near the sphere), its input side is h.
        A random V holds a fraction r/d of it; this one most of it. The
        residuals are the mean of the 2q perturbed evaluations' (O(ε²) off),
        so nothing is evaluated twice; h costs d floats. Needs stored bases.
    input_decay : float
        β of the running mean h.
    """

    rank: int = 8
    refresh_every: int = 100
    store_bases: bool = True
    merge_every: str = "refresh"
    layerwise: bool = False
    residual_aligned: bool = False
    input_decay: float = 0.99

    @property
    def wants_residuals(self) -> bool:
        return self.residual_aligned

    def __post_init__(self):
        for name in ("rank", "refresh_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.merge_every not in ("refresh", "step"):
            raise ValueError(f"merge_every must be 'refresh' or 'step', got {self.merge_every!r}")
        if self.residual_aligned and not self.store_bases:
            raise ValueError(
                "residual_aligned bases depend on the run's residuals and cannot be "
                "regenerated from their key: use store_bases=True"
            )
        if not 0.0 <= float(self.input_decay) < 1.0:
            raise ValueError(f"input_decay must be in [0, 1), got {self.input_decay!r}")

    # -- bases ------------------------------------------------------------------------------
    def layer_rank(self, shape) -> int:
        """r_l = min(r, m, n) for a weight of shape (m, n)."""
        m, n = shape
        return min(self.rank, m, n)

    def epoch_of(self, step: int) -> int:
        """The basis epoch of a step: ⌊step / T⌋."""
        return int(step) // self.refresh_every

    def _draw_bases(self, key: Key, epoch: int, params, inputs=None) -> tuple:
        backend = backend_of(params[0]["W"])
        xp = backend.xp
        epoch_key = fold_in(key, epoch)
        bases = []
        for layer, p in enumerate(params):
            m, n = p["W"].shape
            r = self.layer_rank((m, n))
            layer_key = fold_in(epoch_key, layer)
            U = backend.qr(backend.normal(fold_in(layer_key, "U"), (m, r), dtype=p["W"].dtype))[0]
            G = backend.normal(fold_in(layer_key, "V"), (n, r), dtype=p["W"].dtype)
            if layer == 0 and inputs is not None:
                norm = float(xp.linalg.vector_norm(inputs))
                if norm > 0.0 and math.isfinite(norm):
                    G = xp.concat([xp.reshape(inputs / norm, (n, 1)), G[:, 1:]], axis=1)
            V = backend.qr(G)[0]
            bases.append((U, V))
        return tuple(bases)

    def bases(self, state: LowRankState, params) -> tuple:
        """The current (U, V) per layer: stored, or regenerated from the epoch's key."""
        if state.bases is not None:
            return state.bases
        return self._draw_bases(state.key, state.epoch, params)

    # -- Sampler ------------------------------------------------------------------------------
    def init(self, key: Key, params) -> LowRankState:
        """Bases for epoch 0 from ``fold_in(key, "bases")``; no pending update."""
        _check_params(params)
        root = fold_in(key, "bases")
        bases = self._draw_bases(root, 0, params) if self.store_bases else None
        return LowRankState(root, 0, bases, self._zero_pending(params))

    def _zero_pending(self, params):
        if self.merge_every == "step":
            return None
        backend = backend_of(params[0]["W"])
        return tuple(
            backend.zeros((self.layer_rank(p["W"].shape),) * 2, dtype=p["W"].dtype) for p in params
        )

    def refresh(self, state: LowRankState, params, step: int):
        """New bases when ``step`` enters a new epoch (every T steps).

        The pending update is first folded into W in the old bases. Returns
        ``(state, params, transition)``; ``transition`` is ``None`` within an
        epoch, else per layer ``(R_U, R_V) = (U_newᵀ U_old, V_newᵀ V_old)``,
        which maps subspace coordinates G (full-space U G Vᵀ) to their
        projection on the new subspace, R_U G R_Vᵀ.
        """
        epoch = self.epoch_of(step)
        if epoch == state.epoch:
            return state, params, None
        old = self.bases(state, params)
        state, params = self.merge(state, params, old)
        new = self._draw_bases(state.key, epoch, params, state.inputs)
        xp = array_namespace(params[0]["W"])
        transition = tuple(
            (xp.matrix_transpose(Un) @ Uo, xp.matrix_transpose(Vn) @ Vo)
            for (Uo, Vo), (Un, Vn) in zip(old, new, strict=True)
        )
        state = state._replace(epoch=epoch, bases=new if self.store_bases else None)
        return state, params, transition

    def observe(self, state: LowRankState, x, residual):
        """h ← β h + (1 − β) (1/B) Σ_b r_b x_b / rms(r) (the first h is the first
        step's), with ``residual_aligned``; a (1, B) × (B, d) product, no (B, d)
        temporary."""
        if not self.residual_aligned:
            return state
        xp = array_namespace(x)
        r = xp.astype(residual, x.dtype)
        rms = float(xp.sqrt(xp.mean(r * r)))
        if not (rms > 0.0 and math.isfinite(rms)):
            return state
        # Each step's term in units of its residuals' RMS: the early steps, whose
        # residuals are orders of magnitude larger, do not dominate a long mean.
        v = xp.reshape(xp.reshape(r, (1, -1)) @ x, (-1,)) / (x.shape[0] * rms)
        beta = float(self.input_decay)
        h = v if state.inputs is None else beta * state.inputs + (1.0 - beta) * v
        return state._replace(inputs=h)

    def draw(self, state: LowRankState, params, key: Key, num_queries: int) -> LowRankDirections:
        """Per layer S (q, r_l, r_l) from ``fold_in(fold_in(key, l), "S")`` and
        z_b (q, m) from ``fold_in(fold_in(key, l), "b")``, with the current
        bases (regenerated here when they are not stored)."""
        _check_queries(num_queries)
        bases = self.bases(state, params)
        backend = backend_of(bases[0][0])
        S, scale, bias = [], [], []
        for layer, (U, V) in enumerate(bases):
            m, r = U.shape
            n = V.shape[0]
            layer_key = fold_in(key, layer)
            S.append(backend.normal(fold_in(layer_key, "S"), (num_queries, r, r), dtype=U.dtype))
            scale.append(sqrt(m * n) / r)
            bias.append(backend.normal(fold_in(layer_key, "b"), (num_queries, m), dtype=U.dtype))
        if self.layerwise:
            S, bias = self._one_layer_per_query(backend, key, S, bias, num_queries)
        return LowRankDirections(tuple(bases), tuple(S), tuple(scale), tuple(bias))

    @staticmethod
    def _one_layer_per_query(backend, key: Key, S: list, bias: list, num_queries: int):
        """S_l, z_b,l of query i kept (times √L) where layer l = (o + i) mod L, else zeroed."""
        xp = backend.xp
        L = len(S)
        offset = int(backend.to_host(backend.choice(fold_in(key, "layers"), L, 1))[0])
        for layer in range(L):
            mask = [sqrt(L) if (offset + i) % L == layer else 0.0 for i in range(num_queries)]
            m = backend.asarray(mask, dtype=S[layer].dtype)
            S[layer] = S[layer] * xp.reshape(m, (-1, 1, 1))
            bias[layer] = bias[layer] * xp.reshape(m, (-1, 1))
        return S, bias

    def layer_map(self, state, directions, query_index=None, scales=None) -> PerturbedLayers:
        xp = array_namespace(directions.S[0])
        pending = state.pending
        layers = []
        if query_index is None:
            for layer, (U, V) in enumerate(directions.bases):
                A = None if pending is None else pending[layer]
                if A is None:
                    layers.append(_LayerSpec())
                else:
                    layers.append(_LayerSpec(U=U, V=V, CT=xp.matrix_transpose(A)))
            return PerturbedLayers(layers, None)
        index, s = _query_arrays(directions.S[0], query_index, scales)
        s3 = xp.reshape(s, (-1, 1, 1))
        for layer, (U, V) in enumerate(directions.bases):
            C = _mul(xp.take(directions.S[layer], index, axis=0), directions.scale[layer] * s3)
            if pending is not None:
                C = _add(C, pending[layer])
            db = _mul(xp.take(directions.bias[layer], index, axis=0), xp.reshape(s, (-1, 1)))
            layers.append(
                _LayerSpec(
                    U=U, V=V, CT=xp.matrix_transpose(C), bias_delta=xp.expand_dims(db, axis=-2)
                )
            )
        return PerturbedLayers(layers, int(index.shape[0]))

    def zero_coordinates(self, params, num_queries: int) -> list:
        """Per layer {"W": r_l × r_l zeros, "b": m zeros}."""
        backend = backend_of(params[0]["W"])
        return [
            {
                "W": backend.zeros((self.layer_rank(p["W"].shape),) * 2, dtype=p["W"].dtype),
                "b": backend.zeros(tuple(p["b"].shape), dtype=p["b"].dtype),
            }
            for p in params
        ]

    def project(self, directions: LowRankDirections, g) -> list:
        """Per layer {"W": (c / q) Σ_i g_i S_i (r × r), "b": (1/q) Σ_i g_i z_b,i}.

        The full-space estimate (1/q) Σ_i g_i z_i is U G Vᵀ for the weights:
        since U and V are orthonormal, ‖U G Vᵀ‖_F = ‖G‖_F.
        """
        xp = array_namespace(g)
        q = g.shape[0]
        coords = []
        for S, c, zb in zip(directions.S, directions.scale, directions.bias, strict=True):
            G = xp.sum(xp.reshape(g, (q, 1, 1)) * S, axis=0) * (c / q)
            gb = xp.sum(xp.reshape(g, (q, 1)) * zb, axis=0) / q
            coords.append({"W": G, "b": gb})
        return coords

    def apply(self, state: LowRankState, params, directions, updates):
        """W ← W + U D Vᵀ (into the pending A, or in place), b ← b + d_b."""
        new_params, pending = [], []
        for layer, (p, u) in enumerate(zip(params, updates, strict=True)):
            W = p["W"]
            if state.pending is None:
                U, V = directions.bases[layer]
                W = add_low_rank(W, U, u["W"], V)
            else:
                pending.append(state.pending[layer] + u["W"])
            new_params.append({"W": W, "b": _add_vector(p["b"], u["b"])})
        if state.pending is not None:
            state = state._replace(pending=tuple(pending))
        return state, new_params

    def merge(self, state: LowRankState, params, bases=None):
        """W ← W + U A Vᵀ (in place where possible) and A ← 0."""
        if state.pending is None:
            return state, params
        bases = bases if bases is not None else self.bases(state, params)
        xp = array_namespace(params[0]["W"])
        new_params = []
        for p, (U, V), A in zip(params, bases, state.pending, strict=True):
            if bool(xp.any(A != 0)):  # r × r on the host: skip an O(mn) pass for nothing
                p = {"W": add_low_rank(p["W"], U, A, V), "b": p["b"]}
            new_params.append(p)
        zeros = tuple(xp.zeros_like(A) for A in state.pending)
        return state._replace(pending=zeros), new_params

    def evaluation_layer_map(self, state: LowRankState, params):
        """W x + U (A (Vᵀ x)) with the pending A: the current network, unmerged."""
        if state.pending is None:
            return None
        xp = array_namespace(params[0]["W"])
        layers = [
            _LayerSpec(U=U, V=V, CT=xp.matrix_transpose(A))
            for (U, V), A in zip(self.bases(state, params), state.pending, strict=True)
        ]
        return PerturbedLayers(layers, None)

    def subspace_dimension(self, params) -> int:
        """k = Σ_l (r_l² + m_l)."""
        return sum(self.layer_rank(p["W"].shape) ** 2 + p["b"].shape[0] for p in params)

    def perturbation(self, directions: LowRankDirections, layer: int, query: int):
        """The dense Z = c U S_i Vᵀ of one layer and query (m × n): for tests only."""
        xp = array_namespace(directions.S[0])
        U, V = directions.bases[layer]
        S = directions.S[layer][query, ...]
        return directions.scale[layer] * (U @ S @ xp.matrix_transpose(V))


# -- full-space Gaussian (baseline) -----------------------------------------------------------


class FullGaussianDirections(NamedTuple):
    """One step's full-space directions: the key and, per layer, Z (q, m, n) and z_b (q, m)."""

    key: Key
    W: tuple
    bias: tuple


@dataclass(frozen=True)
class FullGaussian(Sampler):
    """z ~ N(0, I_P): every weight and bias perturbed (the MeZO baseline).

    Each weight perturbation is a dense (m × n) Gaussian, so a step holds q
    P-sized arrays while it evaluates the queries; the update regenerates
    them one query at a time from their keys (seed replay). The variance of
    the estimate grows with P (docs/method.md#subspace-perturbations): this sampler is the baseline
    the subspace is measured against, not a default.
    """

    has_coordinates = False

    def init(self, key: Key, params):
        _check_params(params)
        return None

    def _weight(self, backend, key, p, query):
        return backend.normal(fold_in(fold_in(key, "W"), query), tuple(p.shape), dtype=p.dtype)

    def draw(self, state, params, key: Key, num_queries: int) -> FullGaussianDirections:
        """Z_i = N(0, I) from ``fold_in(fold_in(fold_in(key, l), "W"), i)`` and
        z_b (q, m) from ``fold_in(fold_in(key, l), "b")``."""
        _check_queries(num_queries)
        xp = array_namespace(params[0]["W"])
        backend = backend_of(params[0]["W"])
        W, bias = [], []
        for layer, p in enumerate(params):
            layer_key = fold_in(key, layer)
            W.append(
                xp.stack([self._weight(backend, layer_key, p["W"], i) for i in range(num_queries)])
            )
            m = p["b"].shape[0]
            bias.append(
                backend.normal(fold_in(layer_key, "b"), (num_queries, m), dtype=p["b"].dtype)
            )
        return FullGaussianDirections(key, tuple(W), tuple(bias))

    def layer_map(self, state, directions, query_index=None, scales=None) -> PerturbedLayers:
        if query_index is None:
            return PerturbedLayers([_LayerSpec() for _ in directions.W], None)
        xp = array_namespace(directions.W[0])
        index, s = _query_arrays(directions.W[0], query_index, scales)
        layers = []
        for Z, zb in zip(directions.W, directions.bias, strict=True):
            db = _mul(xp.take(zb, index, axis=0), xp.reshape(s, (-1, 1)))
            layers.append(
                _LayerSpec(
                    Z=Z,
                    index=index,
                    scales_3d=xp.reshape(s, (-1, 1, 1)),
                    bias_delta=xp.expand_dims(db, axis=-2),
                )
            )
        return PerturbedLayers(layers, int(index.shape[0]))

    def zero_coordinates(self, params, num_queries: int) -> list:
        """Per layer {"W": q zeros (one weight per regenerated Z_i), "b": m zeros}."""
        backend = backend_of(params[0]["W"])
        return [
            {
                "W": backend.zeros((num_queries,), dtype=p["W"].dtype),
                "b": backend.zeros(tuple(p["b"].shape), dtype=p["b"].dtype),
            }
            for p in params
        ]

    def project(self, directions: FullGaussianDirections, g) -> list:
        """Per layer {"W": g / q (the weights of the q regenerated Z_i), "b": (1/q) Σ g_i z_b,i}."""
        xp = array_namespace(g)
        q = g.shape[0]
        return [
            {"W": g / q, "b": xp.sum(xp.reshape(g, (q, 1)) * zb, axis=0) / q}
            for zb in directions.bias
        ]

    def apply(self, state, params, directions: FullGaussianDirections, updates):
        """W ← W + Σ_i u_i Z_i, each Z_i regenerated from its key; b ← b + d_b."""
        backend = backend_of(params[0]["W"])
        host = backend.to_host
        new_params = []
        for layer, (p, u) in enumerate(zip(params, updates, strict=True)):
            W = p["W"]
            layer_key = fold_in(directions.key, layer)
            for i, coefficient in enumerate(host(u["W"]).tolist()):
                Z = self._weight(backend, layer_key, W, i)
                if array_api_compat.is_writeable_array(W):
                    W += coefficient * Z
                else:
                    W = W + coefficient * Z
            new_params.append({"W": W, "b": _add_vector(p["b"], u["b"])})
        return state, new_params
