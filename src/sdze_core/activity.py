"""Per-sample activity perturbations: zeroth-order layer gradients whose variance
does not grow with d or P (docs/sdze.md, "Activity perturbation").

A PINN loss is a mean of per-point terms, ℓ = (1/B) Σ_b ℓ_b, and the gradient
of ℓ_b with respect to layer l's weights is a sum of outer products

    ∇_{W_l} ℓ_b = Σ_k δ_{b,k} ⊗ in_{b,k},

over the jet coefficients k of the layer (the primal, one coefficient per
direction and order, the collapsed top): δ_{b,k} = ∂ℓ_b/∂a_{b,k} is the
gradient with respect to the pre-activation coefficient a_{b,k} = W_l in_{b,k}
(+ b_l for the primal) and in_{b,k} is the layer's input coefficient.

The estimator perturbs the activities instead of the weights. For layer l it
draws, per point, ζ_b ~ N(0, I) over all of the layer's pre-activation
coefficients, evaluates the network with a_{b,k} ± ε ζ_{b,k} (the layers below
l are computed once, unperturbed, and shared), reads the per-point difference

    g_b = (ℓ_b(a + εζ) − ℓ_b(a − εζ)) / 2ε ≈ ⟨δ_b, ζ_b⟩

with the SAME points and oracle draws on both sides (CRNS), and forms

    Ĝ_l = (1/B) Σ_b g_b Σ_k ζ_{b,k} ⊗ in_{b,k},     ĝ_{b_l} = (1/B) Σ_b g_b ζ_{b,0}.

E[ζ ζᵀ] = I makes Ĝ_l unbiased for ∇_{W_l} ℓ (up to O(ε²)); its relative
variance is about (coefficients per point) / B, whatever d and P are. With
``estimator="forward"`` the difference is replaced by the exact directional
derivative g_b = Im ℓ_b(a + i h ζ) / h (complex step, no cancellation).

Ĝ_l is never stored whole: it is the factored pair (g ζ)ᵀ and the inputs. For
the first layer along coordinate directions the inputs are the points x (the
batch itself) and e_j, so its update is one (m × B)(B × d) product, the cost
of the forward x Wᵀ, plus V gathered columns. ζ is regenerated from its key
when the update is formed (seed replay); nothing P-sized is allocated besides
the parameters (and the optimizer's moments when an optimizer keeps them).

The perturbation is owned by a model wrapper (:class:`ActivityPerturbedNetwork`),
put into the loss's model with :func:`~sdze_core.models.with_network` and the
model into the loss with :func:`~sdze_core.objectives.with_model`, as the
subspace perturber does with its layer map (docs/sdze.md, "The perturbation
belongs to the model"): oracles and losses evaluate it like any network.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import array_api_compat
from array_api_compat import array_namespace

from . import jets
from .keys import Key, fold_in
from .models import with_network
from .objectives import model_of, with_model
from .perturbers import _COMPLEX_STEP, ESTIMATORS, NonFiniteLossError, _dtype_name, default_eps
from .perturbers import NonFiniteUpdateError as _EngineUpdateError
from .registry import backend_of

__all__ = [
    "ActivityPerturbedNetwork",
    "ActivityPerturbation",
    "ActivityState",
    "LayerGradient",
    "activity_sgd",
    "activity_adam",
    "activity_adafactor",
    "ACTIVITY_OPTIMIZERS",
    "NonFiniteUpdateError",
]

#: Largest temporary (elements) when a first-layer update is streamed over columns.
_CHUNK_ELEMENTS = 1 << 20



def _is_index_array(directions) -> bool:
    xp = array_namespace(directions)
    return xp.isdtype(directions.dtype, "integral")


def _matmul(a, b):
    xp = array_namespace(a, b)
    if a.dtype != b.dtype:
        if xp.isdtype(a.dtype, "complex floating"):
            b = xp.astype(b, a.dtype)
        elif xp.isdtype(b.dtype, "complex floating"):
            a = xp.astype(a, b.dtype)
    return a @ b


def _affine(jet: jets.Jet, W, b) -> jets.Jet:
    """x Wᵀ + b on the primal, x Wᵀ on every coefficient (complex-aware)."""
    xp = array_namespace(W)
    WT = xp.matrix_transpose(W)

    def fn(y, is_primal):
        # one 2-D product: a batched (…, B, n) @ (n, m) is several times slower on NumPy
        lead = tuple(y.shape[:-1])
        out = xp.reshape(_matmul(xp.reshape(y, (-1, y.shape[-1])), WT), (*lead, WT.shape[-1]))
        return out + b if is_primal else out

    return jets.linear_map(jet, fn)


def _slots(jet: jets.Jet) -> list:
    """The jet's coefficient arrays in slot order: primal, then f_1, ..., f_K."""
    return [jet.primal, *jet.coeffs]


def _rebuild(template: jets.Jet, slots: list) -> jets.Jet:
    return type(template)(slots[0], tuple(slots[1:]))


def _zeta_shape(c, batch: int) -> tuple:
    """Per-point shape of a coefficient (…, B or 1, m): the batch axis made B."""
    shape = tuple(c.shape)
    return shape[:-2] + (batch, shape[-1])


# -- the perturbed network ----------------------------------------------------------------------


class _Call(NamedTuple):
    """What one jet evaluation leaves for the update: its key, each layer's
    input coefficients, and the shapes of the ζ drawn per slot (None: not drawn)."""

    key: Key
    inputs: tuple  # per layer: ("index", x, j) for the first layer along e_j (j an index
    # array or SparseDirections), else a Jet
    zeta_shapes: tuple  # per perturbed layer: tuple of shapes or None per slot
    points: int  # id() of the points x: calls on the same points share their losses
    batch: int


def draw_zeta(call_key: Key, layer: int, shapes, like) -> list:
    """ζ of one layer: per slot k, N(0, I) from ``fold_in(fold_in(call_key, layer), k)``."""
    backend = backend_of(like)
    layer_key = fold_in(call_key, layer)
    dtype = like.dtype
    xp = array_namespace(like)
    if xp.isdtype(dtype, "complex floating"):
        dtype = xp.float64 if dtype == xp.complex128 else xp.float32
    return [
        None if s is None else backend.normal(fold_in(layer_key, k), s, dtype=dtype)
        for k, s in enumerate(shapes)
    ]


@dataclass(frozen=True, eq=False)
class ActivityPerturbedNetwork:
    """An :class:`~sdze_core.models.MLP` whose jets carry the activity-perturbed copies.

    ``jet(...)`` returns a jet with a query axis (after the direction axes) of
    size 1 + len(scales) · len(layers): query 0 is the unperturbed network,
    then for each perturbed layer l (in ``layers`` order) one query per scale
    s, with a_{b,k} + s ζ_{b,k} at layer l's pre-activation coefficients. The
    layers below l are shared. Each call appends a record (its inputs and ζ
    shapes) to ``calls`` for the update.

    Parameters
    ----------
    network : MLP
    key : Key
        The step's perturbation key; call c draws ζ from ``fold_in(key, c)``.
    scales : tuple
        (ε, −ε) for central differences, (i h,) for the complex step.
    layers : tuple of int
        The layers perturbed (default all).
    """

    network: Any
    key: Key
    scales: tuple
    layers: tuple
    calls: list = field(default_factory=list)

    #: :meth:`jet` takes :class:`~sdze_core.jets.SparseDirections` (gathered columns).
    sparse_directions: ClassVar[bool] = True

    @property
    def sizes(self):
        return self.network.sizes

    @property
    def num_layers(self) -> int:
        return self.network.num_layers

    @property
    def num_queries(self) -> int:
        return 1 + len(self.scales) * len(self.layers)

    def apply(self, params, x):
        """The unperturbed output (used only for evaluation)."""
        return self.network.apply(params, x)

    def _forward(self, params, h: jets.Jet, start: int) -> jets.Jet:
        """Layers start .. L−1 applied to the pre-activation jet of layer start − 1."""
        act = self.network.activation
        for layer in range(start, self.num_layers):
            h = _affine(jets.elementwise(h, act), params[layer]["W"], params[layer]["b"])
        return h

    def jet(self, params, x, directions, order: int, collapse: bool = False):
        """The jets of the unperturbed and the perturbed networks (see the class docstring)."""
        net = self.network
        net._check(params, x)
        batch = x.shape[0]
        first = params[0]
        if isinstance(directions, jets.SparseDirections) or _is_index_array(directions):
            W = first["W"]
            # the backend's form: never a transposed copy of W (JAX sums column blocks)
            primal = backend_of(W).matmul_transposed(x, W) + first["b"]
            pre = [jets.coordinate_jet(primal, _gather(W, directions), order, collapse)]
            inputs = [("index", x, directions)]
        else:
            h = jets.input_jet(x, directions, order, collapse)
            pre = [_affine(h, first["W"], first["b"])]
            inputs = [h]
        act = net.activation
        for layer in range(1, self.num_layers):
            h = jets.elementwise(pre[-1], act)
            inputs.append(h)
            pre.append(_affine(h, params[layer]["W"], params[layer]["b"]))
        call_key = fold_in(self.key, len(self.calls))
        outputs = [_with_query_axis(pre[-1], None, None)]
        shapes = []
        for layer in self.layers:
            layer_shapes = [
                None if c is None else _zeta_shape(c, batch) for c in _slots(pre[layer])
            ]
            zeta = draw_zeta(call_key, layer, layer_shapes, pre[layer].primal)
            perturbed = _with_query_axis(pre[layer], zeta, self.scales)
            outputs.append(self._forward(params, perturbed, layer + 1))
            shapes.append(tuple(layer_shapes))
        self.calls.append(_Call(call_key, tuple(inputs), tuple(shapes), id(x), batch))
        out = _concat_queries(outputs)
        return jets.linear_map(out, lambda y, is_primal: net._squeeze(y))


def _gather(W, directions):
    """W[:, j] for index directions j, Σ_j w_j W[:, i_j] for sparse ones: (m, V)."""
    xp = array_namespace(W)
    if not isinstance(directions, jets.SparseDirections):
        return xp.take(W, directions, axis=1)
    gathered = xp.take(W, xp.reshape(directions.index, (-1,)), axis=1)
    return jets.combine_columns(gathered, directions.weights)


def _spread_columns(directions, cols):
    """(index, columns) of Σ_v c_v ⊗ v: for sparse v = Σ_j w_j e_{i_j}, the columns
    w_j c_v at the flattened i_j, (m, V k); index directions are returned as they are."""
    if not isinstance(directions, jets.SparseDirections):
        return directions, cols
    xp = array_namespace(cols)
    index, weights = directions
    m, (V, k) = cols.shape[0], weights.shape
    spread = xp.expand_dims(cols, axis=-1) * xp.astype(weights, cols.dtype)
    return xp.reshape(index, (-1,)), xp.reshape(spread, (m, V * k))


def _with_query_axis(jet: jets.Jet, zeta, scales) -> jets.Jet:
    """Insert the query axis before (B, m) in every slot; with ζ, slot k of query q
    is a_k + s_q ζ_k (Q = len(scales))."""
    slots = _slots(jet)
    out = []
    for k, c in enumerate(slots):
        if c is None:
            out.append(None)
            continue
        xp = array_namespace(c)
        c = xp.expand_dims(c, axis=c.ndim - 2)
        if zeta is not None and zeta[k] is not None:
            z = xp.expand_dims(zeta[k], axis=zeta[k].ndim - 2)
            terms = [c + s * z for s in scales]
            c = xp.concat(terms, axis=c.ndim - 3)
        out.append(c)
    return _rebuild(jet, out)


def _concat_queries(outputs: list) -> jets.Jet:
    """Concatenate jets along their query axis (the third axis from the end)."""
    first = outputs[0]
    slots = []
    for k in range(len(_slots(first))):
        parts = [_slots(j)[k] for j in outputs]
        present = [p for p in parts if p is not None]
        if not present:
            slots.append(None)
            continue
        xp = array_namespace(*present)
        dtype = present[0].dtype
        for p in present[1:]:
            dtype = xp.result_type(dtype, p.dtype)
        ndim = max(p.ndim for p in present)
        lead = [1] * (ndim - 3)
        tail = [1, 1]
        for p in present:
            shape = (1,) * (ndim - p.ndim) + tuple(p.shape)
            lead = [max(a, b) for a, b in zip(lead, shape[:-3], strict=True)]
            tail = [max(a, b) for a, b in zip(tail, shape[-2:], strict=True)]
        full = []
        for p, j in zip(parts, outputs, strict=True):
            q = j.primal.shape[-3] if j.primal.ndim >= 3 else 1
            shape = (*lead, q, *tail)
            if p is None:
                full.append(xp.zeros(shape, dtype=dtype))
            else:
                p = xp.reshape(p, (1,) * (ndim - p.ndim) + tuple(p.shape))
                full.append(xp.broadcast_to(xp.astype(p, dtype), shape))
        slots.append(xp.concat(full, axis=ndim - 3))
    return _rebuild(first, slots)


# -- factored layer gradients -------------------------------------------------------------------


@dataclass
class LayerGradient:
    """Ĝ_l = Σ_k Lₖᵀ Rₖ (+ columns at ``index``) and the bias gradient, factored.

    Attributes
    ----------
    left : list of arrays (R_k, m)
        (1/B) g_b ζ_{b,k} stacked over points (and directions).
    right : list of arrays (R_k, n)
        The matching input coefficients.
    index, columns : array (V,), array (m, V) or None
        First layer along e_j: Ĝ[:, j_v] += columns[:, v].
    bias : array (m,)
    """

    left: list
    right: list
    bias: Any
    index: Any = None
    columns: Any = None

    @property
    def shape(self) -> tuple:
        return (int(self.bias.shape[0]), int(self.right[0].shape[-1]))

    def block(self, start: int, stop: int):
        """Ĝ[:, start:stop], formed from the factors."""
        xp = array_namespace(self.bias)
        out = None
        for L, R in zip(self.left, self.right, strict=True):
            term = xp.matrix_transpose(L) @ R[:, start:stop]
            out = term if out is None else out + term
        if self.index is not None:
            # the gathered columns inside [start, stop): a one-hot product, V × (stop − start)
            cols = xp.arange(start, stop, dtype=self.index.dtype)
            hot = xp.astype(xp.expand_dims(self.index, axis=1) == cols, self.columns.dtype)
            out = out + self.columns @ hot
        return out

    def dense(self):
        """Ĝ as one (m, n) array."""
        return self.block(0, self.shape[1])


def _column_chunks(m: int, n: int):
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _writeable(x) -> bool:
    return array_api_compat.is_writeable_array(x)


class _BlockStream:
    """Ĝ[:, start:stop] of a factored gradient, chunk by chunk, formed in two (m × chunk)
    buffers allocated once (writeable backends: NumPy, PyTorch, CuPy).

    :meth:`LayerGradient.block` allocates its product and every elementwise
    result per chunk; at d = 10⁶ that is ~10³ short-lived 4 MB arrays a step,
    which glibc's allocator serves from a heap that it then cannot give back
    (PyTorch's peak RSS was 1.9 × parameters + batch). Here the products go
    into the buffers through :meth:`Backend.matmul_into` and the squares through
    :meth:`Backend.multiply_into`, and the scalings are in place: the values
    are those of :meth:`LayerGradient.block`, bit for bit.
    """

    def __init__(self, grad: LayerGradient):
        like = grad.left[0]
        xp = array_namespace(like)
        self.grad, self.xp, self.backend = grad, xp, backend_of(like)
        m, n = grad.shape
        self.chunks = _column_chunks(m, n)
        width = self.chunks[0][1] - self.chunks[0][0]
        dtype = like.dtype
        for a in (*grad.left, *grad.right):
            dtype = xp.result_type(dtype, a.dtype)
        device = array_api_compat.device(like)
        self._flat = [xp.empty((m * width,), dtype=dtype, device=device) for _ in range(2)]
        self._hit = set()  # the chunks holding gathered columns
        if grad.index is not None:
            self._hit = {int(grad.index[v]) // width for v in range(grad.index.shape[0])}
        self._width = width

    def _buffer(self, which: int, columns: int):
        m = self.grad.shape[0]
        return self.xp.reshape(self._flat[which][: m * columns], (m, columns))

    def block(self, start: int, stop: int):
        """Ĝ[:, start:stop] in buffer 0 (valid until the next call)."""
        xp, g, into = self.xp, self.grad, self.backend.matmul_into
        out = None
        for L, R in zip(g.left, g.right, strict=True):
            if out is None:
                out = into(xp.matrix_transpose(L), R[:, start:stop], self._buffer(0, stop - start))
            else:
                out += into(xp.matrix_transpose(L), R[:, start:stop], self._buffer(1, stop - start))
        if start // self._width in self._hit:  # elsewhere the one-hot product is all zeros
            cols = xp.arange(start, stop, dtype=g.index.dtype)
            hot = xp.astype(xp.expand_dims(g.index, axis=1) == cols, g.columns.dtype)
            out += into(g.columns, hot, self._buffer(1, stop - start))
        return out

    def square(self, blk):
        """blk² in buffer 1 (valid until the next call)."""
        return self.backend.multiply_into(blk, blk, self._buffer(1, blk.shape[1]))


def _apply_blocks(W, grad: LayerGradient, fn):
    """W + fn(Ĝ[:, c], c) for column chunks c: in place when W is writeable, with
    Ĝ[:, c] in a reused buffer that ``fn`` may scale in place (:class:`_BlockStream`);
    otherwise (JAX) chunk by chunk through :meth:`Backend.write_columns`, which
    reuses W's buffer, so that neither Ĝ nor a second W is ever whole in memory."""
    m, n = W.shape
    if _writeable(W):
        stream = _BlockStream(grad)
        for start, stop in stream.chunks:
            W[:, start:stop] += fn(stream.block(start, stop), start, stop)
        return W
    backend = backend_of(W)
    for start, stop in _column_chunks(m, n):
        W = backend.write_columns(W, start, W[:, start:stop] + fn(grad.block(start, stop),
                                                                   start, stop))
    return W


# -- optimizers on factored gradients -----------------------------------------------------------


class NonFiniteUpdateError(FloatingPointError):
    """The step's update (or the optimizer's new state) is not finite: nothing was applied."""


class ActivityOptimizer(NamedTuple):
    """``init(params) -> state``; ``plan(params, grads, state, step) -> (plan, state)``
    computes the step and the new state without touching the parameters and raises
    :class:`NonFiniteUpdateError` if anything in them is not finite;
    ``commit(params, grads, plan, state) -> (params, state)`` applies it (in place
    where the arrays are writeable), completing any statistics that are gathered
    while the step is streamed. ``memory`` says what the state holds.
    """

    init: Any
    plan: Any
    commit: Any
    memory: str


def _check_finite(what: str, arrays) -> None:
    for a in arrays:
        if a is None:
            continue
        xp = array_namespace(a)
        if not bool(xp.all(xp.isfinite(a))):
            raise NonFiniteUpdateError(f"the {what} is not finite; the step was not applied")


def _gradient_arrays(grads):
    for g in grads:
        yield from g.left
        yield g.bias
        yield g.columns


class AdafactorState(NamedTuple):
    """Per layer: row (m,) and column (n,) second moments of Ĝ, the bias's (m,),
    and the first moments of the layers that keep momentum (None elsewhere)."""

    count: int
    rows: tuple
    cols: tuple
    bias: tuple
    mu: tuple
    mu_bias: tuple


class AdamLayerState(NamedTuple):
    """P-sized Adam moments (one (m, n) pair per layer, one (m,) pair per bias)."""

    count: int
    mu: tuple
    nu: tuple
    mu_bias: tuple
    nu_bias: tuple


def _schedule(learning_rate):
    from .optimizers import as_schedule

    return as_schedule(learning_rate)


def _add(x, delta):
    if _writeable(x):
        x += delta
        return x
    return x + delta


def _zeros_like(a):
    return array_namespace(a).zeros_like(a)


def _commit_dense(params, grads, plan, state):
    """W += ΔW, b += Δb for a plan of dense steps ((ΔW, Δb) per layer)."""
    out = [
        {"W": _add(p["W"], dW), "b": _add(p["b"], db)}
        for p, (dW, db) in zip(params, plan, strict=True)
    ]
    return out, state


def activity_sgd(learning_rate=1e-3) -> ActivityOptimizer:
    """W_l ← W_l − η_t Ĝ_l, streamed over column chunks; no state."""
    schedule = _schedule(learning_rate)

    def init(params):
        return ()

    def plan(params, grads, state, step):
        _check_finite("gradient estimate", _gradient_arrays(grads))
        return schedule(step), state

    def commit(params, grads, lr, state):
        out = []
        for p, g in zip(params, grads, strict=True):
            W = _apply_blocks(p["W"], g, lambda blk, a, b: _scale_block(blk, -lr))
            out.append({"W": W, "b": _add(p["b"], -lr * g.bias)})
        return out, state

    return ActivityOptimizer(init, plan, commit, "none")


def activity_adam(learning_rate=1e-3, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8):
    """Adam on Ĝ with P-sized moments m, v (2 P floats: an explicit option).

    m ← b1 m + (1 − b1) Ĝ, v ← b2 v + (1 − b2) Ĝ², W ← W − η_t m̂ / (√v̂ + eps).
    """
    schedule = _schedule(learning_rate)

    def init(params):
        return AdamLayerState(
            0,
            tuple(_zeros_like(p["W"]) for p in params),
            tuple(_zeros_like(p["W"]) for p in params),
            tuple(_zeros_like(p["b"]) for p in params),
            tuple(_zeros_like(p["b"]) for p in params),
        )

    def plan(params, grads, state, step):
        count = state.count + 1
        lr = schedule(step)
        c1, c2 = 1 - b1**count, 1 - b2**count
        steps, mus, nus, mbs, nbs = [], [], [], [], []
        for g, mu, nu, mb, nb in zip(
            grads, state.mu, state.nu, state.mu_bias, state.nu_bias, strict=True
        ):
            xp = array_namespace(mu)
            G = g.dense()
            mu = b1 * mu + (1 - b1) * G
            nu = b2 * nu + (1 - b2) * G * G
            mb = b1 * mb + (1 - b1) * g.bias
            nb = b2 * nb + (1 - b2) * g.bias * g.bias
            steps.append(
                (
                    (-lr / c1) * mu / (xp.sqrt(nu / c2) + eps),
                    (-lr / c1) * mb / (xp.sqrt(nb / c2) + eps),
                )
            )
            mus.append(mu), nus.append(nu), mbs.append(mb), nbs.append(nb)
        _check_finite("Adam step", (a for pair in steps for a in pair))
        return steps, AdamLayerState(count, tuple(mus), tuple(nus), tuple(mbs), tuple(nbs))

    return ActivityOptimizer(init, plan, _commit_dense, "2 P (Adam moments)")


def activity_adafactor(
    learning_rate=1e-3,
    b1: float = 0.9,
    b2: float = 0.99,
    eps: float = 1e-30,
    momentum_max_size: int = 1 << 20,
):
    """Adam with factored second moments (Adafactor's, Shazeer & Stern 2018).

    Per weight matrix only a row vector R (m,) and a column vector C (n,) are
    kept: R ← b2 R + (1 − b2) mean_j Ĝ², C ← b2 C + (1 − b2) mean_i Ĝ², and
    v̂_ij = R_i C_j / mean(R) / (1 − b2^t) stands for Adam's v_ij. Biases keep
    (m,) moments. Momentum (b1) is kept, P-sized, only for matrices of at most
    ``momentum_max_size`` entries (the hidden layers); larger ones (the first
    layer at large d) step with Ĝ itself, so the state is m + n numbers per
    large matrix. A large matrix's Ĝ is streamed once over column chunks
    (one (m × B)(B × d) product): its step is scaled by the statistics up to
    the previous step, and this step's Ĝ² is added to them in the same pass
    (at the first step, which has no statistics, Ĝ is streamed twice).
    """
    schedule = _schedule(learning_rate)

    def init(params):
        def zeros(n, like):
            xp = array_namespace(like)
            return xp.zeros((n,), dtype=like.dtype, device=array_api_compat.device(like))

        rows = tuple(zeros(p["W"].shape[0], p["W"]) for p in params)
        cols = tuple(zeros(p["W"].shape[1], p["W"]) for p in params)
        small = [math.prod(p["W"].shape) <= momentum_max_size for p in params]
        mu = tuple(_zeros_like(p["W"]) if s else None for p, s in zip(params, small, strict=True))
        biases = tuple(_zeros_like(p["b"]) for p in params)
        return AdafactorState(0, rows, cols, biases, mu, tuple(_zeros_like(p["b"]) for p in params))

    def plan(params, grads, state, step):
        count = state.count + 1
        lr = schedule(step)
        c1, c2 = 1 - b1**count, 1 - b2**count
        steps, rows, cols, nbs, mus, mbs = [], [], [], [], [], []
        for g, R, C, nb, mu, mb in zip(
            grads, state.rows, state.cols, state.bias, state.mu, state.mu_bias, strict=True
        ):
            xp = array_namespace(R)
            m, n = g.shape
            if mu is not None:
                G = g.dense()
                R = b2 * R + (1 - b2) * xp.mean(G * G, axis=1)
                C = b2 * C + (1 - b2) * xp.mean(G * G, axis=0)
                mu = b1 * mu + (1 - b1) * G
                weight = ("dense", (-lr / c1) * mu * _factored_scale(R, C, c2, eps))
            else:
                if state.count == 0:  # no statistics yet: this step's, by a first pass
                    row_sq, col_sq = _squared_sums(g)
                    R = b2 * R + (1 - b2) * row_sq
                    C = b2 * C + (1 - b2) * col_sq
                    correction = c2
                else:  # the statistics up to the previous step; this one's in commit
                    correction = 1 - b2 ** (count - 1)
                r_scale = 1.0 / xp.sqrt(R / (xp.mean(R) * correction + eps) + eps)
                c_scale = 1.0 / xp.sqrt(C + eps)
                weight = ("streamed", (-lr * r_scale, c_scale, state.count > 0))
            mb = b1 * mb + (1 - b1) * g.bias
            nb = b2 * nb + (1 - b2) * g.bias * g.bias
            steps.append((weight, (-lr / c1) * mb / (xp.sqrt(nb / c2) + 1e-8)))
            rows.append(R), cols.append(C), nbs.append(nb), mus.append(mu), mbs.append(mb)
        _check_finite("Adafactor step", [a for a in rows + cols + nbs])
        _check_finite("Adafactor step", [w[1] for (w, _) in steps if w[0] == "dense"])
        _check_finite("Adafactor step", [db for (_, db) in steps])
        _check_finite("gradient estimate", _gradient_arrays(grads))
        new = AdafactorState(count, tuple(rows), tuple(cols), tuple(nbs), tuple(mus), tuple(mbs))
        return steps, new

    def commit(params, grads, plan, state):
        out, rows, cols = [], list(state.rows), list(state.cols)
        for layer, (p, g, ((kind, w), db)) in enumerate(zip(params, grads, plan, strict=True)):
            if kind == "dense":
                W = _add(p["W"], w)
            else:
                r_step, c_scale, gather = w
                xp = array_namespace(r_step)
                row_sq, col_sq = [], []

                def step_of(
                    blk, a, b, r_step=r_step, c_scale=c_scale, gather=gather,
                    xp=xp, row_sq=row_sq, col_sq=col_sq,
                ):
                    if gather:
                        sq = blk * blk
                        row_sq.append(xp.sum(sq, axis=1))
                        col_sq.append(xp.mean(sq, axis=0))
                    return (blk * r_step[:, None]) * c_scale[a:b]

                if _writeable(p["W"]):  # one pass per chunk, in reused buffers
                    W, row, col = _commit_streamed(p["W"], g, r_step, c_scale, gather)
                    if gather:
                        rows[layer] = b2 * rows[layer] + (1 - b2) * row
                        cols[layer] = b2 * cols[layer] + (1 - b2) * col
                    out.append({"W": W, "b": _add(p["b"], db)})
                    continue
                W = _apply_blocks(p["W"], g, step_of)
                if gather:
                    n = p["W"].shape[1]
                    rows[layer] = b2 * rows[layer] + (1 - b2) * (sum(row_sq) / n)
                    cols[layer] = b2 * cols[layer] + (1 - b2) * xp.concat(col_sq)
            out.append({"W": W, "b": _add(p["b"], db)})
        return out, state._replace(rows=tuple(rows), cols=tuple(cols))

    return ActivityOptimizer(
        init, plan, commit, "m + n per large matrix; P-sized momentum for small ones"
    )


def _scale_block(blk, factor):
    """blk · factor, in place when blk is writeable (a chunk's own buffer)."""
    if _writeable(blk):
        blk *= factor
        return blk
    return blk * factor


def _commit_streamed(W, g: LayerGradient, r_step, c_scale, gather: bool):
    """W[:, c] += (Ĝ[:, c] · r_step) · c_scale[c] over column chunks c, in place, and
    (with ``gather``) this step's (mean_j Ĝ_ij², mean_i Ĝ_ij²) from the same pass.

    The values are those of the functional path in ``activity_adafactor``'s commit,
    bit for bit; Ĝ[:, c] and its square live in :class:`_BlockStream`'s two buffers."""
    xp = array_namespace(W)
    m, n = W.shape
    stream = _BlockStream(g)
    row = col = None
    if gather:
        row = xp.zeros((m,), dtype=W.dtype, device=array_api_compat.device(W))
        col = xp.empty((n,), dtype=W.dtype, device=array_api_compat.device(W))
    r_step = r_step[:, None]
    for start, stop in stream.chunks:
        blk = stream.block(start, stop)
        if gather:
            sq = stream.square(blk)
            row += xp.sum(sq, axis=1)
            col[start:stop] = xp.mean(sq, axis=0)
        blk *= r_step
        blk *= c_scale[start:stop]
        W[:, start:stop] += blk
    return W, (row / n if gather else None), col


def _squared_sums(g: LayerGradient):
    """(mean_j Ĝ_ij², mean_i Ĝ_ij²) of a factored gradient, streamed over column chunks."""
    xp = array_namespace(g.bias)
    m, n = g.shape
    if _writeable(g.left[0]):  # in two reused buffers (:class:`_BlockStream`)
        stream = _BlockStream(g)
        row_sq = xp.zeros((m,), dtype=g.bias.dtype, device=array_api_compat.device(g.bias))
        col_sq = xp.empty((n,), dtype=g.bias.dtype, device=array_api_compat.device(g.bias))
        for start, stop in stream.chunks:
            sq = stream.square(stream.block(start, stop))
            row_sq += xp.sum(sq, axis=1)
            col_sq[start:stop] = xp.mean(sq, axis=0)
        return row_sq / n, col_sq
    row_sq, col_sq = 0.0, []
    for start, stop in _column_chunks(m, n):
        sq = g.block(start, stop) ** 2
        row_sq = row_sq + xp.sum(sq, axis=1)
        col_sq.append(xp.mean(sq, axis=0))
    return row_sq / n, xp.concat(col_sq)


def _factored_scale(R, C, c2, eps):
    """1 / (√v̂ + 1e-8) with v̂_ij = R_i C_j / mean(R) / c2, as the product of a row
    and a column factor: R_i C_j itself overflows float32 when the loss is ~1e12."""
    xp = array_namespace(R)
    rows = xp.sqrt(R / (xp.mean(R) * c2 + eps) + eps)  # + eps: a layer not trained has R = 0
    return 1.0 / (rows[:, None] * xp.sqrt(C + eps)[None, :] + 1e-8)


#: The optimizers of :class:`ActivityPerturbation` by name.
ACTIVITY_OPTIMIZERS = {"sgd": activity_sgd, "adam": activity_adam, "adafactor": activity_adafactor}


# -- the engine ---------------------------------------------------------------------------------


class ActivityState(NamedTuple):
    """The run's state: the next step t, the run's step key, the optimizer's state."""

    step: int
    key: Key
    optimizer: Any


class ActivityStepInfo(NamedTuple):
    """What a step reports: ``loss`` = ℓ(θ; ξ_t) (host float, the unperturbed loss)."""

    loss: float
    g: Any


def _loss_model(loss):
    """The loss's model, once the loss is known to give per-point residuals of another model."""
    if not hasattr(loss, "residuals") or not dataclasses.is_dataclass(loss):
        raise TypeError(
            "activity perturbation needs per-point residuals: the loss must be a "
            "ResidualLoss-like dataclass with a `model` field and a `residuals` method, "
            f"got {type(loss).__name__}"
        )
    return model_of(loss, "activity perturbation")


def _per_point_losses(loss, params, xi, model):
    """ℓ_b for every query: (Q, B), from the loss's residuals with ``model``."""
    r = with_model(loss, model, "activity perturbation").residuals(params, xi)
    return r[0] * r[1] if len(r) == 2 else r[0] * r[0]


def _perturbed_model(model, wrapper_args):
    """The model with its network replaced by the activity-perturbed one."""
    return with_network(
        model,
        lambda network: ActivityPerturbedNetwork(network, *wrapper_args),
        "activity perturbation",
    )


@dataclass(frozen=True)
class ActivityPerturbation:
    """Zeroth-order training with per-sample activity perturbations (see the module docstring).

    Parameters
    ----------
    optimizer : ActivityOptimizer
        Default :func:`activity_adafactor` (η = 1e-3).
    eps : float, optional
        ε of the central differences (default 1e-3 in float32, 1e-5 in float64).
    estimator : {"central", "forward"}
        Central differences with CRNS, or the complex-step directional derivative.
    num_queries : int
        Independent ζ draws per layer and step (their estimates are averaged).
    layers : tuple of int, optional
        The layers to train (default all).
    crns : bool
        Share the points and oracle draws between the ± sides (default). ``False``
        evaluates the + side on ξ⁺ and the − side on ξ⁻, independent (the
        ablation): the O(1) difference ℓ_b(ξ⁺) − ℓ_b(ξ⁻) then makes the
        second moment grow as ε⁻². The update uses the + side's inputs.
    """

    optimizer: ActivityOptimizer = field(default_factory=activity_adafactor)
    eps: float | None = None
    estimator: str = "central"
    num_queries: int = 1
    layers: tuple | None = None
    crns: bool = True

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.eps is not None and not (math.isfinite(float(self.eps)) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")
        q = self.num_queries
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"num_queries must be an integer >= 1, got {q!r}")
        if self.estimator == "forward" and not self.crns:
            raise ValueError("the forward gradient has no ± sides: crns=False does not apply")

    def init(self, key: Key, params) -> ActivityState:
        """State for a run from ``key`` (step keys from ``fold_in(key, "steps")``)."""
        return ActivityState(0, fold_in(key, "steps"), self.optimizer.init(params))

    def step_keys(self, state: ActivityState) -> tuple[Key, Key]:
        from .engine import step_keys

        return step_keys(state.key, state.step)

    def _scales(self, params):
        if self.estimator == "forward":
            h = _COMPLEX_STEP[_dtype_name(params[0]["W"])]
            return (complex(0.0, h),), h
        eps = float(self.eps) if self.eps is not None else default_eps(_dtype_name(params[0]["W"]))
        return (eps, -eps), eps

    def estimate(self, loss, params, spatial_key: Key, param_key: Key):
        """``(grads, loss_value, losses)``: per layer a :class:`LayerGradient` (``None``
        when a loss is not finite), the unperturbed loss ℓ(θ; ξ) and the per-point
        losses (Q, N) of the last query round (query 0 unperturbed)."""
        plain = _loss_model(loss)
        layers = tuple(range(len(params))) if self.layers is None else tuple(self.layers)
        scales, size = self._scales(params)
        if self.crns:
            xi = loss.sample(spatial_key)
        else:
            xi = loss.sample(fold_in(spatial_key, "plus"))
            xi_minus = loss.sample(fold_in(spatial_key, "minus"))
        grads = [None] * len(params)
        value = None
        for query in range(self.num_queries):
            network_key = fold_in(param_key, query)
            if self.crns:
                model = _perturbed_model(plain, (network_key, scales, layers))
                losses = _per_point_losses(loss, params, xi, model)
            else:
                model = _perturbed_model(plain, (network_key, scales[:1], layers))
                minus = _perturbed_model(plain, (network_key, scales[1:], layers))
                plus_losses = _per_point_losses(loss, params, xi, model)
                minus_losses = _per_point_losses(loss, params, xi_minus, minus)
                losses = _interleave(plus_losses, minus_losses)
            net = model if isinstance(model, ActivityPerturbedNetwork) else model.network
            xp = array_namespace(losses)
            if value is None:
                value = xp.mean(_real(losses[0, ...]))
            if not bool(xp.all(xp.isfinite(losses))):
                return None, value, losses
            for i, layer in enumerate(layers):
                if self.estimator == "forward":
                    g = xp.imag(losses[1 + i, ...]) / size
                else:
                    g = (losses[1 + 2 * i, ...] - losses[2 + 2 * i, ...]) / (2.0 * size)
                est = _layer_gradient(net.calls, params, layer, i, g)
                grads[layer] = est if grads[layer] is None else _sum_gradients(grads[layer], est)
        if self.num_queries > 1:
            grads = [
                None if g is None else _scale_gradient(g, 1.0 / self.num_queries) for g in grads
            ]
        return grads, value, losses

    def step(self, loss, params, state: ActivityState):
        """One step: ``(params, state, info)``; parameters are updated in place
        where the backend's arrays are mutable.

        Raises
        ------
        NonFiniteLossError
            If a loss is NaN or Inf; nothing is applied and the error holds the
            state before the step.
        """
        t = state.step
        spatial_key, param_key = self.step_keys(state)
        grads, value, losses = self.estimate(loss, params, spatial_key, param_key)
        if grads is None:
            raise NonFiniteLossError(
                f"step {t}: the loss is not finite at the perturbed activities; the step "
                "was not applied (the error's .params and .state hold the last good state). "
                "Lower the learning rate or eps, or check the problem.",
                step=t,
                losses=[float(value)],
                params=params,
                state=state,
            )
        grads = [
            g if g is not None else _zero_gradient(p) for g, p in zip(grads, params, strict=True)
        ]
        try:
            plan, opt_state = self.optimizer.plan(params, grads, state.optimizer, t)
        except NonFiniteUpdateError as error:
            raise _EngineUpdateError(
                f"step {t}: {error} (the error's .params and .state hold the last good state). "
                "Lower the learning rate.",
                step=t,
                losses=[float(value)],
                params=params,
                state=state,
            ) from error
        params, opt_state = self.optimizer.commit(params, grads, plan, opt_state)
        info = ActivityStepInfo(float(value), None)
        return params, ActivityState(t + 1, state.key, opt_state), info

    def merge(self, params, state):
        """Nothing is pending: ``(state, params)``."""
        return state, params

    def evaluation_model(self, model, params, state):
        """The model of the current network: ``model`` itself (nothing is pending)."""
        return model


def _interleave(plus, minus):
    """[query 0, +_0, −_0, +_1, −_1, ...] from the + pass (1 + L queries) and the − pass."""
    xp = array_namespace(plus)
    rows = [plus[0:1, ...]]
    for i in range(1, plus.shape[0]):
        rows += [plus[i : i + 1, ...], minus[i : i + 1, ...]]
    return xp.concat(rows, axis=0)


def _zero_gradient(p) -> LayerGradient:
    xp = array_namespace(p["W"])
    m, n = p["W"].shape
    z = xp.zeros((1, m), dtype=p["W"].dtype)
    return LayerGradient(
        [z], [xp.zeros((1, n), dtype=p["W"].dtype)], xp.zeros((m,), dtype=p["W"].dtype)
    )


def _sum_gradients(a: LayerGradient, b: LayerGradient) -> LayerGradient:
    xp = array_namespace(a.bias)
    if a.index is not None and b.index is not None:
        index = xp.concat([a.index, b.index])
        columns = xp.concat([a.columns, b.columns], axis=1)
    else:
        index, columns = (
            a.index if a.index is not None else b.index,
            (a.columns if a.columns is not None else b.columns),
        )
    return LayerGradient(a.left + b.left, a.right + b.right, a.bias + b.bias, index, columns)


def _scale_gradient(g: LayerGradient, c: float) -> LayerGradient:
    cols = None if g.columns is None else c * g.columns
    return LayerGradient([c * L for L in g.left], g.right, c * g.bias, g.index, cols)


def call_slices(calls) -> list:
    """Per call, the slice of the per-point losses its points own.

    A loss's per-point terms are laid out by point set, in the order the
    point sets are first evaluated; calls on the same points (the two oracle
    draws of an unbiased loss) share one slice.
    """
    offsets, out, end = {}, [], 0
    for call in calls:
        if call.points not in offsets:
            offsets[call.points] = end
            end += call.batch
        start = offsets[call.points]
        out.append(slice(start, start + call.batch))
    return out


def _real(a):
    xp = array_namespace(a)
    return xp.real(a) if xp.isdtype(a.dtype, "complex floating") else a


def _layer_gradient(calls, params, layer: int, position: int, g_all) -> LayerGradient:
    """Ĝ_layer from the per-point g (N,) and every jet call's ζ and inputs."""
    xp = array_namespace(g_all)
    g_all = _real(g_all)
    W = params[layer]["W"]
    m, n = W.shape
    left, right, index, columns, bias = [], [], None, None, None
    slices = call_slices(calls)
    total = g_all.shape[0]
    if max(s.stop for s in slices) != total:
        raise ValueError(
            f"the loss returned {total} per-point terms but its jets were evaluated on "
            f"{max(s.stop for s in slices)} points"
        )
    for call, where in zip(calls, slices, strict=True):
        g = g_all[where]
        shapes = call.zeta_shapes[position]
        zeta = draw_zeta(call.key, layer, shapes, W)
        inputs = call.inputs[layer]
        weighted = [None if z is None else z * (g[:, None] / total) for z in zeta]
        b_part = xp.sum(weighted[0], axis=0)
        bias = b_part if bias is None else bias + b_part
        if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], str):
            _, x, j = inputs
            left.append(weighted[0])
            right.append(x)
            if len(weighted) > 1 and weighted[1] is not None:
                cols = xp.matrix_transpose(xp.sum(weighted[1], axis=1))  # (m, V)
                j, cols = _spread_columns(j, cols)
                index = j if index is None else xp.concat([index, j])
                columns = cols if columns is None else xp.concat([columns, cols], axis=1)
            continue
        for w, x_in in zip(weighted, _slots(inputs), strict=True):
            if w is None or x_in is None:
                continue
            x_in = _real(x_in)
            x_full = xp.broadcast_to(x_in, tuple(w.shape[:-1]) + (n,))
            left.append(xp.reshape(w, (-1, m)))
            right.append(xp.reshape(x_full, (-1, n)))
    return LayerGradient(left, right, bias, index, columns)
