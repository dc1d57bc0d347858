"""What the solver needs from a PDE problem: the :class:`PDEProblem` protocol (docs/problems.md).

A problem is any object with these members; nothing has to be subclassed.
For an equation

    L u = F(u, x) + f(x)   in the domain Ω ⊂ R^d,

with the boundary condition built into the model (a hard-boundary ansatz),
the solver trains on the residual r = L̂u − F(u, x) − f(x), L̂ the oracle's
estimate of L u (:class:`~sdze_core.objectives.ResidualLoss`).

Required (:data:`REQUIRED`): ``dim``, ``sample_domain``, ``model``, and
``oracle`` unless the problem builds its own loss (``loss`` below).
Optional (:data:`OPTIONAL`), each with the meaning it has when absent:

* ``reaction(u, x)``: F(u, x); absent, F = 0;
* ``forcing(x)``: f(x); absent, f = 0;
* ``exact(x)``: the exact solution u*(x); absent, no relative errors are
  measured (``metrics.json`` says so and ``error.png`` is not drawn) and
  ``sdze eval`` has nothing to evaluate against;
* ``reference()``: ``(points, values)``, reference values u_ref of the
  solution at a few points (shapes (R, dim) and (R,), on the problem's
  backend), or ``None`` when none is known (e.g. for this dimension);
  absent or ``None``, nothing is scored against it. With one, every
  evaluation records ``rel_ref`` = ‖u_θ(p) − u_ref‖₂ / ‖u_ref‖₂ and the
  values ``u_ref`` = u_θ(p) (:class:`~sdze_core.training.ReferenceSet`):
  the score of a problem without an exact solution, such as STDE's
  parabolic problems at (0, 0) (:mod:`sdze_core.parabolic`).
* ``loss(model, *, num_directions, batch_size, unbiased)``: the training
  loss, for example a :class:`~sdze_core.loss_terms.WeightedLoss` of an
  interior residual with boundary, initial/terminal or data terms; absent,
  the solver trains on the interior residual alone,
  ``ResidualLoss(model, oracle(num_directions), reaction, sample_domain(·, batch_size),
  unbiased, forcing)``, the boundary condition being built into the model.

The built-in :class:`~sdze_core.problems.Problem` has every member.
"""

from __future__ import annotations

import operator
from typing import Any, Protocol, runtime_checkable

from .keys import Key

__all__ = [
    "PDEProblem",
    "REQUIRED",
    "OPTIONAL",
    "missing_members",
    "check_problem",
    "has_exact",
    "reference_of",
    "reaction_of",
    "loss_of",
]

#: The members every problem must have (``oracle`` only when it has no ``loss``).
REQUIRED = ("dim", "sample_domain", "model", "oracle")
#: The members a problem may have, and what their absence means.
OPTIONAL = {
    "reaction": "F(u, x) = 0",
    "forcing": "f(x) = 0",
    "exact": "no exact solution: no relative errors",
    "reference": "no reference values: no rel_ref",
    "loss": "the interior residual's ResidualLoss, boundary condition in the model",
}


@runtime_checkable
class PDEProblem(Protocol):
    """A PDE problem the solver can train on (the required members; see the module docstring).

    Attributes
    ----------
    dim : int
        The number of coordinates of a point x (the network's input size).

    Optional members (called only when present)::

        reaction(u, x) -> F(u, x)   u of shape (B,) or (Q, B), x (B, dim); broadcasting against u
        forcing(x)     -> f(x)      shape (B,), a function of the points only
        exact(x)       -> u*(x)     shape (B,)
        reference()    -> (points, values) of shapes (R, dim) and (R,), or None
        loss(model, *, num_directions, batch_size, unbiased) -> the training loss

    The loss is a dataclass with a ``model`` field, ``sample(key)`` -> ξ and
    ``loss(params, ξ)`` -> ℓ of shape () or (Q,) (as
    :class:`~sdze_core.objectives.ResidualLoss` and
    :class:`~sdze_core.loss_terms.WeightedLoss`), built around the ``model``
    it is given: the zeroth-order methods replace that field by a perturbed
    copy. ``batch_size`` is the solver's interior batch; the problem chooses
    the other terms' batches and weights.
    """

    dim: int

    def sample_domain(self, key: Key, num_points: int, backend: Any = None) -> Any:
        """Points of the domain Ω, shape (num_points, dim), drawn from ``key`` only.

        Draw with ``backend`` when it is given (the test points are drawn with
        the portable generator so that they are the same on every backend),
        else with the backend the problem was made for. The same key must
        give the same points.
        """

    def model(self, width: int = 128, depth: int = 4, activation: str = "tanh") -> Any:
        """The network u_θ with the boundary condition built in.

        An :class:`~sdze_core.models.MLP` of sizes (dim, width × depth, 1), an
        :class:`~sdze_core.models.Ansatz` around one, or a dataclass with an
        MLP ``network`` field and ``init(key, backend)``, ``apply(params, x)``
        → (B,) and ``jet(params, x, directions, order, collapse=False)`` (what
        the methods and checkpoints use). The zeroth-order methods perturb it
        by replacing its network (docs/sdze.md, "The perturbation belongs to
        the model"), so ``apply`` and ``jet`` broadcast over the leading query
        axes of a perturbed network's output.
        """

    def oracle(self, num_directions: int = 16) -> Any:
        """The estimator of L u: an :class:`~sdze_core.oracles.Oracle` whose
        ``estimate(...).value`` has shape (B,) (or (Q, B) for a model that
        carries Q perturbed networks).

        Cap ``num_directions`` at the number of directions the operator has
        (e.g. ``SparseLaplacian(min(num_directions, dim))``).
        """


def missing_members(problem: Any) -> list[str]:
    """The required members (:data:`REQUIRED`) that ``problem`` lacks or has not callable."""
    required = REQUIRED if not hasattr(problem, "loss") else REQUIRED[:-1]
    missing = [name for name in required if not hasattr(problem, name)]
    uncallable = [
        name for name in REQUIRED[1:] + tuple(OPTIONAL)
        if hasattr(problem, name) and not callable(getattr(problem, name))
    ]
    return missing + [f"{name} (not callable)" for name in uncallable]


def check_problem(problem: Any, origin: str) -> Any:
    """``problem`` itself if it has the protocol's members.

    Raises
    ------
    TypeError
        Naming the missing members and ``origin`` (where the object came
        from, e.g. ``"problem factory 'mine'"``), or if ``dim`` is not a
        positive integer.
    """
    missing = missing_members(problem)
    if missing:
        raise TypeError(
            f"{origin} returned a {type(problem).__name__} that lacks {', '.join(missing)}: "
            f"a problem needs {', '.join(REQUIRED[:-1])} and an oracle or a loss "
            f"(sdze_core.problem_protocol.PDEProblem)"
        )
    dim = problem.dim
    try:
        ok = not isinstance(dim, bool) and operator.index(dim) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise TypeError(f"{origin} returned a problem whose dim is {dim!r}, not an int >= 1")
    return problem


def has_exact(problem: Any) -> bool:
    """Whether ``problem`` has an exact solution ``exact(x)``."""
    return callable(getattr(problem, "exact", None))


def reference_of(problem: Any):
    """``problem.reference()`` checked: ``(points, values)``, or ``None`` without one.

    Raises
    ------
    ValueError
        If the reference is not a pair of arrays of shapes (R, dim) and (R,).
    """
    method = getattr(problem, "reference", None)
    reference = method() if callable(method) else None
    if reference is None:
        return None
    try:
        points, values = reference
        ok = tuple(points.shape[1:]) == (problem.dim,) and tuple(values.shape) == (points.shape[0],)
    except (TypeError, ValueError, AttributeError, IndexError):
        ok = False
    if not ok:
        raise ValueError(
            f"{type(problem).__name__}.reference() must return None or (points, values) of "
            f"shapes (R, {problem.dim}) and (R,), got {reference!r}"
        )
    return points, values


def _no_reaction(u, x):
    """F(u, x) = 0."""
    return 0.0


def reaction_of(problem: Any):
    """``problem.reaction``, or F = 0 when the problem has none."""
    return getattr(problem, "reaction", None) or _no_reaction


def loss_of(problem: Any, model, *, num_directions: int, batch_size: int, unbiased: bool):
    """The training loss of ``problem`` around ``model`` (see the module docstring).

    ``problem.loss(...)`` when the problem has one, else the interior residual's
    :class:`~sdze_core.objectives.ResidualLoss`.

    Raises
    ------
    TypeError
        If ``problem.loss`` returns something that is not a dataclass with a
        ``model`` field and ``sample`` (what the methods need to perturb and draw it).
    """
    from .objectives import ResidualLoss, model_of

    if not hasattr(problem, "loss"):
        return ResidualLoss(
            model,
            problem.oracle(num_directions),
            reaction_of(problem),
            lambda k: problem.sample_domain(k, batch_size),
            unbiased=unbiased,
            forcing=getattr(problem, "forcing", None),
        )
    loss = problem.loss(
        model, num_directions=num_directions, batch_size=batch_size, unbiased=unbiased
    )
    model_of(loss, f"{type(problem).__name__}.loss")
    if not (callable(getattr(loss, "sample", None)) and callable(loss)):
        raise TypeError(
            f"{type(problem).__name__}.loss returned a {type(loss).__name__} without "
            f"sample(key) and __call__(params, xi): a loss needs both (e.g. WeightedLoss)"
        )
    return loss
