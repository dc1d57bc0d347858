"""The SDZE training step: CRNS perturber + sampler + optimizer (docs/method.md#crns,
#subspace-perturbations).

One step t, with the run's key k::

    k_t = fold_in(k, t)
    spatial, param = fold_in(k_t, "spatial"), fold_in(k_t, "param")
    state, params, transition = sampler.refresh(state, params, t)   # every T steps
    z = sampler.draw(state, params, param, q)                       # small: S_i, z_b
    g = perturber.estimate(loss, params, sampler, state, z, spatial) # one batched pass
    ĝ = sampler.project(z, g)                                        # (1/q) Σ g_i z_i
    opt_state = optimizer.rebase(opt_state, transition)              # new bases only
    D, opt_state = optimizer.update(ĝ, opt_state, t)
    state, params = sampler.apply(state, params, z, D)               # W += U D Vᵀ

Spatial and parameter randomness come from separate branches of the key
tree, so redrawing z never changes ξ. A NaN or Inf among the losses raises
:class:`~sdze_core.perturbers.NonFiniteLossError`, and one in the update
(e.g. from the learning rate's schedule)
:class:`~sdze_core.perturbers.NonFiniteUpdateError`, before anything is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from array_api_compat import array_namespace

from .keys import Key, fold_in
from .models import with_layer_map
from .optimizers import Optimizer, zo_sgd
from .perturbers import CRNSPerturber, NonFiniteLossError, NonFiniteUpdateError
from .registry import backend_of
from .samplers import LowRankSubspace, Sampler

__all__ = ["SDZE", "SDZEState", "StepInfo", "step_keys"]


def step_keys(run_key: Key, step: int) -> tuple[Key, Key]:
    """(spatial, parameter) keys of step t: ``fold_in(fold_in(run_key, t), "spatial" | "param")``.

    Shared by every training method, so the same seed draws the same
    collocation points and oracle directions whatever the method.
    """
    step_key = fold_in(run_key, step)
    return fold_in(step_key, "spatial"), fold_in(step_key, "param")


class SDZEState(NamedTuple):
    """Everything a run carries besides the parameters: O(1) in P.

    Attributes
    ----------
    step : int
        The next step's index t.
    key : Key
        The run's step key (step t uses ``fold_in(key, t)``).
    sampler : Any
        The sampler's state (bases or their key, pending r × r updates).
    optimizer : Any
        The optimizer's state (counters, moments in subspace coordinates).
    """

    step: int
    key: Key
    sampler: Any
    optimizer: Any


class StepInfo(NamedTuple):
    """What a step reports: ``loss`` ≈ ℓ(θ; ξ_t) (host float) and ``g`` (q,)."""

    loss: float
    g: Any


def all_finite(tree) -> bool:
    """Whether every array of a list/tuple/dict tree is free of NaN and Inf (one host sync)."""
    leaves, stack = [], [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif node is not None:
            leaves.append(node)
    if not leaves:
        return True
    xp = array_namespace(leaves[0])
    return bool(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in leaves])))


@dataclass(frozen=True)
class SDZE:
    """Zeroth-order PINN training without back-propagation.

    Parameters
    ----------
    perturber : CRNSPerturber
        The gradient estimator (q, ε, CRNS on/off, central or forward).
    sampler : Sampler
        The perturbation directions (default :class:`LowRankSubspace`).
    optimizer : Optimizer
        Default ZO-SGD with η = 1e-3.

    Examples
    --------
    >>> engine = SDZE(CRNSPerturber(num_queries=4), LowRankSubspace(rank=8), zo_adam(1e-3))
    >>> state = engine.init(key, params)
    >>> for _ in range(1000):
    ...     params, state, info = engine.step(loss, params, state)
    >>> u = engine.evaluation_model(model, params, state).apply(params, x)  # unmerged
    >>> state, params = engine.merge(params, state)   # fold pending updates into W
    """

    perturber: CRNSPerturber = field(default_factory=CRNSPerturber)
    sampler: Sampler = field(default_factory=LowRankSubspace)
    optimizer: Optimizer = field(default_factory=zo_sgd)

    def __post_init__(self):
        if self.optimizer.needs_coordinates and not self.sampler.has_coordinates:
            raise ValueError(
                f"{type(self.sampler).__name__} has no small coordinates: momentum and Adam "
                "would need P-sized moments; use zo_sgd without momentum or a subspace sampler"
            )

    def init(self, key: Key, params) -> SDZEState:
        """State for a run from ``key``: sampler from ``fold_in(key, "sampler")``,
        step keys from ``fold_in(key, "steps")``."""
        sampler_state = self.sampler.init(fold_in(key, "sampler"), params)
        template = self.sampler.zero_coordinates(params, self.perturber.num_queries)
        return SDZEState(0, fold_in(key, "steps"), sampler_state, self.optimizer.init(template))

    def step_keys(self, state: SDZEState) -> tuple[Key, Key]:
        """(spatial, parameter) keys of the next step (:func:`step_keys`)."""
        return step_keys(state.key, state.step)

    def step(self, loss, params, state: SDZEState):
        """One SDZE step: ``(params, state, info)``.

        Parameters are updated in place where the backend's arrays are
        mutable (NumPy, PyTorch, CuPy) and donated on JAX: keep using the
        returned ``params`` (copy them first if the originals are needed).

        Raises
        ------
        NonFiniteLossError
            If a perturbed loss is NaN or Inf. Nothing of the step is applied;
            the error's ``params`` and ``state`` are the last good state, the
            network before this step (at a basis refresh the pending update
            has been folded into W: use these, not the arguments).
        NonFiniteUpdateError
            If the losses are finite but the update is not (a NaN or Inf
            learning rate, an overflow): nothing is applied, as above.
        """
        t = state.step
        spatial_key, param_key = self.step_keys(state)
        sampler_state, params, transition = self.sampler.refresh(state.sampler, params, t)
        opt_state = state.optimizer
        if transition is not None:
            opt_state = self.optimizer.rebase(opt_state, transition)
        # (params, before) is the network before this step, whatever happens below.
        before = SDZEState(t, state.key, sampler_state, opt_state)
        directions = self.sampler.draw(sampler_state, params, param_key, self.perturber.num_queries)
        estimate = self.perturber.estimate(
            loss, params, self.sampler, sampler_state, directions, spatial_key
        )
        xp = array_namespace(estimate.g)
        if not bool(xp.all(xp.isfinite(estimate.losses))):
            values = backend_of(estimate.g).to_host(estimate.losses).tolist()
            raise NonFiniteLossError(
                f"step {t}: the loss is not finite at the perturbed parameters ({values}); "
                "the step was not applied (the error's .params and .state hold the last good "
                "state). Lower the learning rate or eps, or check the problem.",
                step=t,
                losses=values,
                params=params,
                state=before,
            )
        if estimate.observation is not None:
            sampler_state = self.sampler.observe(sampler_state, *estimate.observation)
        coords = self.sampler.project(directions, estimate.g)
        updates, opt_state = self.optimizer.update(coords, opt_state, t)
        if not all_finite(updates):
            raise NonFiniteUpdateError(
                f"step {t}: the update is not finite although the losses are (check the "
                "learning rate and its schedule); the step was not applied (the error's "
                ".params and .state hold the last good state).",
                step=t,
                losses=backend_of(estimate.g).to_host(estimate.losses).tolist(),
                params=params,
                state=before,
            )
        sampler_state, params = self.sampler.apply(sampler_state, params, directions, updates)
        new_state = SDZEState(t + 1, state.key, sampler_state, opt_state)
        return params, new_state, StepInfo(float(estimate.loss), estimate.g)

    def merge(self, params, state: SDZEState):
        """``(state, params)`` with any pending low-rank update folded into the weights."""
        sampler_state, params = self.sampler.merge(state.sampler, params)
        return state._replace(sampler=sampler_state), params

    def evaluation_model(self, model, params, state: SDZEState):
        """The model of the current network, pending low-rank update included, unmerged.

        ``model`` itself when nothing is pending; otherwise ``model`` with the
        sampler's evaluation layer map W x + U (A (Vᵀ x))
        (:func:`~sdze_core.models.with_layer_map`). For test errors and the
        loss of the network a checkpoint saves, without touching W.
        """
        layers = self.sampler.evaluation_layer_map(state.sampler, params)
        if layers is None:
            return model
        return with_layer_map(model, layers, "evaluating SDZE's unmerged network")
