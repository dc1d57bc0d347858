"""Functional networks with Taylor-mode jets: :class:`MLP` and the PINN :class:`Ansatz`.

Parameters are plain data: a list with one dict ``{"W": (out, in), "b": (out,)}``
per layer, arrays of the backend. Every model offers

* ``init(key, backend)``: parameters drawn from a :class:`~sdze_core.keys.Key`;
* ``apply(params, x)``: the output for points x of shape (B, d);
* ``jet(params, x, directions, order, collapse=False)``: the Taylor jet of
  the output along directions (docs/method.md#jets), from which the
  estimators of docs/method.md#oracles are built.

``directions`` is an integer index array j of shape (V,) (coordinate
directions e_j: the first layer gathers W[:, j], O(h V) work whatever d is),
a :class:`~sdze_core.jets.SparseDirections` (k-sparse directions
Σ_j w_j e_{i_j}: the first layer gathers and weights k columns each, O(h V k)),
or a float array of shape (V, d) or (V, B, d) (dense directions).

The perturbation belongs to the model (docs/sdze.md, "The perturbation
belongs to the model"). An MLP computes each layer's affine map through a
:class:`LayerMap`: :class:`PlainLayers` (x Wᵀ + b) for the network itself,
another map for a :class:`LayerMapNetwork`, so that perturbed weights never
have to be formed.
The SDZE sampler's map adds ε c U (S (Vᵀ x)) to x Wᵀ
(docs/method.md#subspace-perturbations) for all its perturbed copies at once:
the first layer returns a new leading query axis (B, d) -> (Q, B, h) (after
any direction axes), which the later layers, the output (Q, B) and the
ansatz carry along. :func:`with_layer_map` (or :func:`with_network` for any
other wrapper) puts the map into a model, an MLP or a model dataclass with an
MLP ``network`` field such as :class:`Ansatz`: oracles and losses then
evaluate the perturbed model like any other, with no extra argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from math import sqrt
from typing import Any, ClassVar, Protocol

from array_api_compat import array_namespace

from . import jets
from .keys import Key, fold_in
from .registry import check_one_library

__all__ = [
    "MLP",
    "Ansatz",
    "LayerMap",
    "PlainLayers",
    "PLAIN_LAYERS",
    "LayerMapNetwork",
    "with_network",
    "with_layer_map",
    "conform",
    "conform_to",
    "BOUNDARIES",
]

Params = list[dict[str, Any]]


class LayerMap(Protocol):
    """Each layer's affine map, as an :class:`MLP` applies it (see the module docstring).

    A map that perturbs the weights to W + ΔW (and the bias to b + δb)
    computes the products without forming W + ΔW.
    """

    def affine(self, layer_index: int, layer_params: dict, x, is_primal: bool):
        """x (W + ΔW)ᵀ + (b + δb) if ``is_primal``, else x (W + ΔW)ᵀ (a jet coefficient).

        ``x`` has any leading axes (jet coefficients carry direction axes); a
        map may add a leading query axis at the first layer (Q perturbed copies).
        """

    def columns(self, layer_index: int, layer_params: dict, index):
        """(W + ΔW)[:, index], shape (out, V) (or (Q, out, V)): the first layer's
        jet tangents along the coordinate directions e_j, j = ``index``, by a gather
        (k-sparse directions gather their V k columns here, then weight them)."""


class PlainLayers:
    """The unperturbed :class:`LayerMap`: x Wᵀ + b, and columns W[:, index] by a gather."""

    def affine(self, layer_index: int, layer_params: dict, x, is_primal: bool):
        """x Wᵀ + b if ``is_primal`` else x Wᵀ."""
        y = x @ layer_params["W"].T
        return y + layer_params["b"] if is_primal else y

    def columns(self, layer_index: int, layer_params: dict, index):
        """W[:, index], shape (out, V)."""
        W = layer_params["W"]
        return array_namespace(W).take(W, index, axis=1)


#: The plain network's layer map (what :meth:`MLP.apply` and :meth:`MLP.jet` use).
PLAIN_LAYERS = PlainLayers()


def _is_index_array(directions) -> bool:
    xp = array_namespace(directions)
    return xp.isdtype(directions.dtype, "integral")


def _is_gathered(directions) -> bool:
    """Whether the first layer meets ``directions`` by a column gather (index or sparse)."""
    return isinstance(directions, jets.SparseDirections) or _is_index_array(directions)


def _first_columns(columns, layer_params: dict, directions):
    """The first layer's tangents (out, V) (or (Q, out, V)) along index or sparse directions."""
    if not isinstance(directions, jets.SparseDirections):
        return columns(0, layer_params, directions)
    xp = array_namespace(directions.index)
    gathered = columns(0, layer_params, xp.reshape(directions.index, (-1,)))
    return jets.combine_columns(gathered, directions.weights)


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
    * :class:`~sdze_core.jets.SparseDirections` follow the same rules: the
      index is kept, the weights are cast.

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
    if isinstance(directions, jets.SparseDirections):
        index, weights = jets.check_sparse_directions(directions)
        x, index = conform_to(reference, x, index, owner)
        _, weights = conform_to(reference, x, weights, owner)
        return x, jets.SparseDirections(index, weights)
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

    #: :meth:`jet` takes :class:`~sdze_core.jets.SparseDirections` (oracles read
    #: this, and build dense directions for models without it).
    sparse_directions: ClassVar[bool] = True

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
                W = backend.scale(backend.normal(k, (n_out, n_in)), sqrt(2.0 / (n_in + n_out)))
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

    def apply(self, params: Params, x):
        """Network output for x of shape (B, d): shape (B,) (or (B, out) if out > 1)."""
        return self._apply(params, x, PLAIN_LAYERS)

    def jet(self, params: Params, x, directions, order: int, collapse: bool = False) -> jets.Jet:
        """Jet of the output along x(t) = x + t v for each direction v (docs/method.md#jets).

        Parameters
        ----------
        params : list of dict
            As returned by :meth:`init`.
        x : array, shape (B, d)
            Points.
        directions : array or SparseDirections
            Integer indices j of shape (V,): coordinate directions e_j, whose
            first layer is the gather W[:, j] (no one-hot is formed);
            :class:`~sdze_core.jets.SparseDirections` v = Σ_j w_j e_{i_j},
            whose first layer is Σ_j w_j W[:, i_j] (k gathers each); or float
            directions of shape (V, d) or (V, B, d).
        order : int
            K >= 1.
        collapse : bool
            Propagate the top coefficient already summed over the V directions
            (returns a :class:`~sdze_core.jets.CollapsedJet`).

        Returns
        -------
        Jet
            primal (B,), coefficients f_k = D^k u(x)[v, ..., v] of shape (V, B)
            (the collapsed top: shape (B,), Σ_v f_K[v]).
        """
        return self._jet(params, x, directions, order, collapse, PLAIN_LAYERS)

    def _apply(self, params: Params, x, layers: LayerMap):
        """:meth:`apply` with each layer's affine map from ``layers``."""
        self._check(params, x)
        x, _ = conform(params, x)
        h = x
        for layer, p in enumerate(params):
            h = layers.affine(layer, p, h, True)
            if layer < self.num_layers - 1:
                h = jets.derivatives(self.activation, h, 0)[0]
        return self._squeeze(h)

    def _jet(
        self, params: Params, x, directions, order: int, collapse: bool, layers: LayerMap
    ) -> jets.Jet:
        """:meth:`jet` with each layer's affine map (and the first layer's columns) from
        ``layers``."""
        self._check(params, x)
        x, directions = conform(params, x, directions)
        if _is_gathered(directions):
            columns = getattr(layers, "columns", None)
            if columns is None:
                raise TypeError(
                    "a layer map used with coordinate or sparse directions needs a "
                    "columns(layer_index, layer_params, index) method giving (out, V) columns"
                )
            first = params[0]
            tangents = _first_columns(columns, first, directions)
            h = jets.coordinate_jet(layers.affine(0, first, x, True), tangents, order, collapse)
        else:
            h = jets.input_jet(x, directions, order, collapse)
            h = jets.linear_map(h, partial(layers.affine, 0, params[0]))
        for layer in range(1, self.num_layers):
            h = jets.elementwise(h, self.activation)
            h = jets.linear_map(h, partial(layers.affine, layer, params[layer]))
        return jets.linear_map(h, lambda y, is_primal: self._squeeze(y))


@dataclass(frozen=True, eq=False)
class LayerMapNetwork:
    """An :class:`MLP` whose affine maps are ``layer_map``'s: a model-owned perturbation.

    It evaluates like the network itself (``init``, ``apply``, ``jet``), with
    the outputs of ``layer_map``'s network: with a map that adds a query axis
    (the SDZE sampler's), shape (Q, B) instead of (B,). Build one into a model
    with :func:`with_layer_map`.

    Parameters
    ----------
    network : MLP
    layer_map : LayerMap
    """

    network: MLP
    layer_map: LayerMap

    sparse_directions: ClassVar[bool] = True

    @property
    def sizes(self) -> tuple[int, ...]:
        return self.network.sizes

    @property
    def num_layers(self) -> int:
        return self.network.num_layers

    @property
    def activation(self) -> str:
        return self.network.activation

    def init(self, key: Key, backend) -> Params:
        """The network's parameters (:meth:`MLP.init`)."""
        return self.network.init(key, backend)

    def apply(self, params: Params, x):
        """The output of the mapped network (:meth:`MLP.apply`)."""
        return self.network._apply(params, x, self.layer_map)

    def jet(self, params: Params, x, directions, order: int, collapse: bool = False) -> jets.Jet:
        """The jet of the mapped network; arguments as :meth:`MLP.jet`."""
        return self.network._jet(params, x, directions, order, collapse, self.layer_map)


def with_network(model, wrap: Callable[[MLP], Any], purpose: str = "a network wrapper"):
    """``model`` with its network N replaced by ``wrap(N)``: how a perturbation enters a model.

    Parameters
    ----------
    model : MLP or model dataclass
        An :class:`MLP` (the result is ``wrap(model)``) or a dataclass whose
        ``network`` field is one, such as :class:`Ansatz` (the result is
        ``dataclasses.replace(model, network=wrap(model.network))``).
    wrap : callable
        ``wrap(network)`` -> the network to use instead.
    purpose : str
        What needs the replacement, for the error message.

    Raises
    ------
    TypeError
        If ``model`` is neither.
    """
    if isinstance(model, MLP):
        return wrap(model)
    network = getattr(model, "network", None)
    if isinstance(network, MLP) and dataclasses.is_dataclass(model):
        return dataclasses.replace(model, network=wrap(network))
    raise TypeError(
        f"{purpose} needs an MLP or a model dataclass with an MLP `network` field "
        f"(such as Ansatz), got {type(model).__name__}"
    )


def with_layer_map(model, layer_map: LayerMap, purpose: str = "a layer map"):
    """``model`` whose network applies ``layer_map`` (a :class:`LayerMapNetwork`), by
    :func:`with_network`."""
    return with_network(model, partial(LayerMapNetwork, layer_map=layer_map), purpose)


#: Boundary factors g(x) of :class:`Ansatz`, vanishing on the domain's boundary.
BOUNDARIES = ("ball", "annulus")


@dataclass(frozen=True)
class Ansatz:
    """PINN ansatz u(x) = g(x) N(x) with a boundary factor g (docs/method.md#benchmark-problems).

    * ``"ball"``: g = 1 − ‖x‖², zero on the unit sphere;
    * ``"annulus"``: g = (1 − ‖x‖²)(4 − ‖x‖²), zero on ‖x‖ = 1 and ‖x‖ = 2.

    The jet is the product rule (u)_k = Σ_j C(k, j) g_j N_{k-j} on the jets of
    g and N; along coordinate directions the jet of ‖x‖² is
    (‖x‖², 2 x_j, 2, 0, ...), one gather per direction (along sparse ones
    (‖x‖², 2 ⟨x, v⟩, 2 ‖v‖², 0, ...), k gathers).

    Parameters
    ----------
    network : MLP
        N, with a scalar output (last size 1) (or a wrapper of one, such as a
        :class:`LayerMapNetwork`).
    boundary : {"ball", "annulus"}
    """

    network: MLP
    boundary: str = "ball"

    @property
    def sparse_directions(self) -> bool:
        """Whether :meth:`jet` takes sparse directions: when the network's does."""
        return getattr(self.network, "sparse_directions", False)

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

    def apply(self, params: Params, x):
        """u(x) = g(x) N(x) for x of shape (B, d); shape (B,)."""
        x, _ = conform(params, x)
        norm2 = jets.rowwise_squared_norm(x)
        g = 1.0 - norm2
        if self.boundary == "annulus":
            g = g * (4.0 - norm2)
        return g * self.network.apply(params, x)

    def jet(self, params: Params, x, directions, order: int, collapse: bool = False) -> jets.Jet:
        """Jet of u = g N along each direction; arguments as :meth:`MLP.jet`."""
        x, directions = conform(params, x, directions)
        net = self.network.jet(params, x, directions, order, collapse)
        if isinstance(directions, jets.SparseDirections):
            norm2 = jets.sparse_squared_norm(x, directions, order)
        elif _is_index_array(directions):
            norm2 = jets.coordinate_squared_norm(x, directions, order)
        else:
            norm2 = jets.squared_norm(jets.input_jet(x, directions, order))
        g = self._boundary_factor(norm2)
        # A perturbed network may add leading batch axes (queries): g broadcasts over them.
        extra = net.primal.ndim - g.primal.ndim
        return jets.mul(jets.insert_batch_axes(g, extra) if extra else g, net)
