"""Functional networks with Taylor-mode jets: :class:`MLP` and the PINN :class:`Ansatz`.

Parameters are plain data: a list with one dict ``{"W": (out, in), "b": (out,)}``
per layer, arrays of the backend. Every model offers

* ``init(key, backend)``: parameters drawn from a :class:`~sdze_core.keys.Key`;
* ``apply(params, x, linear=None)``: the output for points x of shape (B, d);
* ``jet(params, x, directions, order, collapse=False, linear=None)``: the
  Taylor jet of the output along directions (docs/method.md#jets), from which the
  estimators of docs/method.md#oracles are built.

``directions`` is either an integer index array j of shape (V,) (coordinate
directions e_j: the first layer gathers W[:, j], O(h V) work whatever d is) or
a float array of shape (V, d) or (V, B, d) (dense directions).

The ``linear`` hook replaces each layer's affine map, so that perturbed
weights never have to be formed. It is called as
``linear(layer_index, layer_params, x, is_primal)`` and must return
``x (W + ΔW)ᵀ + b`` when ``is_primal`` and ``x (W + ΔW)ᵀ`` otherwise, for x with
any leading axes (jet coefficients carry direction axes). The SDZE engine
passes one that adds ε c U (S (Vᵀ x)) to the default x Wᵀ (docs/method.md#subspace-perturbations),
for all its perturbed copies at once: the first layer's hook returns a new
leading query axis (B, d) -> (Q, B, h) (after any direction axes), which the
later layers, the output (Q, B) and the ansatz carry along.
Along coordinate directions the first layer needs W[:, j] rather than a
product with e_j, so a hook used there must also have a method
``columns(layer_index, layer_params, index)`` returning the (out, V) columns
(W + ΔW)[:, index].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from math import sqrt
from typing import Any

from array_api_compat import array_namespace

from . import jets
from .keys import Key, fold_in
from .registry import check_one_library

__all__ = [
    "MLP", "Ansatz", "conform", "conform_to", "default_linear", "default_columns", "BOUNDARIES",
]

Params = list[dict[str, Any]]
LinearHook = Callable[[int, dict, Any, bool], Any]


def default_linear(layer_index: int, layer_params: dict, x, is_primal: bool):
    """The unperturbed affine map: x Wᵀ + b if ``is_primal`` else x Wᵀ."""
    y = x @ layer_params["W"].T
    return y + layer_params["b"] if is_primal else y


def default_columns(layer_index: int, layer_params: dict, index):
    """The unperturbed first-layer columns W[:, index], shape (out, V), by a gather."""
    W = layer_params["W"]
    return array_namespace(W).take(W, index, axis=1)


# The default hook also serves coordinate directions (see the module docstring).
default_linear.columns = default_columns


def _is_index_array(directions) -> bool:
    xp = array_namespace(directions)
    return xp.isdtype(directions.dtype, "integral")


def conform(params: Params, x, directions=None) -> tuple:
    """``(x, directions)`` ready to meet ``params``: the one dispatch rule of sdze.

    Where parameters meet points (every model's ``apply`` and ``jet``, and the
    oracles that use the points' dtype themselves), see docs/backends.md, "Mixed inputs":

    * arrays of another library than the parameters' raise the mixed-backend
      ``TypeError`` naming both libraries (on every backend, even where the
      library would convert, as JAX does with NumPy arrays);
    * points of another dtype, integer or floating, are cast to the parameters'
      floating dtype, and so are float directions (index directions are kept).
      The parameters' dtype is the model's precision: float64 points with
      float32 parameters compute in float32.

    Parameters that are not sdze's (no ``params[0]["W"]``, e.g. ``None`` for a
    model with none) leave the inputs as they are: such a model keeps its own rules.
    """
    try:
        W = params[0]["W"]
    except (TypeError, KeyError, IndexError):
        return x, directions
    return conform_to(W, x, directions)


def conform_to(reference, x, directions=None, owner: str = "params") -> tuple:
    """:func:`conform` against one array ``reference`` (named ``owner`` in the error)."""
    if type(x) is not type(reference) or (
        directions is not None and type(directions) is not type(reference)
    ):
        check_one_library(**{owner: reference, "x": x, "directions": directions})
    xp = array_namespace(reference)
    if x.dtype != reference.dtype:
        x = xp.astype(x, reference.dtype)
    if directions is not None and directions.dtype != reference.dtype:
        if not _is_index_array(directions):
            directions = xp.astype(directions, reference.dtype)
    return x, directions


#: Initialisations of :class:`MLP` (``init_scheme``).
INIT_SCHEMES = ("glorot", "stde")


@dataclass(frozen=True)
class MLP:
    """Fully connected network x ↦ W_L σ(... σ(W_1 x + b_1) ...) + b_L.

    Parameters
    ----------
    sizes : tuple of int
        Layer widths from input to output, e.g. ``(d, 128, 128, 128, 128, 1)``.
        With a last width of 1 the output is squeezed to shape (B,).
    activation : str
        One of :data:`sdze_core.jets.ACTIVATIONS` (default ``"tanh"``), applied
        after every layer but the last.
    init_scheme : {"glorot", "stde"}
        How :meth:`init` draws the parameters (default ``"glorot"``).
    """

    sizes: tuple[int, ...]
    activation: str = "tanh"
    init_scheme: str = "glorot"

    def __post_init__(self):
        sizes = tuple(int(s) for s in self.sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"MLP needs at least two positive sizes, got {self.sizes!r}")
        if self.activation not in jets.ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; known: {', '.join(jets.ACTIVATIONS)}"
            )
        if self.init_scheme not in INIT_SCHEMES:
            raise ValueError(
                f"init_scheme must be one of {', '.join(INIT_SCHEMES)}, got {self.init_scheme!r}"
            )
        object.__setattr__(self, "sizes", sizes)

    @property
    def num_layers(self) -> int:
        """Number of affine layers."""
        return len(self.sizes) - 1

    def init(self, key: Key, backend) -> Params:
        """Initial weights and biases, by :attr:`init_scheme`.

        ``"glorot"`` (default): W_l ~ N(0, 2 / (fan_in + fan_out)) of shape
        (out, in), drawn with ``backend.normal(fold_in(key, l), ...)``; b_l = 0.
        ``"stde"`` (STDE's reference implementation): W_l ~ U(±1/√fan_in),
        b_l ~ U(±1/√fan_out), from ``backend.uniform`` with the same keys
        (the bias from ``fold_in(fold_in(key, l), "bias")``).
        """
        params = []
        for layer, (n_in, n_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:], strict=True)):
            k = fold_in(key, layer)
            if self.init_scheme == "glorot":
                W = backend.normal(k, (n_out, n_in))
                W *= sqrt(2.0 / (n_in + n_out))  # in place: no second P-sized array
                params.append({"W": W, "b": backend.zeros((n_out,))})
                continue
            W = backend.uniform(k, (n_out, n_in))
            W -= 0.5
            W *= 2.0 / sqrt(n_in)
            b = (backend.uniform(fold_in(k, "bias"), (n_out,)) - 0.5) * (2.0 / sqrt(n_out))
            params.append({"W": W, "b": b})
        return params

    def _check(self, params: Params, x) -> None:
        if len(params) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers of parameters, got {len(params)}")
        if x.ndim != 2 or x.shape[-1] != self.sizes[0]:
            raise ValueError(f"x must have shape (B, {self.sizes[0]}), got {x.shape}")

    def _squeeze(self, y):
        return y[..., 0] if self.sizes[-1] == 1 else y

    def apply(self, params: Params, x, linear: LinearHook | None = None):
        """Network output for x of shape (B, d): shape (B,) (or (B, out) if out > 1)."""
        self._check(params, x)
        x, _ = conform(params, x)
        linear = linear or default_linear
        h = x
        for layer, p in enumerate(params):
            h = linear(layer, p, h, True)
            if layer < self.num_layers - 1:
                h = jets.derivatives(self.activation, h, 0)[0]
        return self._squeeze(h)

    def jet(
        self,
        params: Params,
        x,
        directions,
        order: int,
        collapse: bool = False,
        linear: LinearHook | None = None,
    ) -> jets.Jet:
        """Jet of the output along x(t) = x + t v for each direction v (docs/method.md#jets).

        Parameters
        ----------
        params : list of dict
            As returned by :meth:`init`.
        x : array, shape (B, d)
            Points.
        directions : array
            Integer indices j of shape (V,): coordinate directions e_j, whose
            first layer is the gather W[:, j] (no one-hot is formed); or float
            directions of shape (V, d) or (V, B, d).
        order : int
            K >= 1.
        collapse : bool
            Propagate the top coefficient already summed over the V directions
            (returns a :class:`~sdze_core.jets.CollapsedJet`).
        linear : callable, optional
            Replacement for each layer's affine map (see the module docstring).

        Returns
        -------
        Jet
            primal (B,), coefficients f_k = D^k u(x)[v, ..., v] of shape (V, B)
            (the collapsed top: shape (B,), Σ_v f_K[v]).
        """
        self._check(params, x)
        x, directions = conform(params, x, directions)
        linear = linear or default_linear
        if _is_index_array(directions):
            columns = getattr(linear, "columns", None)
            if columns is None:
                raise TypeError(
                    "a linear hook used with coordinate directions needs a "
                    "columns(layer_index, layer_params, index) method giving (out, V) columns"
                )
            first = params[0]
            h = jets.coordinate_jet(
                linear(0, first, x, True), columns(0, first, directions), order, collapse
            )
        else:
            h = jets.input_jet(x, directions, order, collapse)
            h = jets.linear_map(h, partial(linear, 0, params[0]))
        for layer in range(1, self.num_layers):
            h = jets.elementwise(h, self.activation)
            h = jets.linear_map(h, partial(linear, layer, params[layer]))
        return jets.linear_map(h, lambda y, is_primal: self._squeeze(y))


#: Boundary factors g(x) of :class:`Ansatz`, vanishing on the domain's boundary.
BOUNDARIES = ("ball", "annulus")


@dataclass(frozen=True)
class Ansatz:
    """PINN ansatz u(x) = g(x) N(x) with a boundary factor g (docs/method.md#benchmark-problems).

    * ``"ball"``: g = 1 − ‖x‖², zero on the unit sphere;
    * ``"annulus"``: g = (1 − ‖x‖²)(4 − ‖x‖²), zero on ‖x‖ = 1 and ‖x‖ = 2.

    The jet is the product rule (u)_k = Σ_j C(k, j) g_j N_{k-j} on the jets of
    g and N; along coordinate directions the jet of ‖x‖² is
    (‖x‖², 2 x_j, 2, 0, ...), one gather per direction.

    Parameters
    ----------
    network : MLP
        N, with a scalar output (last size 1).
    boundary : {"ball", "annulus"}
    """

    network: MLP
    boundary: str = "ball"

    def __post_init__(self):
        if self.boundary not in BOUNDARIES:
            raise ValueError(f"boundary must be one of {BOUNDARIES}, got {self.boundary!r}")
        if self.network.sizes[-1] != 1:
            raise ValueError("the ansatz needs a network with a scalar output (last size 1)")

    def init(self, key: Key, backend) -> Params:
        """The network's parameters (:meth:`MLP.init`); g has none."""
        return self.network.init(key, backend)

    def _boundary_factor(self, norm2: jets.Jet) -> jets.Jet:
        one_minus = jets.shift(jets.scale(norm2, -1.0), 1.0)
        if self.boundary == "ball":
            return one_minus
        return jets.mul(one_minus, jets.shift(jets.scale(norm2, -1.0), 4.0))

    def apply(self, params: Params, x, linear: LinearHook | None = None):
        """u(x) = g(x) N(x) for x of shape (B, d); shape (B,)."""
        x, _ = conform(params, x)
        norm2 = jets.rowwise_squared_norm(x)
        g = 1.0 - norm2
        if self.boundary == "annulus":
            g = g * (4.0 - norm2)
        return g * self.network.apply(params, x, linear)

    def jet(
        self,
        params: Params,
        x,
        directions,
        order: int,
        collapse: bool = False,
        linear: LinearHook | None = None,
    ) -> jets.Jet:
        """Jet of u = g N along each direction; arguments as :meth:`MLP.jet`."""
        x, directions = conform(params, x, directions)
        net = self.network.jet(params, x, directions, order, collapse, linear)
        if _is_index_array(directions):
            norm2 = jets.coordinate_squared_norm(x, directions, order)
        else:
            norm2 = jets.squared_norm(jets.input_jet(x, directions, order))
        g = self._boundary_factor(norm2)
        # A hook may add leading batch axes (the engine's queries): g broadcasts over them.
        extra = net.primal.ndim - g.primal.ndim
        return jets.mul(jets.insert_batch_axes(g, extra) if extra else g, net)
