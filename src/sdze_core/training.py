"""The training loop: a problem, a model, a loss and a method (SDZE or first-order).

:func:`train` runs steps of any *method* with the interface of
:class:`~sdze_core.engine.SDZE` (``init``, ``step``, ``hook``; the
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
from .perturbers import NonFiniteLossError

__all__ = ["TestSet", "TrainState", "TrainResult", "Divergence", "train", "block_points"]

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
    problem : Problem
    num_points : int
    key : Key
        The test key (the solver uses ``fold_in(key(seed), "test")``).
    """

    __test__ = False  # not a pytest class

    def __init__(self, problem, num_points: int, key: Key, cache_limit: int = CACHE_LIMIT):
        if num_points < 1:
            raise ValueError(f"num_points must be positive, got {num_points}")
        self.problem = problem
        self.num_points = int(num_points)
        self.key = key
        self.block = block_points(problem.dim)
        self.group = max(1, GROUP_LIMIT // (problem.dim * self.block)) * self.block
        self._portable = problem.backend.with_config(rng="portable")
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

    def errors(self, model, params, hook=None) -> dict[str, float]:
        """``{"rel_l2": ..., "rel_linf": ...}`` of the model (with an optional linear hook)."""
        sq_err = sq_ref = max_err = max_ref = 0.0
        for x, u_star in self.blocks():
            u = model.apply(params, x, hook)
            xp = array_namespace(u)
            diff = u - u_star
            sq_err += float(xp.sum(diff * diff))
            sq_ref += float(xp.sum(u_star * u_star))
            max_err = max(max_err, float(xp.max(xp.abs(diff))))
            max_ref = max(max_ref, float(xp.max(xp.abs(u_star))))
        return {"rel_l2": math.sqrt(sq_err / sq_ref), "rel_linf": max_err / max_ref}


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
        The smallest recorded mean loss (for the blow-up test).
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
    """Why a run stopped early: ``reason`` ("non-finite loss" or "loss blow-up") at ``step``."""

    reason: str
    step: int
    message: str


@dataclass
class TrainResult:
    """The end of :func:`train`: parameters, loop state, and the divergence if any.

    On a non-finite loss ``params`` and ``state`` are the last good ones (the
    network before the failed step). On a loss blow-up they are the blown-up
    ones: the last good state is the last checkpoint (``on_checkpoint`` is
    not called once the loss has blown up).
    """

    params: Any
    state: TrainState
    divergence: Divergence | None = None


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
        :class:`~sdze_core.engine.SDZE` or anything with its ``step`` / ``hook``.
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
    blowup : float
        Stop when a record's mean loss exceeds ``blowup`` times the best
        earlier record's (``inf`` disables the test).
    on_step, on_eval
        Progress callbacks: ``on_step(step, loss)`` after each step,
        ``on_eval(record)`` after each evaluation.
    """
    checkpoint_every = checkpoint_every or eval_every
    # Training time only: the clock is paused during evaluations and checkpoints.
    start_clock = time.perf_counter() - state.elapsed

    def clock() -> float:
        return time.perf_counter() - start_clock

    while state.step < steps:
        try:
            params, state.method, info = method.step(loss, params, state.method)
        except NonFiniteLossError as error:
            params, state.method = error.params, error.state
            state.elapsed = clock()
            return TrainResult(params, state, Divergence("non-finite loss", error.step, str(error)))
        state.loss_sum += info.loss
        state.loss_count += 1
        t = state.step
        if on_step is not None:
            on_step(t, info.loss)
        if t % eval_every == 0 or t == steps:
            record = {"step": t, "loss": state.loss_sum / state.loss_count, "time": clock()}
            paused = time.perf_counter()
            if test is not None:
                record |= test.errors(model, params, method.hook(params, state.method))
            start_clock += time.perf_counter() - paused
            state.history.append(record)
            state.loss_sum, state.loss_count = 0.0, 0
            if on_eval is not None:
                on_eval(record)
            if record["loss"] > blowup * state.best_loss:
                state.elapsed = clock()
                message = (
                    f"step {t}: the mean loss {record['loss']:.3e} is more than {blowup:g} times "
                    f"the best earlier one ({state.best_loss:.3e}); stopped. The last checkpoint "
                    "holds the last good state."
                )
                return TrainResult(params, state, Divergence("loss blow-up", t, message))
            state.best_loss = min(state.best_loss, record["loss"])
        if on_checkpoint is not None and (t % checkpoint_every == 0 or t == steps):
            state.elapsed = clock()
            paused = time.perf_counter()
            on_checkpoint(params, state)
            start_clock += time.perf_counter() - paused
    state.elapsed = clock()
    return TrainResult(params, state)
