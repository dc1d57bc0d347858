"""Zeroth-order gradient estimators with common random numbers (docs/method.md#crns).

:class:`CRNSPerturber` turns a loss ℓ(θ; ξ), the step's spatial key and q
perturbation directions z_i into q projected gradients

    g_i = (ℓ(θ + ε z_i; ξ) − ℓ(θ − ε z_i; ξ)) / (2ε),

with ξ drawn ONCE from the spatial key and shared by both sides and all
queries: then ℓ(θ + εz; ξ) − ℓ(θ − εz; ξ) = 2ε zᵀ∇ℓ(θ; ξ) + O(ε³) and the
estimate's second moment stays bounded as ε → 0. With ``crns=False`` the two
sides use independent ξ⁺, ξ⁻ (the naive estimator, kept for the ablation):
the O(1) difference ℓ(θ; ξ⁺) − ℓ(θ; ξ⁻) makes the second moment grow as ε⁻².

The 2q perturbed evaluations run as one batched forward pass: the
perturbation belongs to the model (docs/sdze.md, "The perturbation belongs to
the model"). The sampler's layer map, put into the loss's model with
:func:`~sdze_core.models.with_layer_map` and the model into the loss with
:func:`~sdze_core.objectives.with_model`, adds a query axis at the first
layer, whose x Wᵀ (and Vᵀx) is computed once for all of them; the oracle and
the loss evaluate the perturbed model like any other.

``estimator="forward"`` is the ε → 0 limit, the forward gradient
g_i = zᵢᵀ∇ℓ(θ; ξ), computed exactly by carrying the parameter tangent through
the same forward pass (jets included): the perturbation is the imaginary
step θ + i h z and g_i = Im ℓ(θ + i h z_i; ξ) / h (complex step, Squire &
Trapp 1998), which for the analytic functions a PINN loss is built from
(matmuls, tanh/sin/exp..., polynomials in the jets) equals dual-number
forward mode up to O(h²) ≈ 1e-20 relative: no difference is taken, so
there is no cancellation and no ε to choose. It costs q complex instead of
2q real evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .keys import Key, fold_in
from .models import with_layer_map
from .objectives import model_of, with_model
from .validation import positive_number

__all__ = [
    "CRNSPerturber",
    "ZOEstimate",
    "NonFiniteLossError",
    "NonFiniteUpdateError",
    "ESTIMATORS",
    "default_eps",
]

#: Gradient estimators of :class:`CRNSPerturber`.
ESTIMATORS = ("central", "forward")

#: Complex-step sizes: tiny, so O(h²) is far below round-off, yet h² stays normal.
_COMPLEX_STEP = {"float32": 1e-10, "float64": 1e-20}


class NonFiniteLossError(FloatingPointError):
    """A loss evaluation gave NaN or Inf: the step was not applied.

    Attributes
    ----------
    step : int or None
        The training step.
    losses : list of float
        The evaluated losses (host values) of the step's queries.
    params, state
        The last good parameters and engine state (the network before the
        failed step), when raised by :meth:`sdze_core.engine.SDZE.step`.
    """

    def __init__(self, message: str, step: int | None = None, losses=(), params=None, state=None):
        super().__init__(message)
        self.step = step
        self.losses = list(losses)
        self.params = params
        self.state = state


    #: The divergence rule it reports (``Divergence.reason``).
    reason = "non-finite loss"


class NonFiniteUpdateError(NonFiniteLossError):
    """The losses were finite but the step's update was NaN or Inf: it was not applied.

    As :class:`NonFiniteLossError`; ``params`` and ``state`` are the network
    before the step, whose loss (the mean of ``losses``) was finite.
    """

    reason = "non-finite update"


class ZOEstimate(NamedTuple):
    """What :meth:`CRNSPerturber.estimate` returns.

    Attributes
    ----------
    g : array, shape (q,)
        Projected gradients g_i ≈ z_iᵀ∇ℓ(θ; ξ).
    loss : array, shape ()
        ℓ(θ; ξ) up to O(ε²): the mean of the 2q perturbed losses (the real
        part for the forward gradient), free of an extra evaluation.
    losses : array
        Every evaluated loss: (2q,) for ``central`` (the q plus then the q
        minus sides), (q,) complex for ``forward``.
    observation : tuple or None
        ``(x, r)``: the points (B, d) and the residuals at θ up to O(ε²) (B,),
        the mean over the 2q evaluations; only for a sampler that
        :attr:`~sdze_core.samplers.Sampler.wants_residuals` (central, CRNS).
    """

    g: Any
    loss: Any
    losses: Any
    observation: Any = None


def _dtype_name(x) -> str:
    xp = array_namespace(x)
    return "float64" if x.dtype == xp.float64 else "float32"


def default_eps(dtype_name: str) -> float:
    """ε for central differences: 1e-3 in float32, 1e-5 in float64.

    With CRNS the difference ℓ⁺ − ℓ⁻ ≈ 2ε zᵀ∇ℓ loses about u |ℓ| / ε to
    round-off (u the unit round-off: 6e-8 in float32), while the O(ε²)
    truncation error is harmless for an unbiased-in-expectation step: 1e-3
    keeps float32 round-off at ~1e-4 relative, 1e-5 keeps float64's at ~1e-11.
    The perturbations are scaled so that ε is the relative size of the change
    of each pre-activation (E‖Z‖_F² = m n for an m × n weight).
    """
    return 1e-3 if dtype_name == "float32" else 1e-5


@dataclass(frozen=True)
class CRNSPerturber:
    """Zeroth-order projected gradients with common random numbers (docs/method.md#crns).

    Parameters
    ----------
    eps : float, optional
        The finite-difference step ε (default :func:`default_eps` of the
        parameters' dtype). Unused by the forward gradient.
    num_queries : int
        q, the number of perturbation directions per step (default 1).
    crns : bool
        Share ξ between the ± sides and the queries (default). ``False`` draws
        independent ξ⁺ and ξ⁻ from ``fold_in(spatial_key, "plus"/"minus")``.
    estimator : {"central", "forward"}
        Central differences, or the exact directional derivative by a
        complex step (see the module docstring).
    """

    eps: float | None = None
    num_queries: int = 1
    crns: bool = True
    estimator: str = "central"

    def __post_init__(self):
        q = self.num_queries
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"num_queries must be an int >= 1, got {q!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(
                f"unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}"
            )
        if self.eps is not None:
            positive_number("eps", self.eps)
        if self.estimator == "forward" and not self.crns:
            raise ValueError("the forward gradient has no ± sides: crns=False does not apply")

    def eps_for(self, params) -> float:
        """ε for these parameters (the default follows their dtype)."""
        if self.eps is not None:
            return float(self.eps)
        return default_eps(_dtype_name(params[0]["W"]))

    def estimate(self, loss, params, sampler, sampler_state, directions, key: Key) -> ZOEstimate:
        """The q projected gradients for the step whose spatial key is ``key``.

        Parameters
        ----------
        loss : ResidualLoss
            ``loss.sample(key)`` draws ξ, ``loss(params, ξ)`` evaluates; a
            dataclass with a ``model`` field (an MLP or a model dataclass with
            an MLP ``network``, such as Ansatz), which is replaced by the
            perturbed model (:func:`~sdze_core.objectives.with_model`).
        params : list of dict
            θ.
        sampler, sampler_state, directions
            The sampler, its state and the step's directions (from ``sampler.draw``).
        key : Key
            The step's spatial key: ξ depends on it alone.

        Raises
        ------
        TypeError
            If the loss is not a dataclass with a ``model`` field, or its model
            has no MLP network to perturb.
        """
        q = self.num_queries
        queries = list(range(q))

        def perturbed(query_index, scales):
            """The loss of the networks θ + s_k z_{i_k}, one per query k."""
            layers = sampler.layer_map(sampler_state, directions, query_index, scales)
            return _perturbed_loss(loss, layers)

        if self.estimator == "forward":
            h = _COMPLEX_STEP[_dtype_name(params[0]["W"])]
            at = perturbed(queries, [complex(0.0, h)] * q)
            values = _batched(at(params, loss.sample(key)), q)
            xp = array_namespace(values)
            return ZOEstimate(xp.imag(values) / h, xp.mean(xp.real(values)), values)
        eps = self.eps_for(params)
        observation = None
        if self.crns:
            at = perturbed(queries * 2, [eps] * q + [-eps] * q)
            xi = loss.sample(key)
            if getattr(sampler, "wants_residuals", False):
                if not hasattr(loss, "residuals"):
                    raise TypeError(
                        f"{type(sampler).__name__}(residual_aligned=True) aligns its basis "
                        f"with the loss's residuals, and a {type(loss).__name__} has none "
                        "(no .residuals): use a ResidualLoss or residual_aligned=False"
                    )
                values, observation = _values_and_mean_residual(at, params, xi)
            else:
                values = at(params, xi)
            values = _batched(values, 2 * q)
        else:
            plus, minus = perturbed(queries, [eps] * q), perturbed(queries, [-eps] * q)
            xp = array_namespace(params[0]["W"])
            values = xp.concat(
                [
                    _batched(plus(params, loss.sample(fold_in(key, "plus"))), q),
                    _batched(minus(params, loss.sample(fold_in(key, "minus"))), q),
                ]
            )
        xp = array_namespace(values)
        g = (values[:q] - values[q:]) / (2.0 * eps)
        return ZOEstimate(g, xp.mean(values), values, observation)


def _perturbed_loss(loss, layers):
    """``loss`` evaluating its model with the layer map ``layers`` (every query's copy)."""
    purpose = "the subspace perturbation (CRNSPerturber)"
    model = with_layer_map(model_of(loss, purpose), layers, purpose)
    return with_model(loss, model, purpose)


def _batched(values, count: int):
    """``values`` if it holds one loss per perturbed network, shape (count,); else a clear error."""
    shape = tuple(getattr(values, "shape", ()))
    if shape != (count,):
        raise ValueError(
            f"the loss returned shape {shape} for a batch of {count} perturbed networks; it "
            f"must return one loss per network, shape ({count},): evaluate the model in its "
            "`model` field, which the perturber replaces by the perturbed one (see ResidualLoss)"
        )
    return values


def _values_and_mean_residual(loss, params, xi):
    """The 2q losses (as ``loss(params, xi)`` computes them) and (x, mean residual)."""
    r = loss.residuals(params, xi)
    x = getattr(xi, "x", None)
    if x is None or tuple(r[0].shape[-1:]) != tuple(x.shape[:1]):
        points = "no single point set (no .x)" if x is None else f"{x.shape[0]} points"
        raise TypeError(
            "LowRankSubspace(residual_aligned=True) aligns its basis with one residual per "
            f"point, and a {type(loss).__name__} gave {r[0].shape[-1]} residuals for "
            f"{points} (a loss with several point sets, e.g. boundary or data terms): "
            "use residual_aligned=False"
        )
    xp = array_namespace(r[0])
    product = r[0] * r[1] if len(r) == 2 else r[0] * r[0]
    mean_r = sum(xp.mean(ri, axis=0) for ri in r) / len(r)
    return xp.mean(product, axis=-1), (x, mean_r)
