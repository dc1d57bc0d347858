"""Univariate Taylor-mode jets (docs/method.md#jets).

A jet of f along a curve x(t) = x_0 + x_1 t + x_2 t^2/2! + ... + x_K t^K/K! is
(f_0, f_1, ..., f_K) with f_k = d^k/dt^k f(x(t)) at t = 0 (the convention of
``jax.experimental.jet``). With x_1 = v and x_k = 0 for k >= 2,
f_k = D^k f(x_0)[v, ..., v].

Conventions used throughout this module:

* ``Jet.coeffs[k - 1]`` is f_k. A coefficient may be ``None``, meaning an
  exact zero: rules skip every term that contains one, so sparse input jets
  (x_1 = v, x_k = 0 for k >= 2, the common case) cost nothing beyond what
  they need.
* Coefficients may carry *direction axes*: leading axes in excess of the
  primal's (primal (B, h), coefficients (V, B, h) or (V, 1, h)). Each index
  of the direction axes is a separate curve through the same primal; rules
  broadcast over them. In a computation that will be collapsed, every
  coefficient must carry the direction axes at full size (no size-1
  broadcasting over directions), since collapsing sums over them.
* A :class:`CollapsedJet` holds the top coefficient already summed over the
  direction axes (Dangel et al., "Collapsing Taylor mode AD"): f_K is linear
  in the inputs' top coefficient given the lower ones, so the rules propagate
  Σ_v f_K[v] directly and the top order costs one vector instead of V.

Only the Python array API standard is used, so jets run on every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from math import comb, factorial
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

__all__ = [
    "Jet",
    "CollapsedJet",
    "ACTIVATIONS",
    "collapse",
    "input_jet",
    "linear_map",
    "affine",
    "coordinate_jet",
    "coordinate_affine",
    "SparseDirections",
    "combine_columns",
    "compose",
    "derivatives",
    "elementwise",
    "tanh",
    "sin",
    "cos",
    "exp",
    "log",
    "sigmoid",
    "softplus",
    "square",
    "power",
    "add",
    "scale",
    "shift",
    "mul",
    "insert_batch_axes",
    "squared_norm",
    "rowwise_squared_norm",
    "coordinate_squared_norm",
    "sparse_squared_norm",
]


class Jet(NamedTuple):
    """A truncated Taylor jet: ``primal`` = f_0 and ``coeffs`` = (f_1, ..., f_K).

    f_k = d^k/dt^k f(x(t)) at t = 0 (docs/method.md#jets). A coefficient may be
    ``None`` (an exact zero) and may carry leading direction axes in excess of
    the primal's. A jet is a NamedTuple, hence a JAX pytree.
    """

    primal: Any
    coeffs: tuple

    #: Whether the top coefficient is already summed over the direction axes.
    collapsed = False

    @property
    def order(self) -> int:
        """K, the number of Taylor coefficients."""
        return len(self.coeffs)


class CollapsedJet(Jet):
    """A jet whose top coefficient f_K is Σ over directions of the true f_K.

    The lower coefficients f_1 .. f_{K-1} keep their direction axes; f_K has
    none (it broadcasts against the primal). Made by :func:`collapse` or by the
    ``collapse=True`` options; every rule maps collapsed jets to collapsed
    jets.
    """

    __slots__ = ()
    collapsed = True


def _make(collapsed: bool, primal, coeffs) -> Jet:
    return (CollapsedJet if collapsed else Jet)(primal, tuple(coeffs))


def _sum_directions(c, primal):
    """Σ of ``c`` over its leading axes in excess of ``primal``'s (None stays None)."""
    if c is None:
        return None
    extra = c.ndim - primal.ndim
    if extra <= 0:
        return c
    return array_namespace(c).sum(c, axis=tuple(range(extra)))


def _plus(total, term):
    """``total + term`` where ``None`` is zero."""
    if term is None:
        return total
    return term if total is None else total + term


def collapse(jet: Jet) -> CollapsedJet:
    """Collapse a jet: replace f_K by Σ_v f_K[v] over the direction axes.

    Lower coefficients are kept as they are. Collapsing a collapsed jet
    returns it unchanged.
    """
    if jet.collapsed:
        return jet
    top = _sum_directions(jet.coeffs[-1], jet.primal)
    return CollapsedJet(jet.primal, tuple(jet.coeffs[:-1]) + (top,))


def _check_order(order: int) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"jet order must be an int >= 1, got {order!r}")
    return order


def input_jet(x, directions, order: int, collapse: bool = False) -> Jet:
    """The jet of the input curve x(t) = x + t v: x_0 = x, x_1 = v, x_k = 0 for k >= 2.

    Parameters
    ----------
    x : array, shape (B, d)
        Points (any leading batch shape works the same way).
    directions : array, shape (V, d) or (V, B, d)
        Dense directions v; a (V, d) array is shared by all points and is
        stored as (V, 1, d) so that it broadcasts against the primal.
    order : int
        K >= 1.
    collapse : bool
        Return a :class:`CollapsedJet` (top coefficient summed over V).
    """
    xp = array_namespace(x, directions)
    order = _check_order(order)
    if directions.ndim == x.ndim:
        shape = (directions.shape[0],) + (1,) * (x.ndim - 1) + (directions.shape[-1],)
        directions = xp.reshape(directions, shape)
    elif directions.ndim != x.ndim + 1:
        raise ValueError(
            f"directions must have shape (V, d) or (V, *x.shape); got {directions.shape} "
            f"for x of shape {x.shape}"
        )
    jet = Jet(x, (directions,) + (None,) * (order - 1))
    return _collapse_if(jet, collapse)


def _collapse_if(jet: Jet, flag: bool) -> Jet:
    return collapse(jet) if flag else jet


# -- linear maps --------------------------------------------------------------


def linear_map(jet: Jet, fn: Callable[[Any, bool], Any]) -> Jet:
    """Push a jet through a map that is affine in x: y_0 = fn(x_0, True), y_k = fn(x_k, False).

    ``fn(y, is_primal)`` must be affine in ``y`` with its constant part added
    only when ``is_primal`` (so ``fn(·, False)`` is the linear part), and must
    accept arrays with extra leading (direction) axes. Zero coefficients stay
    zero without a call. Collapsed jets stay collapsed: the top coefficient is
    linear in x_K.
    """
    coeffs = tuple(None if c is None else fn(c, False) for c in jet.coeffs)
    return _make(jet.collapsed, fn(jet.primal, True), coeffs)


def affine(jet: Jet, W, b=None) -> Jet:
    """Affine layer y = x Wᵀ + b: y_0 = x_0 Wᵀ + b, y_k = x_k Wᵀ (W of shape (out, in))."""

    def fn(y, is_primal):
        y = y @ W.T
        return y + b if (is_primal and b is not None) else y

    return linear_map(jet, fn)


def coordinate_jet(primal, columns, order: int, collapse: bool = False) -> Jet:
    """Output jet of a first layer along coordinate directions e_{j_1}, ..., e_{j_V}.

    For y = W x + b along x(t) = x_0 + t e_j: y_0 = W x_0 + b is given as
    ``primal``, y_1 = W e_j = W[:, j] is the gathered column, and y_k = 0 for
    k >= 2 (docs/method.md#jets, sparse tangents). No (V, d) one-hot is formed.

    Parameters
    ----------
    primal : array, shape (B, out) or (*lead, B, out)
        The layer's primal output W x_0 + b.
    columns : array, shape (out, V) or (*lead, out, V)
        W[:, j] for each direction (``xp.take(W, j, axis=1)``). Leading axes
        (the SDZE engine's query axis: one perturbed W per query) match the
        primal's leading axes.
    order : int
        K >= 1.
    collapse : bool
        Return the collapsed jet (top coefficient Σ_v, which is zero for K >= 2).

    Returns
    -------
    Jet
        coeffs = (y_1 of shape (V, *lead, 1, out), None, ..., None).
    """
    xp = array_namespace(primal, columns)
    order = _check_order(order)
    *lead, out, V = columns.shape
    axes = (columns.ndim - 1,) + tuple(range(columns.ndim - 1))
    ones = (1,) * (primal.ndim - 1 - len(lead))
    tangent = xp.reshape(xp.permute_dims(columns, axes), (V, *lead, *ones, out))
    jet = Jet(primal, (tangent,) + (None,) * (order - 1))
    return _collapse_if(jet, collapse)


def coordinate_affine(x, W, b, index, order: int, collapse: bool = False) -> Jet:
    """Jet of y = x Wᵀ + b along coordinate directions e_j, j in ``index`` (shape (V,)).

    y_0 = x Wᵀ + b, y_1 = W[:, j] gathered with ``xp.take(W, index, axis=1)``
    (O(out·V), independent of d), y_k = 0 for k >= 2. See :func:`coordinate_jet`.
    """
    xp = array_namespace(x, W)
    primal = x @ W.T
    if b is not None:
        primal = primal + b
    return coordinate_jet(primal, xp.take(W, index, axis=1), order, collapse)


class SparseDirections(NamedTuple):
    """k-sparse directions v_m = Σ_{j<k} w_{mj} e_{i_{mj}}, m = 1..V (docs/method.md#jets).

    Coordinate directions (k = 1, w = 1) and the polarization directions
    e_i ± e_k (k = 2, w = (1, ±1)) are the common cases. A first layer meets
    them by gathering columns, W v_m = Σ_j w_{mj} W[:, i_{mj}]
    (:func:`combine_columns`): O(h V k) work, no (V, d) array. A NamedTuple,
    hence a JAX pytree.

    Attributes
    ----------
    index : integer array, shape (V, k)
        The coordinates i_{mj} of each direction (repeats allowed: they add).
    weights : float array, shape (V, k)
        Their coefficients w_{mj}.
    """

    index: Any
    weights: Any

    def dense(self, d: int):
        """The (V, d) array of the directions (O(V d) memory: for references and fallbacks)."""
        xp = array_namespace(self.index, self.weights)
        coords = xp.arange(d, dtype=self.index.dtype, device=device(self.index))
        one_hot = xp.astype(xp.expand_dims(self.index, axis=-1) == coords, self.weights.dtype)
        return xp.sum(one_hot * xp.expand_dims(self.weights, axis=-1), axis=-2)


def check_sparse_directions(directions: SparseDirections) -> SparseDirections:
    """``directions`` if its index is integral and both arrays have one shape (V, k)."""
    index, weights = directions
    xp = array_namespace(index, weights)
    if not xp.isdtype(index.dtype, "integral"):
        raise TypeError(f"SparseDirections.index must be an integer array, got {index.dtype}")
    if index.ndim != 2 or tuple(index.shape) != tuple(weights.shape):
        raise ValueError(
            "SparseDirections needs index and weights of one shape (V, k), got "
            f"{tuple(index.shape)} and {tuple(weights.shape)}"
        )
    return directions


def combine_columns(gathered, weights):
    """W v_m = Σ_j w_{mj} W[:, i_{mj}] from the gathered columns of the flattened index.

    Parameters
    ----------
    gathered : array, shape (*lead, out, V k)
        W[:, index.reshape(-1)] (with a layer map's leading query axes, if any).
    weights : array, shape (V, k)

    Returns
    -------
    array, shape (*lead, out, V)
        The columns for :func:`coordinate_jet`.
    """
    xp = array_namespace(gathered, weights)
    V, k = weights.shape
    lead = tuple(gathered.shape[:-1])
    return xp.sum(xp.reshape(gathered, (*lead, V, k)) * weights, axis=-1)


# -- elementwise functions: Faà di Bruno ----------------------------------------


def _partitions(k: int, largest: int | None = None):
    """Integer partitions of k as non-increasing tuples of parts."""
    largest = k if largest is None else largest
    if k == 0:
        yield ()
        return
    for part in range(min(k, largest), 0, -1):
        for rest in _partitions(k - part, part):
            yield (part,) + rest


@cache
def _faa_di_bruno_terms(k: int) -> tuple:
    """Faà di Bruno terms of order k with at least two parts, grouped by part count.

    Returns ``((n, ((coef, ((j, m_j), ...)), ...)), ...)`` for n = 2..k where
    each inner entry is a partition with multiplicities m_j (Σ j m_j = k,
    Σ m_j = n) and coef = k! / Π_j (m_j! (j!)^{m_j}). The single-part
    partition (n = 1, coefficient 1, monomial x_k) is left to the caller.
    """
    groups: dict[int, list] = {}
    for parts in _partitions(k):
        if len(parts) == 1:
            continue
        mult = {j: parts.count(j) for j in sorted(set(parts))}
        denominator = 1
        for j, m in mult.items():
            denominator *= factorial(m) * factorial(j) ** m
        groups.setdefault(len(parts), []).append((factorial(k) // denominator, tuple(mult.items())))
    return tuple((n, tuple(groups[n])) for n in sorted(groups))


def compose(jet: Jet, derivs: Sequence) -> Jet:
    """Jet of φ(x) for an elementwise φ, by Faà di Bruno's formula (docs/method.md#jets).

    y_0 = φ(x_0) and, for k >= 1,

        y_k = Σ over partitions (m_1..m_k) of k, Σ_j j m_j = k, of
              k! / Π_j (m_j! (j!)^{m_j}) · φ^{(Σ_j m_j)}(x_0) · Π_j x_j^{m_j}.

    Terms with a zero x_j or a zero derivative are skipped: with only x_1
    nonzero, y_k = φ^{(k)}(x_0) x_1^k. For a collapsed jet the top order is
    y_K = φ'(x_0) x_K + Σ_{n >= 2} φ^{(n)}(x_0) Σ_v B_{K,n}[v], where x_K is
    already summed and the Bell-polynomial sums B_{K,n} (lower coefficients
    only) are summed over the directions.

    Parameters
    ----------
    jet : Jet
        Input jet of order K.
    derivs : sequence of length >= K + 1
        φ^{(n)}(x_0) for n = 0..K: arrays, Python numbers, or ``None`` for zero
        (``derivs[0]`` must be an array).
    """
    x = (jet.primal,) + tuple(jet.coeffs)
    # x_j^m, built on demand. A loop, not a recursive closure: a closure that
    # calls itself is a reference cycle that would keep these arrays alive
    # until the garbage collector runs, and memory would grow step by step.
    powers: dict[tuple[int, int], Any] = {}

    def power_of(j, m):
        start = max((e for (i, e) in powers if i == j and e <= m), default=0)
        value = powers[j, start] if start else None
        for e in range(start + 1, m + 1):
            value = x[j] if e == 1 else value * x[j]
            powers[j, e] = value
        return powers[j, m]

    K = jet.order
    coeffs = []
    for k in range(1, K + 1):
        summed_top = jet.collapsed and k == K
        total = None if (derivs[1] is None or x[k] is None) else derivs[1] * x[k]
        for n, terms in _faa_di_bruno_terms(k):
            if derivs[n] is None:
                continue
            bell = None
            for coef, mult in terms:
                if any(x[j] is None for j, _ in mult):
                    continue
                monomial = None
                for j, m in mult:
                    p = power_of(j, m)
                    monomial = p if monomial is None else monomial * p
                bell = _plus(bell, monomial if coef == 1 else coef * monomial)
            if bell is None:
                continue
            if summed_top:
                bell = _sum_directions(bell, jet.primal)
            total = _plus(total, derivs[n] * bell)
        coeffs.append(total)
    return _make(jet.collapsed, derivs[0], coeffs)


@cache
def _recurrence_polynomials(order: int, kind: str) -> tuple:
    """Integer coefficients (ascending powers) of p_0..p_order with φ^{(n)} = p_n(φ).

    tanh: p_0(t) = t, p_{n+1}(t) = (1 - t^2) p_n'(t)   (since tanh' = 1 - tanh^2);
    sigmoid: p_0(s) = s, p_{n+1}(s) = (s - s^2) p_n'(s)   (since s' = s(1 - s)).
    """
    # The factor (1 - t^2) = 1 + 0 t - t^2 or (s - s^2) = 0 + s - s^2.
    factor = {"tanh": (1, 0, -1), "sigmoid": (0, 1, -1)}[kind]
    polys = [(0, 1)]
    for _ in range(order):
        p = polys[-1]
        dp = [i * p[i] for i in range(1, len(p))]
        q = [0] * (len(dp) + 2)
        for i, c in enumerate(dp):
            for offset, f in enumerate(factor):
                q[i + offset] += f * c
        while len(q) > 1 and q[-1] == 0:
            q.pop()
        polys.append(tuple(q))
    return tuple(polys)


def _horner(coefficients, t):
    """Σ_i c_i t^i by Horner's rule (integer coefficients, degree >= 1)."""
    acc = float(coefficients[-1]) * t
    for c in reversed(coefficients[1:-1]):
        acc = (acc + float(c)) * t if c else acc * t
    return acc + float(coefficients[0]) if coefficients[0] else acc


def _polynomial_table(value, order: int, kind: str) -> list:
    polys = _recurrence_polynomials(order, kind)
    table = [value]
    for n in range(1, order + 1):
        table.append(_horner(polys[n], value))
    return table


def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}), without overflow.

    For complex x (a parameter tangent carried by complex step, see
    ``sdze_core.perturbers``) |x| is replaced by x sign(Re x), the analytic
    continuation of the same formula, so derivatives stay exact.
    """
    xp = array_namespace(x)
    if xp.isdtype(x.dtype, "complex floating"):
        ax = x * xp.sign(xp.real(x))
    else:
        ax = xp.abs(x)
    return (x + ax) / 2 + xp.log1p(xp.exp(-ax))


def _sigmoid(x):
    """1 / (1 + e^{-x}) = exp(-softplus(-x)), without overflow."""
    xp = array_namespace(x)
    return xp.exp(-_softplus(-x))


def _tanh_table(x0, order):
    return _polynomial_table(array_namespace(x0).tanh(x0), order, "tanh")


def _sigmoid_table(x0, order):
    return _polynomial_table(_sigmoid(x0), order, "sigmoid")


def _softplus_table(x0, order):
    # softplus' = sigmoid, so softplus^{(n)} = sigmoid^{(n-1)}.
    tail = _sigmoid_table(x0, order - 1) if order >= 1 else []
    return [_softplus(x0)] + tail


def _cyclic_table(x0, order, start):
    # Derivative n of sin (start 0) or cos (start 1) is (sin, cos, -sin, -cos)[(start + n) % 4].
    xp = array_namespace(x0)
    values = {}
    table = []
    for n in range(order + 1):
        phase = (start + n) % 4
        if phase % 2 not in values:
            values[phase % 2] = (xp.sin, xp.cos)[phase % 2](x0)
        table.append(values[phase % 2] if phase < 2 else -values[phase % 2])
    return table


def _sin_table(x0, order):
    return _cyclic_table(x0, order, 0)


def _cos_table(x0, order):
    return _cyclic_table(x0, order, 1)


def _exp_table(x0, order):
    e = array_namespace(x0).exp(x0)
    return [e] * (order + 1)


def _log_table(x0, order):
    # log^{(n)}(x) = (-1)^{n-1} (n-1)! / x^n for n >= 1.
    xp = array_namespace(x0)
    table = [xp.log(x0)]
    inverse = 1 / x0
    inverse_power = inverse
    for n in range(1, order + 1):
        table.append((-1) ** (n - 1) * factorial(n - 1) * inverse_power)
        inverse_power = inverse_power * inverse
    return table


def _power_table(x0, order, p):
    # (x^p)^{(n)} = p (p-1) ... (p-n+1) x^{p-n}; zero for n > p when p >= 0.
    xp = array_namespace(x0)
    table = [xp.ones_like(x0) if p == 0 else x0**p]
    falling = 1
    for n in range(1, order + 1):
        falling *= p - n + 1
        if falling == 0:
            table.append(None)
        elif p == n:
            table.append(float(falling))
        else:
            table.append(falling * x0 ** (p - n))
    return table


def _square_table(x0, order):
    return _power_table(x0, order, 2)


_TABLES = {
    "tanh": _tanh_table,
    "sin": _sin_table,
    "cos": _cos_table,
    "exp": _exp_table,
    "log": _log_table,
    "sigmoid": _sigmoid_table,
    "softplus": _softplus_table,
    "square": _square_table,
}

#: Names accepted by :func:`derivatives`, :func:`elementwise` and ``MLP(activation=)``.
ACTIVATIONS = tuple(sorted(_TABLES))


def derivatives(name: str, x0, order: int) -> list:
    """φ^{(n)}(x_0) for n = 0..order, in closed form.

    * tanh: φ^{(n)} = p_n(tanh x), p_0(t) = t, p_{n+1}(t) = (1 - t^2) p_n'(t);
    * sigmoid s: p_0(s) = s, p_{n+1}(s) = s(1 - s) p_n'(s);
    * softplus = log(1 + e^x): softplus^{(n)} = sigmoid^{(n-1)} for n >= 1;
    * sin, cos: cycling through (sin, cos, -sin, -cos);
    * exp: e^x for every n;
    * log: (-1)^{n-1} (n-1)! / x^n for n >= 1;
    * square: (x^2, 2x, 2, 0, ...), zero entries being ``None``.
    """
    if name not in _TABLES:
        raise ValueError(f"unknown elementwise function {name!r}; known: {', '.join(ACTIVATIONS)}")
    return _TABLES[name](x0, order)


def elementwise(jet: Jet, name: str) -> Jet:
    """Jet of the named elementwise function: :func:`compose` with :func:`derivatives`."""
    return compose(jet, derivatives(name, jet.primal, jet.order))


def tanh(jet: Jet) -> Jet:
    """Jet of tanh(x) (:func:`elementwise`)."""
    return elementwise(jet, "tanh")


def sin(jet: Jet) -> Jet:
    """Jet of sin(x) (:func:`elementwise`)."""
    return elementwise(jet, "sin")


def cos(jet: Jet) -> Jet:
    """Jet of cos(x) (:func:`elementwise`)."""
    return elementwise(jet, "cos")


def exp(jet: Jet) -> Jet:
    """Jet of exp(x) (:func:`elementwise`)."""
    return elementwise(jet, "exp")


def log(jet: Jet) -> Jet:
    """Jet of log(x), x > 0 (:func:`elementwise`)."""
    return elementwise(jet, "log")


def sigmoid(jet: Jet) -> Jet:
    """Jet of 1 / (1 + e^{-x}) (:func:`elementwise`)."""
    return elementwise(jet, "sigmoid")


def softplus(jet: Jet) -> Jet:
    """Jet of log(1 + e^x) (:func:`elementwise`)."""
    return elementwise(jet, "softplus")


def square(jet: Jet) -> Jet:
    """Jet of x^2 (:func:`elementwise`; only y_1, y_2 terms of Faà di Bruno survive)."""
    return elementwise(jet, "square")


def power(jet: Jet, p: int) -> Jet:
    """Jet of x^p for an integer p, with φ^{(n)} = p (p-1) ... (p-n+1) x^{p-n}."""
    if isinstance(p, bool) or not isinstance(p, int):
        raise TypeError(f"power needs an int exponent, got {p!r}")
    return compose(jet, _power_table(jet.primal, jet.order, p))


# -- sums and products ------------------------------------------------------------


def _align(f: Jet, g: Jet) -> tuple[Jet, Jet, bool]:
    if f.order != g.order:
        raise ValueError(f"jets of different orders: {f.order} and {g.order}")
    if f.collapsed or g.collapsed:
        return collapse(f), collapse(g), True
    return f, g, False


def add(f: Jet, g: Jet) -> Jet:
    """Jet of f + g: (f + g)_k = f_k + g_k (collapses both if either is collapsed)."""
    f, g, collapsed = _align(f, g)
    coeffs = [_plus(a, b) for a, b in zip(f.coeffs, g.coeffs, strict=True)]
    return _make(collapsed, f.primal + g.primal, coeffs)


def scale(jet: Jet, c) -> Jet:
    """Jet of c f for a scalar (or array broadcasting like the primal) c: (c f)_k = c f_k."""
    return linear_map(jet, lambda y, is_primal: c * y)


def shift(jet: Jet, c) -> Jet:
    """Jet of f + c for a constant c: only the primal changes."""
    return _make(jet.collapsed, jet.primal + c, jet.coeffs)


def insert_batch_axes(jet: Jet, count: int = 1) -> Jet:
    """Insert ``count`` size-1 batch axes in front of the primal's axes.

    The primal (B,) becomes (1, B); a coefficient with n direction axes gets
    the new axes right after them ((V, B) -> (V, 1, B)). Used to combine a jet
    of the points alone (a boundary factor) with a network jet that carries
    the SDZE engine's query axis.
    """
    xp = array_namespace(jet.primal)

    def expand(c, position):
        if c is None:
            return None
        shape = tuple(c.shape)
        return xp.reshape(c, shape[:position] + (1,) * count + shape[position:])

    primal = expand(jet.primal, 0)
    coeffs = [None if c is None else expand(c, c.ndim - jet.primal.ndim) for c in jet.coeffs]
    return _make(jet.collapsed, primal, coeffs)


def _leibniz(f: Jet, g: Jet, product: Callable) -> Jet:
    """(f ⊙ g)_k = Σ_{j=0..k} C(k, j) f_j ⊙ g_{k-j} for a bilinear ``product``.

    For a collapsed result the middle terms 0 < j < K of the top order (lower
    coefficients only) are summed over the directions; the edge terms
    f_0 g_K + f_K g_0 use the already summed tops.
    """
    f, g, collapsed = _align(f, g)
    fs = (f.primal,) + tuple(f.coeffs)
    gs = (g.primal,) + tuple(g.coeffs)
    primal = product(fs[0], gs[0])
    K = f.order
    coeffs = []
    for k in range(1, K + 1):
        total = None
        for j in (0, k):
            if fs[j] is not None and gs[k - j] is not None:
                total = _plus(total, product(fs[j], gs[k - j]))
        middle = None
        for j in range(1, k):
            if fs[j] is not None and gs[k - j] is not None:
                middle = _plus(middle, comb(k, j) * product(fs[j], gs[k - j]))
        if collapsed and k == K:
            middle = _sum_directions(middle, primal)
        coeffs.append(_plus(total, middle))
    return _make(collapsed, primal, coeffs)


def mul(f: Jet, g: Jet) -> Jet:
    """Jet of the elementwise product f g by Leibniz: (f g)_k = Σ_j C(k, j) f_j g_{k-j}."""
    return _leibniz(f, g, lambda a, b: a * b)


def squared_norm(jet: Jet) -> Jet:
    """Jet of ‖x‖^2 over the last axis: (‖x‖^2)_k = Σ_j C(k, j) ⟨x_j, x_{k-j}⟩.

    With x_1 = v and x_k = 0 otherwise: (2⟨x_0, v⟩, 2⟨v, v⟩, 0, ...).
    """
    xp = array_namespace(jet.primal)
    return _leibniz(jet, jet, lambda a, b: xp.vecdot(a, b, axis=-1))


def rowwise_squared_norm(x):
    """‖x‖² over the last axis: the arrays' backend's
    :meth:`~sdze_core.backend.Backend.rowwise_squared_norm` (by default one BLAS dot
    per row, no temporary of x's size)."""
    from .registry import backend_of

    return backend_of(x).rowwise_squared_norm(x)


def coordinate_squared_norm(x, index, order: int, collapse: bool = False) -> Jet:
    """Jet of ‖x‖^2 along coordinate directions e_j, j in ``index`` (shape (V,)).

    ‖x + t e_j‖^2 = ‖x‖^2 + 2 t x_j + t^2, so the jet is
    (‖x‖^2, 2 x_j, 2, 0, ..., 0): one gather, no d-sized work per direction.

    Parameters
    ----------
    x : array, shape (B, d)
    index : integer array, shape (V,)
    order : int
        K >= 1.
    collapse : bool
        Return the collapsed jet (top summed over the V directions).

    Returns
    -------
    Jet
        primal (B,), coefficients (V, B), (V, 1), then ``None``.
    """
    xp = array_namespace(x, index)
    order = _check_order(order)
    primal = rowwise_squared_norm(x)
    first = 2 * xp.permute_dims(xp.take(x, index, axis=1), (1, 0))
    coeffs = [first]
    if order >= 2:
        coeffs.append(xp.full((index.shape[0], 1), 2.0, dtype=x.dtype, device=device(x)))
    coeffs += [None] * (order - len(coeffs))
    return _collapse_if(Jet(primal, tuple(coeffs)), collapse)


def sparse_squared_norm(x, directions: SparseDirections, order: int, collapse: bool = False):
    """Jet of ‖x‖^2 along k-sparse directions v_m = Σ_j w_{mj} e_{i_{mj}}.

    ‖x + t v‖^2 = ‖x‖^2 + 2 t ⟨x, v⟩ + t^2 ‖v‖^2, with
    ⟨x, v_m⟩ = Σ_j w_{mj} x_{i_{mj}} (k gathers) and
    ‖v_m‖^2 = Σ_{j,l} w_{mj} w_{ml} [i_{mj} = i_{ml}]: O(V k^2 + B V k), no d-sized work.

    Returns
    -------
    Jet
        primal (B,), coefficients (V, B), (V, 1), then ``None``.
    """
    index, weights = directions
    xp = array_namespace(x, weights)
    order = _check_order(order)
    V, k = weights.shape
    primal = rowwise_squared_norm(x)
    picked = xp.reshape(xp.take(x, xp.reshape(index, (-1,)), axis=1), (x.shape[0], V, k))
    first = 2 * xp.permute_dims(xp.sum(picked * weights, axis=-1), (1, 0))
    coeffs = [first]
    if order >= 2:
        same = xp.astype(xp.expand_dims(index, axis=-1) == xp.expand_dims(index, axis=-2), x.dtype)
        outer = xp.expand_dims(weights, axis=-1) * xp.expand_dims(weights, axis=-2)
        coeffs.append(2 * xp.reshape(xp.sum(same * outer, axis=(-2, -1)), (V, 1)))
    coeffs += [None] * (order - len(coeffs))
    return _collapse_if(Jet(primal, tuple(coeffs)), collapse)
