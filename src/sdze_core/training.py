"""The training loop: a problem, a model, a loss and a method (SDZE or first-order).

:func:`train` runs steps of any *method* with the interface of
:class:`~sdze_core.engine.SDZE` (``init``, ``step``, ``evaluation_model``; the
first-order baseline :class:`~sdze_core.first_order.FirstOrderAdam` has the
same), evaluates the relative errors on a fixed :class:`TestSet` every
``eval_every`` steps, and stops early on divergence. Everything the loop
keeps between steps is in :class:`TrainState` (the method's state, the
step count, the loss record), so a run saved at step t and resumed replays
exactly the steps t, t + 1, ... it would have taken: the step keys depend
on (run key, t) only.

Memory: nothing of size (points × d) outlives the step that drew it; the
test points are drawn in blocks from their own key, evaluated in groups of
bounded size and cached only while the whole test set is small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from array_api_compat import array_namespace

from .keys import Key, fold_in
from .objectives import with_model
from .perturbers import NonFiniteLossError, NonFiniteUpdateError
from .validation import SettingError, count, positive_number

__all__ = [
    "TestSet",
    "ReferenceSet",
    "TestSets",
    "TrainState",
    "TrainResult",
    "Divergence",
    "train",
    "block_points",
]

#: Most test points per block (each block drawn from fold_in(test key, block index)).
TEST_BLOCK = 100

#: The test set is cached on the device when it has at most this many numbers.
CACHE_LIMIT = 1 << 25

#: Numbers per evaluation group (blocks are concatenated up to this, 1 GiB in float32).
GROUP_LIMIT = 1 << 28


def block_points(dim: int) -> int:
    """Points per drawn block: :data:`TEST_BLOCK`, fewer when d > 2^24 / 100.

    The portable draws of a block have temporaries a few times its size, so
    a block holds at most 2^24 numbers (and at least one point). It depends
    on d only: the test points are the same on every backend.
    """
    return max(1, min(TEST_BLOCK, (1 << 24) // dim))


class TestSet:
    """Fixed test points of a problem and the exact solution on them.

    Block i holds :func:`block_points` (d) points (fewer in the last
    block) drawn uniformly in the domain with *portable* draws from
    ``fold_in(key, i)``: the same points on every backend, so errors of runs
    on different backends are comparable.

    The errors (docs/method.md#benchmark-problems)::

        rel_l2   = ‖u_θ − u*‖₂ / ‖u*‖₂,   rel_linf = max |u_θ − u*| / max |u*|

    over the test points, accumulated group by group (sums and maxima on
    the host). A group is consecutive blocks with at most
    :data:`GROUP_LIMIT` numbers, evaluated in one forward pass (one read of
    the first layer's weights per group); only one group exists at a time,
    unless the whole set has at most :data:`CACHE_LIMIT` numbers and is
    kept for the next evaluation.

    Parameters
    ----------
    problem : PDEProblem
        Any problem with ``sample_domain`` and ``exact``
        (:class:`~sdze_core.problem_protocol.PDEProblem`).
    num_points : int
    key : Key
        The test key (the solver uses ``fold_in(key(seed), "test")``).
    backend : Backend, optional
        Whose portable generator draws the points (default ``problem.backend``).
    """

    __test__ = False  # not a pytest class

    def __init__(self, problem, num_points: int, key: Key, cache_limit: int = CACHE_LIMIT,
                 backend=None):
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.problem = problem
        self.num_points = int(num_points)
        self.key = key
        self.block = block_points(problem.dim)
        self.group = max(1, GROUP_LIMIT // (problem.dim * self.block)) * self.block
        self._portable = (backend or problem.backend).with_config(rng="portable")
        self._cache = [] if self.num_points * problem.dim <= cache_limit else None

    def _draw(self, start: int, stop: int):
        """Points [start, stop) (block-aligned start) and u* on them."""
        xs = [
            self.problem.sample_domain(
                fold_in(self.key, i // self.block),
                min(self.block, stop - i),
                backend=self._portable,
            )
            for i in range(start, stop, self.block)
        ]
        x = xs[0] if len(xs) == 1 else array_namespace(xs[0]).concat(xs, axis=0)
        del xs
        return x, self.problem.exact(x)

    def blocks(self):
        """Yield ``(x, u*(x))`` group by group (all points, in block order)."""
        starts = range(0, self.num_points, self.group)
        if self._cache is not None:
            if not self._cache:
                self._cache = [self._draw(i, min(i + self.group, self.num_points)) for i in starts]
            yield from self._cache
            return
        for start in starts:
            yield self._draw(start, min(start + self.group, self.num_points))

    def errors(self, model, params) -> dict[str, float]:
        """``{"rel_l2": ..., "rel_linf": ...}`` of the model (a method's unmerged
        network: its ``evaluation_model(model, params, state)``)."""
        sq_err = sq_ref = max_err = max_ref = 0.0
        for x, u_star in self.blocks():
            u = model.apply(params, x)
            xp = array_namespace(u)
            diff = u - u_star
            sq_err += float(xp.sum(diff * diff))
            sq_ref += float(xp.sum(u_star * u_star))
            max_err = _max(max_err, float(xp.max(xp.abs(diff))))
            max_ref = _max(max_ref, float(xp.max(xp.abs(u_star))))
        return {"rel_l2": math.sqrt(sq_err / sq_ref), "rel_linf": max_err / max_ref}


class ReferenceSet:
    """A problem's reference values u_ref at a few points (its ``reference()``).

    For a problem without an exact solution, scored where a reference value
    is known (e.g. u(0, 0) of a parabolic problem from multilevel Picard)::

        rel_ref = ‖u_θ(p) − u_ref‖₂ / ‖u_ref‖₂   over the reference points p,

    |u_θ(p) − u_ref| / |u_ref| for one point. :meth:`errors` also returns
    ``u_ref``, the network's values u_θ(p) (a list of floats).

    Parameters
    ----------
    points : array, shape (R, dim)
        On the problem's backend.
    values : array, shape (R,)
        The reference values; their L2 norm must be positive.
    """

    __test__ = False  # not a pytest class

    def __init__(self, points, values):
        if points.ndim != 2 or tuple(values.shape) != (points.shape[0],):
            raise ValueError(
                "a reference is (points of shape (R, dim), values of shape (R,)), got shapes "
                f"{tuple(points.shape)} and {tuple(values.shape)}"
            )
        self.points = points
        self.values = _floats(values)
        self.norm = math.sqrt(sum(v * v for v in self.values))
        if not (self.norm > 0 and math.isfinite(self.norm)):
            raise ValueError(f"the reference values must be finite and not all zero, got "
                             f"{self.values}")

    def errors(self, model, params) -> dict:
        """``{"rel_ref": ..., "u_ref": [u_θ(p_1), ...]}`` of the model at the reference points."""
        u = model.apply(params, self.points)
        values = _floats(u)
        sq = sum((a - b) ** 2 for a, b in zip(values, self.values, strict=True))
        return {"rel_ref": math.sqrt(sq) / self.norm, "u_ref": values}


def _floats(values) -> list[float]:
    """A 1-d array as a list of Python floats (indexing: the standard has no iteration)."""
    return [float(values[i]) for i in range(values.shape[0])]


class TestSets:
    """Several test sets evaluated together: :meth:`errors` merges their records."""

    __test__ = False  # not a pytest class

    def __init__(self, *sets):
        self.sets = sets

    def errors(self, model, params) -> dict:
        merged: dict = {}
        for test in self.sets:
            merged |= test.errors(model, params)
        return merged


def _max(a: float, b: float) -> float:
    """max(a, b), NaN if either is (Python's ``max`` keeps the first on a NaN)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class TrainState:
    """What the loop carries: the method's state and the record of the run.

    Attributes
    ----------
    method : Any
        The method's state (its ``.step`` is the next step's index).
    history : list of dict
        One record per evaluation: step, loss (mean training loss since the
        previous record), rel_l2, rel_linf, time (training wall seconds,
        cumulative; evaluations and checkpoints excluded).
    elapsed : float
        Wall seconds spent in earlier runs of this training (before a resume).
    loss_sum, loss_count : float, int
        The training losses since the last record.
    best_loss : float
        The blow-up test's reference: the run's first loss, then the smallest
        recorded mean loss when lower.
    """

    method: Any
    history: list = field(default_factory=list)
    elapsed: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    best_loss: float = math.inf

    @property
    def step(self) -> int:
        return self.method.step

    def record_dict(self) -> dict:
        """The JSON-able part (everything but the method's state)."""
        return {
            "history": self.history,
            "elapsed": self.elapsed,
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "best_loss": self.best_loss,
        }


@dataclass(frozen=True)
class Divergence:
    """Why a run stopped early: the rule that fired, at the step whose loss or update broke it.

    ``reason`` is ``"non-finite loss"`` (a loss at θ_t, perturbed or not, is
    NaN or Inf), ``"non-finite update"`` (the losses were finite, the update
    was not) or ``"loss blow-up"`` (a loss exceeds ``blowup`` times the
    reference, see :func:`train`); ``step`` is t, the index of the step.
    """

    reason: str
    step: int
    message: str


@dataclass
class TrainResult:
    """The end of :func:`train`: parameters, loop state, and the divergence if any.

    ``good`` says whether ``params`` and ``state`` are a state whose loss was
    finite and not blown up: always without a divergence, and on a
    non-finite update (the network before the step). Otherwise (a non-finite
    or blown-up loss) they are not: the last good state is the last one
    given to ``on_checkpoint``, which is only called for a state whose loss
    was checked.
    """

    params: Any
    state: TrainState
    divergence: Divergence | None = None
    good: bool = True


def train(
    method,
    loss,
    params,
    state: TrainState,
    steps: int,
    *,
    model,
    test: TestSet | None = None,
    eval_every: int = 500,
    checkpoint_every: int | None = None,
    blowup: float = 1e4,
    on_step: Callable[[int, float], None] | None = None,
    on_eval: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[Any, TrainState], None] | None = None,
) -> TrainResult:
    """Run ``method`` from ``state.step`` up to ``steps`` (the total, not a count).

    Parameters
    ----------
    method
        :class:`~sdze_core.engine.SDZE` or anything with its ``step`` /
        ``evaluation_model``.
    loss : ResidualLoss
    params, state
        Where to start (fresh: ``TrainState(method.init(key, params))``).
    steps : int
        Train until the step index reaches ``steps``.
    model
        The model, for the test errors (``model.apply``).
    test : TestSet, optional
        Evaluated every ``eval_every`` steps and at the last step.
    checkpoint_every : int, optional
        Call ``on_checkpoint(params, state)`` every this many steps and at the
        end (default: at each evaluation). The callback must not change them.
        Before each call the loss of the network to be saved is evaluated (on
        the next step's ξ): a non-finite or blown-up one stops the run
        instead, so every state given to ``on_checkpoint`` had a good loss.
    blowup : float
        Stop when a step's loss, or a record's mean loss, exceeds ``blowup``
        times the reference: the smaller of the run's first loss and the best
        earlier record's mean (``inf`` disables the test; a reference <= 0,
        possible with the unbiased loss, disables it until a positive one).
    on_step, on_eval
        Progress callbacks: ``on_step(step, loss)`` after each step,
        ``on_eval(record)`` after each evaluation.

    Stops early with a :class:`Divergence` in the result; see
    :class:`TrainResult` for which state it returns.
    """
    count("steps", steps, minimum=0)
    eval_every = count("eval_every", eval_every)
    checkpoint_every = eval_every if checkpoint_every is None else count(
        "checkpoint_every", checkpoint_every
    )
    if not positive_number("blowup", blowup, allow_inf=True) > 1.0:
        raise SettingError("blowup", "a number > 1 (inf disables the test)", blowup)
    # Training time only: the clock is paused during evaluations and checkpoints.
    start_clock = time.perf_counter() - state.elapsed

    def clock() -> float:
        return time.perf_counter() - start_clock

    def stop(reason: str, t: int, message: str, good: bool = False) -> TrainResult:
        state.elapsed = clock()
        return TrainResult(params, state, Divergence(reason, t, message), good)

    while state.step < steps:
        t = state.step
        try:
            params, state.method, info = method.step(loss, params, state.method)
        except NonFiniteLossError as error:
            params, state.method = error.params, error.state
            mean = sum(complex(v).real for v in error.losses) / max(1, len(error.losses))
            good = isinstance(error, NonFiniteUpdateError) and _blown_up(
                mean, state, blowup
            ) is None
            return stop(error.reason, error.step, str(error), good)
        if state.best_loss == math.inf and info.loss > 0.0:
            state.best_loss = info.loss  # the first loss is the reference until a record
        state.loss_sum += info.loss
        state.loss_count += 1
        if on_step is not None:
            on_step(t + 1, info.loss)
        blown = _blown_up(info.loss, state, blowup)
        if blown is not None:
            return stop("loss blow-up", t, f"step {t}: the loss {blown}")
        done = state.step
        if done % eval_every == 0 or done == steps:
            record = {"step": done, "loss": state.loss_sum / state.loss_count, "time": clock()}
            paused = time.perf_counter()
            if test is not None:
                current = method.evaluation_model(model, params, state.method)
                record |= test.errors(current, params)
            start_clock += time.perf_counter() - paused
            state.history.append(record)
            state.loss_sum, state.loss_count = 0.0, 0
            if on_eval is not None:
                on_eval(record)
            blown = _blown_up(record["loss"], state, blowup)
            if blown is not None:
                return stop("loss blow-up", done, f"step {done}: the mean loss {blown}")
            state.best_loss = min(state.best_loss, record["loss"])
        if on_checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
            paused = time.perf_counter()
            value = _current_loss(method, loss, params, state.method)
            start_clock += time.perf_counter() - paused
            if not math.isfinite(value):
                return stop("non-finite loss", done, f"step {done}: the loss of the network "
                            f"to be saved is not finite ({value}); it was not saved.")
            blown = _blown_up(value, state, blowup)
            if blown is not None:
                return stop("loss blow-up", done, f"step {done}: the loss of the network to "
                            f"be saved {blown}; it was not saved")
            state.elapsed = clock()
            paused = time.perf_counter()
            on_checkpoint(params, state)
            start_clock += time.perf_counter() - paused
    state.elapsed = clock()
    return TrainResult(params, state)


def _blown_up(value: float, state: TrainState, blowup: float) -> str | None:
    """The blow-up rule's words if ``value`` breaks it (``None`` if not)."""
    reference = state.best_loss
    if not (reference > 0.0 and value > blowup * reference):
        return None
    return (
        f"{value:.3e} is more than {blowup:g} times the reference ({reference:.3e}, the "
        "smaller of the first loss and the best record); stopped."
    )


def _current_loss(method, loss, params, method_state) -> float:
    """ℓ(θ; ξ) of the current network (pending updates included) on the next step's ξ,
    with the loss the method trains on: ``method.evaluation_loss(loss, state)`` where
    the method has one (:class:`~sdze_core.coefficients.TrainCoefficients` binds c)."""
    spatial, _ = method.step_keys(method_state)
    evaluation_loss = getattr(method, "evaluation_loss", None)
    if evaluation_loss is not None:
        loss = evaluation_loss(loss, method_state)
    model = getattr(loss, "model", None)
    current = method.evaluation_model(model, params, method_state)
    if current is not model:  # a pending update: the loss evaluates the method's model
        loss = with_model(loss, current, "the loss of the network to be saved")
    return float(loss(params, loss.sample(spatial)))
