"""Solve a PDE: ``sdze.solve(...)`` and the ``sdze solve`` command behind it.

The problem is a built-in benchmark or the user's own (a registered name,
``package.module:factory`` or ``path/to/file.py:factory``; docs/problems.md).

A run is described completely by a :class:`SolverConfig` (JSON-able): the
problem, the network, the method and its settings, the backend. From it
:func:`build` makes the problem, model, loss and method, so a checkpoint
(which stores the config) can be resumed or evaluated anywhere. A run
writes into its output folder

* ``checkpoint.npz`` — parameters, the method's state, the problem's
  coefficients and the config (see :mod:`sdze.checkpoint`), atomically,
  every ``checkpoint_every`` steps and at the end;
* ``metrics.json`` — the config, one record per evaluation (step, mean
  training loss, relative L2 and L∞ errors, wall time), wall time, it/s,
  peak memory, the final errors and the status (errors ``null``, and
  ``"exact_solution": false``, for a problem without an exact solution;
  ``rel_ref`` and ``u_ref`` per record and in the summary for a problem
  with reference values, its ``reference()`` member);
* ``loss.png``, ``error.png`` — the loss and the errors against the step.

Methods (docs/method.md#crns, #subspace-perturbations, #baselines):

* ``sdze``: CRNS zeroth-order estimates with low-rank subspace
  perturbations and ZO-Adam in subspace coordinates (forward passes only);
* ``sdze-naive``: the same without common random numbers (the ablation);
* ``zo-full``: CRNS zeroth-order estimates with full-space Gaussian
  perturbations and ZO-SGD (the MeZO baseline; its variance grows with P);
* ``first-order``: the same model, oracle and collocation points, gradients
  by the backend's autodiff (torch, jax) and Adam: STDE's setting;
* ``sdgd``: first-order Adam with the Laplacian's sampled second derivatives
  by nested autodiff instead of jets (the SDGD baseline; Laplacian problems).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from sdze_core.activity import ACTIVITY_OPTIMIZERS, ActivityPerturbation
from sdze_core.engine import SDZE
from sdze_core.keys import fold_in, key
from sdze_core.models import INIT_SCHEMES
from sdze_core.optimizers import constant, cosine_decay, linear_decay, zo_adam, zo_sgd
from sdze_core.oracles import SparseLaplacian
from sdze_core.perturbers import CRNSPerturber
from sdze_core.problem_protocol import has_exact, loss_of, reference_of
from sdze_core.problem_registry import canonical_problem, problem_label
from sdze_core.problems import (
    EQUATIONS,
    PROBLEMS,
    SAMPLINGS,
    SOLUTIONS,
    default_test_points,
    make_problem,
)
from sdze_core.registry import get_backend, make_backend, use
from sdze_core.samplers import FullGaussian, LowRankSubspace
from sdze_core.training import Divergence, ReferenceSet, TestSet, TestSets, TrainState, train
from sdze_core.validation import SettingError, count, fraction, positive_number

from ._version import __version__
from .checkpoint import load_checkpoint, read_config, save_checkpoint

__all__ = ["METHODS", "SolverConfig", "SolveResult", "build", "solve", "evaluate_checkpoint"]

#: ``--method`` choices.
METHODS = ("sdze", "sdze-naive", "zo-full", "first-order", "sdgd")
#: The methods that need the backend's autodiff.
AUTODIFF_METHODS = ("first-order", "sdgd")
SCHEDULES = ("constant", "linear", "cosine")
ESTIMATORS = ("central", "forward")
RNG_MODES = ("native", "portable")


@dataclass
class SolverConfig:
    """Everything that defines a run (stored in its checkpoint and metrics).

    ``None`` fields take the defaults of :meth:`resolved`.
    """

    problem: str
    dim: int
    method: str = "sdze"
    backend: str | None = None
    device: str | None = None
    dtype: str = "float32"
    rng: str | None = None  # "native" or "portable" (sdze.use(..., rng=...)) for the whole run
    seed: int = 0
    steps: int | None = None
    # the model and the spatial estimator (STDE's settings)
    width: int = 128
    depth: int | None = None  # hidden layers, default 4
    activation: str = "tanh"
    init_scheme: str | None = None  # "glorot" (default) or "stde"
    sampling: str | None = None  # training and test points: "volume" (default) or "radius"
    batch_size: int = 100
    num_directions: int = 16  # capped at the problem's number of directions (recorded so)
    unbiased: bool = False
    # the optimizer
    learning_rate: float | None = None
    schedule: str | None = None
    adam_b2: float | None = None
    # SDZE only
    perturbation: str | None = None
    optimizer: str | None = None
    num_queries: int | None = None
    eps: float | None = None
    estimator: str = "central"
    # the subspace estimator only (None, and recorded so, when the run does not use it)
    rank: int | None = None
    refresh_every: int | None = None
    layerwise: bool | None = None
    residual_aligned: bool | None = None
    input_memory: float | None = None
    # evaluation and checkpoints
    eval_every: int | None = None
    test_points: int | None = None
    checkpoint_every: int | None = None
    blowup: float = 1e4
    # a named set of defaults (PRESETS), applied by resolved() to the settings left unset
    preset: str | None = None

    def resolved(self) -> SolverConfig:
        """A copy with every default filled in and every field checked.

        Each setting is checked against its range (a :class:`SettingError`,
        a ``ValueError``, names it and the range). ``num_directions`` is
        capped at the number of directions the problem has (d coordinates
        for Δ, d (d − 1) / 2 pairs for Δ², as the problem's oracle uses),
        and the copy records the value used (a built-in's; another problem's
        oracle caps it itself, and the copy records the value asked for). A
        ``problem`` that is a file spec (``path/to/file.py:factory``) is
        recorded with the file's absolute path. ``rng``
        defaults to the current backend's (``sdze.use(..., rng=...)``) when
        that backend is the one the run uses, else ``"native"``.
        """
        c = dataclasses.replace(self)
        if c.preset is not None:
            _choice("preset", c.preset, tuple(PRESETS))
            for name, value in PRESETS[c.preset].items():
                if getattr(c, name) is None:
                    setattr(c, name, value)
        for name, value in MODEL_DEFAULTS.items():
            if getattr(c, name) is None:
                setattr(c, name, value)
        c.problem = canonical_problem(c.problem)
        if c.method not in METHODS:
            raise ValueError(f"unknown method {c.method!r}; known: {', '.join(METHODS)}")
        benchmark = PROBLEMS.get(c.problem)  # STDE's suite; other built-ins are like user problems
        arity = SOLUTIONS[benchmark[1]].arity if benchmark else 1
        c.dim = count("dim", c.dim, minimum=arity)
        if c.perturbation is None:
            c.perturbation = DEFAULT_PERTURBATION
        _choice("perturbation", c.perturbation, PERTURBATIONS)
        activity = c.method in ("sdze", "sdze-naive") and c.perturbation == "activity"
        if c.schedule is None:
            c.schedule = ACTIVITY_DEFAULTS["schedule"] if activity else DEFAULT_SCHEDULE[c.method]
        _choice("schedule", c.schedule, SCHEDULES)
        _choice("estimator", c.estimator, ESTIMATORS)
        _choice("dtype", c.dtype, ("float32", "float64"))
        _choice("init_scheme", c.init_scheme, INIT_SCHEMES)
        _choice("sampling", c.sampling, SAMPLINGS)
        if c.optimizer is None:
            c.optimizer = ACTIVITY_DEFAULTS["optimizer"] if activity else "adam"
        _choice("optimizer", c.optimizer, tuple(ACTIVITY_OPTIMIZERS) if activity else ("adam",))
        if c.num_queries is None:
            c.num_queries = ACTIVITY_DEFAULTS["num_queries"] if activity else 5
        # What a run does not use is recorded as None: the record is what ran.
        subspace = c.method in ("sdze", "sdze-naive") and c.perturbation == "subspace"
        for name in ("rank", "refresh_every"):  # checked even where unused: a typo is an error
            if getattr(c, name) is not None:
                setattr(c, name, count(name, getattr(c, name)))
        if c.input_memory is not None:
            c.input_memory = positive_number("input_memory", c.input_memory)
        for name, default in SUBSPACE_DEFAULTS.items():
            value = getattr(c, name)
            setattr(c, name, (default if value is None else value) if subspace else None)
        if c.method not in ("sdze", "sdze-naive"):
            c.perturbation = None
        if c.method in AUTODIFF_METHODS:
            c.num_queries = None
        c.seed = count("seed", c.seed, minimum=0)
        for name in ("width", "depth", "batch_size", "num_directions", "num_queries"):
            if getattr(c, name) is not None:
                setattr(c, name, count(name, getattr(c, name)))
        for name in ("steps", "eval_every", "test_points", "checkpoint_every"):
            if getattr(c, name) is not None:
                setattr(c, name, count(name, getattr(c, name)))
        for name in ("learning_rate", "eps"):
            if getattr(c, name) is not None:
                setattr(c, name, positive_number(name, getattr(c, name)))
        if not positive_number("blowup", c.blowup, allow_inf=True) > 1.0:
            raise SettingError("blowup", "a number > 1 (inf disables the test)", c.blowup)
        if benchmark:  # another problem's oracle caps the number itself
            order = EQUATIONS[benchmark[0]].order
            directions = c.dim if order == 2 else c.dim * (c.dim - 1) // 2
            c.num_directions = min(c.num_directions, directions)
        c.backend = c.backend or get_backend().name
        if c.rng is None:
            current = get_backend()
            c.rng = current.rng if current.name == c.backend else "native"
        _choice("rng", c.rng, RNG_MODES)
        if c.steps is None:
            c.steps = DEFAULT_STEPS[c.method]
        if c.learning_rate is None:
            c.learning_rate = (
                ACTIVITY_DEFAULTS["learning_rate"] if activity else DEFAULT_LEARNING_RATE[c.method]
            )
        if c.adam_b2 is None:
            c.adam_b2 = ACTIVITY_DEFAULTS["adam_b2"] if activity else DEFAULT_ADAM_B2[c.method]
        c.adam_b2 = fraction("adam_b2", c.adam_b2)
        if c.eval_every is None:
            c.eval_every = max(1, c.steps // 20)
        if c.test_points is None:
            c.test_points = default_test_points(c.dim)
        if c.checkpoint_every is None:
            c.checkpoint_every = c.eval_every
        return c

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SolverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown solver settings: {', '.join(sorted(unknown))}")
        # Configurations written before the rng field ran on the native generator.
        return cls(**({"rng": "native"} | data))


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingError(name, f"one of {', '.join(map(repr, allowed))}", value)


#: How SDZE perturbs: "activity" (per-sample activity perturbations) or
#: "subspace" (low-rank weight perturbations); see docs/sdze.md.
PERTURBATIONS = ("activity", "subspace")
DEFAULT_PERTURBATION = "activity"

#: Defaults of the subspace estimator's settings (``perturbation="subspace"``).
SUBSPACE_DEFAULTS = {
    "rank": 8,
    "refresh_every": 100,
    "layerwise": True,
    "residual_aligned": True,
    "input_memory": 2.0,
}

#: Defaults of the model and the points, where no preset sets them.
MODEL_DEFAULTS = {"depth": 4, "init_scheme": "glorot", "sampling": "volume"}

#: Named sets of defaults (``SolverConfig(preset=...)``, ``--preset``): a preset fills
#: the settings a config leaves as None (unset). ``"stde"`` is STDE's experimental
#: setting (its reference implementation): three hidden tanh layers of 128 with
#: U(±1/√fan) initialisation, radius-uniform points, Adam 1e-3 with b2 0.999 decaying
#: linearly over 10 000 steps, 20 000 test points, an evaluation every 1000 steps
#: (it reports the minimum over the evaluations: ``metrics.json``'s ``min_rel_l2``).
PRESETS = {
    "stde": {
        "depth": 3,
        "init_scheme": "stde",
        "sampling": "radius",
        "steps": 10_000,
        "learning_rate": 1e-3,
        "schedule": "linear",
        "adam_b2": 0.999,
        "test_points": 20_000,
        "eval_every": 1000,
    },
}

#: Defaults of SDZE with activity perturbations (docs/benchmarks.md: the study that chose them).
ACTIVITY_DEFAULTS = {
    "optimizer": "adafactor",
    "learning_rate": 1e-3,
    "schedule": "linear",
    "adam_b2": 0.99,
    "num_queries": 1,
}

#: Defaults per method (see docs/tutorial.md for how they were chosen).
DEFAULT_STEPS = {m: 3000 for m in METHODS}
DEFAULT_LEARNING_RATE = {
    "sdze": 5e-2,
    "sdze-naive": 5e-2,
    # ZO-SGD is not scale-free: ĝ carries the loss's scale (~1e6 to 1e9 here)
    "zo-full": 1e-12,
    "first-order": 1e-3,
    "sdgd": 1e-3,
}

#: Learning-rate schedules: cosine for the zeroth-order methods (more steps at a
#: high rate while the first layer is learned), linear decay for first-order (STDE's).
DEFAULT_SCHEDULE = {m: "linear" if m in AUTODIFF_METHODS else "cosine" for m in METHODS}

#: Adam's second-moment decay. First-order: 0.99, not Adam's usual 0.999: the
#: first ~300 steps' gradients are ~30x the later ones (N must first reach
#: its mean, ~30 at d = 1000), and with 0.999 they keep the step small for
#: thousands of steps; see docs/benchmarks.md. ZO-Adam's moments restart at
#: every basis refresh (T = 100), so its b2 matters little.
DEFAULT_ADAM_B2 = {m: 0.99 if m in AUTODIFF_METHODS else 0.999 for m in METHODS}


def _best(history: list, name: str = "rel_l2") -> dict:
    """The minimum of an error over the evaluations and its step (STDE's metric for rel_l2)."""
    errors = [r for r in history if math.isfinite(r.get(name, math.nan))]
    if not errors:
        return {f"min_{name}": None, f"min_{name}_step": None}
    best = min(errors, key=lambda r: r[name])
    return {f"min_{name}": best[name], f"min_{name}_step": best["step"]}


def _schedule(config: SolverConfig):
    lr, steps = config.learning_rate, config.steps
    if config.schedule == "constant":
        return constant(lr)
    if config.schedule == "cosine":
        return cosine_decay(lr, steps)
    return linear_decay(lr, steps)


@dataclass
class Run:
    """What :func:`build` makes from a config.

    ``test`` is what an evaluation measures: a :class:`TestSet` (an exact
    solution), a :class:`ReferenceSet` (reference values), both
    (:class:`TestSets`), or ``None`` (neither).
    """

    config: SolverConfig
    backend: Any
    problem: Any
    model: Any
    loss: Any  # ResidualLoss, or the problem's own loss (WeightedLoss, ...)
    method: Any
    test: TestSet | ReferenceSet | TestSets | None


def build(config: SolverConfig, backend=None) -> Run:
    """Problem, model, loss, method and test set of a (resolved) config."""
    config = config.resolved()
    if backend is None:
        backend = make_backend(config.backend, device=config.device, dtype=config.dtype,
                               rng=config.rng)
    if config.problem in PROBLEMS:
        problem = make_problem(config.problem, config.dim, seed=config.seed, backend=backend,
                               sampling=config.sampling)
        model = problem.model(config.width, config.depth, config.activation, config.init_scheme)
    else:
        # a user problem draws its own points and builds its own network
        for name, default in (("sampling", "volume"), ("init_scheme", "glorot")):
            if getattr(config, name) != default:
                raise SettingError(
                    name, f"{default!r} for a user problem (its sample_domain and model decide)",
                    getattr(config, name),
                )
        problem = make_problem(config.problem, config.dim, seed=config.seed, backend=backend)
        model = problem.model(config.width, config.depth, config.activation)
    loss = loss_of(
        problem, model, num_directions=config.num_directions,
        batch_size=config.batch_size, unbiased=config.unbiased,
    )
    if config.method == "sdgd":
        if not isinstance(getattr(loss, "oracle", None), SparseLaplacian):
            raise ValueError(
                f"sdgd estimates Laplacians only; the operator of {config.problem!r} is not Δ "
                f"(its loss is a {type(loss).__name__} with oracle "
                f"{type(getattr(loss, 'oracle', None)).__name__}; use first-order)"
            )
        from sdze_core.oracles import NestedAutodiffLaplacian

        nested = NestedAutodiffLaplacian(min(config.num_directions, problem.dim))
        loss = dataclasses.replace(loss, oracle=nested)
    if config.method in AUTODIFF_METHODS:
        from sdze_core.first_order import FirstOrderAdam

        method = FirstOrderAdam(_schedule(config), b2=config.adam_b2)
    elif config.method == "zo-full":
        perturber = CRNSPerturber(
            eps=config.eps, num_queries=config.num_queries, crns=True, estimator=config.estimator
        )
        method = SDZE(perturber, FullGaussian(), zo_sgd(_schedule(config)))
    elif config.method in ("sdze", "sdze-naive") and config.perturbation == "activity":
        optimizer = ACTIVITY_OPTIMIZERS[config.optimizer]
        if config.optimizer == "sgd":
            opt = optimizer(_schedule(config))
        else:
            opt = optimizer(_schedule(config), b2=config.adam_b2)
        method = ActivityPerturbation(
            opt,
            eps=config.eps,
            estimator=config.estimator,
            num_queries=config.num_queries,
            crns=config.method == "sdze",
        )
    else:
        perturber = CRNSPerturber(
            eps=config.eps,
            num_queries=config.num_queries,
            crns=config.method == "sdze",
            estimator=config.estimator,
        )
        # h averages N steps of (1/B) Σ r_b x_b, whose signal² / noise² grows as B N / d:
        # N = input_memory · d / B steps (at least 100), β = 1 − 1/N.
        input_decay = 1.0 - 1.0 / max(100.0, config.input_memory * config.dim / config.batch_size)
        sampler = LowRankSubspace(
            input_decay=input_decay,
            rank=config.rank,
            refresh_every=config.refresh_every,
            layerwise=config.layerwise,
            residual_aligned=config.residual_aligned,
        )
        method = SDZE(perturber, sampler, zo_adam(_schedule(config), b2=config.adam_b2))
    test = _test_sets(problem, config, backend)
    return Run(config, backend, problem, model, loss, method, test)


def _test_sets(problem, config: SolverConfig, backend):
    """What each evaluation measures: the exact solution's test points, the reference values."""
    sets = []
    if has_exact(problem):
        sets.append(
            TestSet(problem, config.test_points, fold_in(key(config.seed), "test"), backend=backend)
        )
    reference = reference_of(problem)
    if reference is not None:
        sets.append(ReferenceSet(*reference))
    return None if not sets else sets[0] if len(sets) == 1 else TestSets(*sets)


def _model_config(run: Run) -> dict:
    """The network's sizes and activation, and the ansatz's boundary (``None`` without one)."""
    net = getattr(run.model, "network", run.model)
    if not hasattr(net, "sizes"):
        return {"type": type(run.model).__name__}
    return {"sizes": list(net.sizes), "activation": net.activation,
            "boundary": getattr(run.model, "boundary", None)}


def _checkpoint_config(run: Run) -> dict:
    return {
        "solver": run.config.to_json(),
        "problem": run.config.problem,
        "dim": run.config.dim,
        "model": _model_config(run),
    }


@dataclass
class SolveResult:
    """What :func:`solve` returns.

    Attributes
    ----------
    params : list of dict
        The trained parameters (pending low-rank updates merged in). After a
        divergence, the last good state's: the last checkpoint, or the
        network before a non-finite update.
    rel_l2, rel_linf : float or None
        Final relative errors on the test points (``None`` when the problem
        has no exact solution).
    history : list of dict
        One record per evaluation (step, loss, rel_l2, rel_linf, time; and
        rel_ref, u_ref for a problem with reference values).
    metrics : dict
        What ``metrics.json`` holds.
    status : str
        ``"completed"`` or ``"diverged: <rule> at step <t>"``, the rule one of
        ``non-finite loss``, ``non-finite update``, ``loss blow-up``
        (:class:`~sdze_core.training.Divergence`).
    out : pathlib.Path or None
        The output folder.
    files : list of str
        The files this run wrote into ``out`` (``checkpoint.npz`` only if a
        good state was saved, the plots only if asked for).
    """

    params: Any
    rel_l2: float | None
    rel_linf: float | None
    history: list
    metrics: dict
    status: str
    out: pathlib.Path | None
    run: Run
    files: list = dataclasses.field(default_factory=list)
    rel_ref: float | None = None

    @property
    def checkpoint(self) -> pathlib.Path | None:
        return None if self.out is None else self.out / "checkpoint.npz"


def _versions(backend) -> dict:
    versions = {"sdze": __version__, "python": platform.python_version()}
    module = sys.modules.get(type(backend).__module__)
    library = getattr(module, "LIBRARY", None) or backend.name
    lib = sys.modules.get(library)
    if lib is not None and hasattr(lib, "__version__"):
        versions[library] = lib.__version__
    return versions


class _Progress:
    """A tqdm bar with loss, error and it/s, or log lines with ``quiet``."""

    def __init__(self, total: int, initial: int, quiet: bool, label: str):
        self.quiet = quiet
        self.bar = None
        self.label = label
        self.postfix: dict[str, str] = {}
        self.step_times: list[float] = []  # between consecutive steps (evaluations included)
        self.last = time.perf_counter()
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, unit="it", dynamic_ncols=True)

    def step(self, t: int, loss: float) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self.last)
        self.last = now
        if self.bar is not None:
            self.postfix["loss"] = f"{loss:.3e}"
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(1)

    def eval(self, record: dict) -> None:
        self.last = time.perf_counter()  # evaluation and checkpoint time is not a step's
        for name in ("rel_l2", "rel_ref"):
            if name in record:
                self.postfix[name] = f"{record[name]:.3e}"
        if self.bar is None:
            errors = "".join(
                f"  {k} {record[k]:.3e}" for k in ("rel_l2", "rel_linf", "rel_ref") if k in record
            )
            print(
                f"{self.label} step {record['step']}  loss {record['loss']:.3e}{errors}"
                f"  {record['time']:.1f} s",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(out: pathlib.Path, history: list, title: str) -> list[str]:
    """Write loss.png (and error.png when the records have errors): the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(steps, [r["loss"] for r in history], marker=".")
    ax.set(xlabel="step", ylabel="mean training loss", title=title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    curves = [(name, label) for name, label in ERROR_CURVES if history and name in history[0]]
    if not curves:
        return ["loss.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in curves:
        ax.semilogy(steps, [r[name] for r in history], marker=".", label=label)
    ax.set(xlabel="step", ylabel="error on the test points", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "error.png", dpi=120)
    plt.close(fig)
    return ["loss.png", "error.png"]


#: error.png's curves: the record's key and its label.
ERROR_CURVES = (
    ("rel_l2", "relative L2"),
    ("rel_linf", "relative L∞"),
    ("rel_ref", "relative error at the reference points"),
)


def _write_json(path: pathlib.Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=True))
    os.replace(tmp, path)


def default_out(config: SolverConfig) -> pathlib.Path:
    label = problem_label(config.problem)
    return pathlib.Path("sdze-runs") / f"{label}-d{config.dim}-{config.method}"


def solve(
    problem: str | None = None,
    dim: int | None = None,
    *,
    out: str | os.PathLike | None = "auto",
    resume: str | os.PathLike | None = None,
    quiet: bool = False,
    plots: bool = True,
    **settings,
) -> SolveResult:
    """Train a PINN for a problem and report its error.

    Parameters
    ----------
    problem : str
        A built-in benchmark (:data:`sdze_core.problems.PROBLEMS`, e.g.
        ``"allen-cahn-two-body"``), a name registered with
        :func:`sdze.register_problem`, or your own factory as
        ``"package.module:factory"`` or ``"path/to/file.py:factory"``
        (docs/problems.md).
    dim : int
        The dimension d.
    out : path, "auto" or None
        Output folder (``"auto"``: ``sdze-runs/<problem>-d<dim>-<method>``, a
        spec's problem written ``<file or module>.<factory>``;
        ``None``: write nothing).
    resume : path, optional
        A checkpoint to continue from: its config is used (``problem`` and
        ``dim``, if given, must match; ``steps`` may be raised). The
        trajectory is the one the uninterrupted run would have taken.
    quiet : bool
        Log lines at each evaluation instead of a progress bar.
    plots : bool
        Write ``loss.png`` and ``error.png``.
    **settings
        Any field of :class:`SolverConfig` (``method``, ``backend``,
        ``steps``, ``seed``, ``learning_rate``, ``num_queries``, ...).

    Returns
    -------
    SolveResult
    """
    checkpoint_state = None
    if resume is not None:
        saved = read_config(resume)["config"]
        config = SolverConfig.from_json(saved["solver"])
        if problem is not None:
            problem = canonical_problem(problem)  # a file spec as the checkpoint records it
        requested = {"problem": problem, "dim": dim} | settings
        fixed = {k: v for k, v in requested.items() if k not in ("steps", "backend", "device")}
        wrong = {k: (getattr(config, k), v) for k, v in fixed.items()
                 if v is not None and getattr(config, k) != v}
        if wrong:
            details = "; ".join(f"{k}: checkpoint has {a!r}, requested {b!r}"
                                for k, (a, b) in wrong.items())
            raise ValueError(f"cannot resume {resume}: {details}")
        for k in ("steps", "backend", "device"):
            if settings.get(k) is not None:
                setattr(config, k, settings[k])
        run = build(config)
        expect = {"problem": config.problem, "dim": config.dim}
        if "sizes" in _model_config(run):
            expect["model.sizes"] = _model_config(run)["sizes"]
        checkpoint_state = load_checkpoint(resume, run.backend, expect=expect)
    else:
        if problem is None or dim is None:
            raise TypeError("solve() needs a problem and a dimension (or resume=CHECKPOINT)")
        run = build(SolverConfig(problem, dim, **settings))
    with use(run.backend):  # every draw of the run (backend_of's too) in the config's rng mode
        return _train(run, checkpoint_state, out, quiet, plots)


def _train(run: Run, checkpoint_state, out, quiet: bool, plots: bool) -> SolveResult:
    """The run of :func:`solve`, in ``use(run.backend)``."""
    config = run.config
    if out == "auto":
        out = default_out(config)
    out = None if out is None else pathlib.Path(out)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out must be a folder; {out} is an existing file")
        out.mkdir(parents=True, exist_ok=True)

    if checkpoint_state is None:
        params = run.model.init(fold_in(key(config.seed), "params"), run.backend)
        state = TrainState(run.method.init(key(config.seed), params))
    else:
        params = checkpoint_state.params
        records = checkpoint_state.extra["train"]
        state = TrainState(checkpoint_state.state, **records)

    saved_steps = []  # the steps this run wrote checkpoints of

    def save(params, state: TrainState) -> None:
        if out is not None:
            save_checkpoint(
                out / "checkpoint.npz",
                params=params,
                state=state.method,
                config=_checkpoint_config(run),
                extra={"train": state.record_dict()} | _coefficients(run),
            )
            saved_steps.append(state.step)
            progress.last = time.perf_counter()  # the write is not part of the next step

    label = f"{problem_label(config.problem)} d={config.dim} {config.method}"
    progress = _Progress(config.steps, state.step, quiet, label)
    first_step = state.step
    run.backend.reset_peak_memory()
    start = time.perf_counter()
    try:
        result = train(
            run.method, run.loss, params, state, config.steps,
            model=run.model, test=run.test, eval_every=config.eval_every,
            checkpoint_every=config.checkpoint_every, blowup=config.blowup,
            on_step=progress.step, on_eval=progress.eval,
            on_checkpoint=None if out is None else save,
        )
    finally:
        progress.close()
    wall = time.perf_counter() - start
    params, state = result.params, result.state
    divergence: Divergence | None = result.divergence
    status = "completed" if divergence is None else (
        f"diverged: {divergence.reason} at step {divergence.step}"
    )
    if divergence is not None:
        print(divergence.message, file=sys.stderr)
        params, state = _last_good(run, out, result, save, saved_steps)
    _, params = run.method.merge(params, state.method)
    final = _NO_ERRORS | ({} if run.test is None else run.test.errors(run.model, params))
    exact = has_exact(run.problem)
    done = state.step - first_step
    metrics = {
        "config": config.to_json(),
        "status": status,
        "divergence": None if divergence is None else dataclasses.asdict(divergence),
        "history": state.history,
        "final": {"step": state.step, **final},
        "rel_l2": final["rel_l2"],
        "rel_linf": final["rel_linf"],
        **_best(state.history),
        "exact_solution": exact,
        **({} if exact else {"errors": NO_EXACT_NOTE}),
        **_reference_metrics(run, final, state.history),
        "wall_time": state.elapsed,
        "wall_time_this_run": wall,
        "steps_this_run": done,
        "it_per_s": done / wall if wall > 0 and done else math.nan,
        "median_step_s": statistics.median(progress.step_times) if progress.step_times else None,
        "peak_memory_bytes": run.backend.peak_memory(),
        "backend": repr(run.backend),
        "versions": _versions(run.backend),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    files = []
    if out is not None:
        _write_json(out / "metrics.json", metrics)
        files = ["metrics.json"] + (["checkpoint.npz"] if saved_steps else [])
        if plots and state.history:
            files += _plot(out, state.history, label)
    return SolveResult(params, final["rel_l2"], final["rel_linf"], state.history, metrics,
                       status, out, run, files, final.get("rel_ref"))


#: metrics.json's word on a problem without an exact solution (its errors are null).
NO_EXACT_NOTE = "not measured: the problem has no exact solution (no `exact` member)"
_NO_ERRORS = {"rel_l2": None, "rel_linf": None}


def _reference_metrics(run: Run, final: dict, history: list) -> dict:
    """metrics.json's reference entries: the points, values, final and best rel_ref (or none)."""
    test = run.test
    sets = test.sets if isinstance(test, TestSets) else (test,)
    reference = next((s for s in sets if isinstance(s, ReferenceSet)), None)
    if reference is None:
        return {}
    return {
        "reference": {"points": run.backend.to_host(reference.points).tolist(),
                      "values": reference.values},
        "rel_ref": final["rel_ref"],
        "u_ref": final["u_ref"],
        **_best(history, "rel_ref"),
    }


def _coefficients(run: Run) -> dict:
    """A built-in's coefficients for the checkpoint's extra data (other problems: none)."""
    c = getattr(run.problem, "coefficients", None)
    if c is None:
        return {}
    if run.config.dim > 100_000:
        return {"coefficients": "regenerated from the seed"}
    return {"coefficients": run.backend.to_host(c).tolist()}


def _last_good(run: Run, out, result, save, saved_steps):
    """After a divergence: the last state whose loss was finite and not blown up, on disk.

    The network before a non-finite update is one (saved now); otherwise it
    is the last checkpoint this run wrote (every one was checked before it
    was written), reloaded. With neither, the diverged state is returned
    and nothing is written; each case says so on stderr.
    """
    params, state = result.params, result.state
    if result.good and out is not None:
        save(params, state)
        print(f"saved the last good state (step {state.step}) to {out / 'checkpoint.npz'}",
              file=sys.stderr)
    elif not result.good and saved_steps:
        saved = load_checkpoint(out / "checkpoint.npz", run.backend)
        params, state = saved.params, TrainState(saved.state, **saved.extra["train"])
        print(f"kept the last good state (step {state.step}) in {out / 'checkpoint.npz'}",
              file=sys.stderr)
    elif not result.good:
        print("no good state was saved: the run diverged before its first checkpoint; the "
              "errors reported are the diverged network's", file=sys.stderr)
    return params, state


def evaluate_checkpoint(path, backend=None, test_points: int | None = None) -> dict:
    """Relative errors of a checkpoint's network against the exact solution.

    The problem is rebuilt from the stored config (same seed, same
    coefficients, same test points unless ``test_points`` is given), on
    ``backend`` (default: the current one, whatever the run was trained on).
    """
    config = SolverConfig.from_json(read_config(path)["config"]["solver"])
    if backend is not None:
        config.backend = backend if isinstance(backend, str) else backend.name
    else:
        config.backend = get_backend().name
    config.device = None
    if test_points is not None:
        config.test_points = test_points
    run = build(config)
    if run.test is None:
        raise ValueError(f"{path}: its problem {config.problem!r} has no exact solution (no "
                         "`exact` member) and no reference values (no `reference`), so there "
                         "is nothing to evaluate the network against")
    saved = load_checkpoint(path, run.backend)
    _, params = run.method.merge(saved.params, saved.state)
    errors = run.test.errors(run.model, params)
    return {"checkpoint": str(path), "step": saved.state.step, "backend": run.backend.name,
            "test_points": run.config.test_points, **errors}
