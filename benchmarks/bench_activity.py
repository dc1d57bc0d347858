"""Activity-perturbation study: SDZE (activity and subspace) vs first-order, side by side.

For each problem and dimension, every method trains the same network from
the same initial parameters on the same points (the step keys are shared),
in one process, one after the other; the record keeps each evaluation's
relative L2 error and training time (evaluations excluded).

    python benchmarks/bench_activity.py --problems poisson-sine heat --dims 100 1000 \\
        --methods first-order activity subspace --steps 2000 --out benchmarks/results/activity

Methods (name: what runs):

* ``first-order``: Adam on the autodiff gradient (PyTorch), 1e-3 linear decay, b2 0.99;
* ``activity``: SDZE with activity perturbations, the library's defaults;
* ``activity-adam`` / ``activity-sgd`` / ``activity-q2`` ...: variants (see VARIANTS);
* ``subspace``: SDZE with the section-5 low-rank subspace sampler (previous defaults).

``--lr`` sets the peak learning rate of ``first-order`` and ``activity``
(default 1e-3 for both); such runs are recorded with their ``lr`` and scored
against first-order's run of the same rate.

Writes ``<out>/<problem>-d<d>.json`` per problem/dimension and a summary plot
with ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from generalisation import NAMES, GeneralisationProblem  # noqa: E402

from sdze.solver import SolverConfig, build  # noqa: E402
from sdze_core.activity import (  # noqa: E402
    ActivityPerturbation,
    activity_adafactor,
    activity_adam,
    activity_sgd,
)
from sdze_core.first_order import FirstOrderAdam  # noqa: E402
from sdze_core.keys import fold_in, key  # noqa: E402
from sdze_core.objectives import ResidualLoss  # noqa: E402
from sdze_core.optimizers import linear_decay  # noqa: E402
from sdze_core.problems import PROBLEMS  # noqa: E402
from sdze_core.registry import make_backend  # noqa: E402
from sdze_core.training import TestSet, TrainState, train  # noqa: E402


def _activity(opt, lr=1e-3, **kw):
    def make(steps):
        return ActivityPerturbation(opt(linear_decay(lr, steps)), **kw)

    return make


#: name -> (backend, factory(steps) -> method)
VARIANTS = {
    "activity": ("numpy", _activity(activity_adafactor)),
    "activity-adam": ("numpy", _activity(activity_adam)),
    "activity-adafactor-3e-3": ("numpy", _activity(activity_adafactor, 3e-3)),
    "activity-adam-3e-3": ("numpy", _activity(activity_adam, 3e-3)),
    "activity-adafactor-1e-2": ("numpy", _activity(activity_adafactor, 1e-2)),
    "activity-sgd": ("numpy", _activity(activity_sgd, 1e-2)),
    "activity-q2": ("numpy", _activity(activity_adafactor, num_queries=2)),
    "activity-forward": ("numpy", _activity(activity_adafactor, estimator="forward")),
    "activity-b1-0.98": ("numpy", _activity(lambda lr: activity_adafactor(lr, b1=0.98))),
    "activity-torch": ("torch", _activity(activity_adafactor)),
    "activity-jax": ("jax", _activity(activity_adafactor)),
}


def setup(problem: str, dim: int, backend_name: str, method: str, steps: int, seed: int,
          lr: float | None = None):
    """(loss, model, params, method object, test set) for one run; ``lr`` overrides the
    peak learning rate of ``first-order`` and ``activity``."""
    if lr is not None and method not in ("first-order", "activity"):
        raise ValueError(f"--lr applies to first-order and activity only, not {method!r}")
    backend = make_backend(backend_name, dtype="float32")
    if problem in PROBLEMS:
        if method == "subspace":
            config = SolverConfig(
                problem, dim, backend=backend_name, steps=steps, perturbation="subspace"
            )
        else:
            config = SolverConfig(
                problem, dim, backend=backend_name, steps=steps, method="first-order"
            )
        run = build(config, backend)
        loss, model, test = run.loss, run.model, run.test
        subspace_method = run.method
    else:
        p = GeneralisationProblem(problem, dim, backend, seed)
        loss = p.loss()
        model = loss.model
        test = TestSet(p, 4000 if dim <= 1000 else 1000, fold_in(key(seed), "test"))
        subspace_method = None
        if method == "subspace":
            config = SolverConfig(
                "poisson-two-body", dim, backend=backend_name, steps=steps, perturbation="subspace"
            )
            subspace_method = build(config, backend).method
            if not isinstance(loss, ResidualLoss):  # residual alignment needs ResidualLoss
                sampler = dataclasses.replace(subspace_method.sampler, residual_aligned=False)
                subspace_method = dataclasses.replace(subspace_method, sampler=sampler)
    params = model.init(fold_in(key(seed), "params"), backend)
    if method == "first-order":
        obj = FirstOrderAdam(linear_decay(1e-3 if lr is None else lr, steps), b2=0.99)
    elif method == "subspace":
        obj = subspace_method
    elif lr is not None:
        obj = _activity(activity_adafactor, lr)(steps)
    else:
        obj = VARIANTS[method][1](steps)
    return loss, model, params, obj, test


def run_one(problem, dim, method, steps, seed=0, evals=20, lr=None):
    backend = "torch" if method == "first-order" else VARIANTS.get(method, ("numpy",))[0]
    loss, model, params, obj, test = setup(problem, dim, backend, method, steps, seed, lr)
    state = TrainState(obj.init(key(seed), params))
    start = time.perf_counter()
    result = train(
        obj,
        loss,
        params,
        state,
        steps,
        model=model,
        test=test,
        eval_every=max(1, steps // evals),
        blowup=float("inf"),
    )
    history = result.state.history
    return {
        "problem": problem,
        "dim": dim,
        "method": method,
        "backend": backend,
        "steps": steps,
        "seed": seed,
        **({} if lr is None else {"lr": lr}),
        "history": history,
        "final_rel_l2": history[-1]["rel_l2"],
        "min_rel_l2": min(h["rel_l2"] for h in history),
        "train_time": result.state.elapsed,
        "wall": time.perf_counter() - start,
        "status": "completed" if result.divergence is None else result.divergence.reason,
    }


def time_to(history, target):
    for h in history:
        if h["rel_l2"] <= target:
            return h["time"]
    return None


def score(runs: list[dict]) -> None:
    """Each run against first-order's run of as many steps and the same ``lr``: the
    ratio of final errors and the time to reach 2x first-order's final error."""
    for r in runs:
        fo = [f for f in runs if f["method"] == "first-order"
              and f["steps"] == r["steps"] and f.get("lr") == r.get("lr")]
        if fo:
            target = 2 * fo[0]["final_rel_l2"]
            r["time_to_2x_first_order"] = time_to(r["history"], target)
            r["ratio_to_first_order"] = r["final_rel_l2"] / fo[0]["final_rel_l2"]


def add_run(runs: list[dict], record: dict) -> list[dict]:
    """``runs`` with ``record`` replacing any run of the same method, steps and lr."""
    same = ("method", "steps", "lr")
    runs = [r for r in runs if any(r.get(k) != record.get(k) for k in same)]
    return [*runs, record]


def merge(out: pathlib.Path, sources: list[str]) -> None:
    """Fold the result files of runs made in other processes (``--out`` elsewhere, e.g.
    one method per core) into ``out``, rescoring each problem and dimension."""
    for source in sources:
        for path in sorted(pathlib.Path(source).glob("*.json")):
            incoming = json.loads(path.read_text())
            target = out / path.name
            runs = json.loads(target.read_text())["runs"] if target.exists() else []
            for record in incoming["runs"]:
                runs = add_run(runs, record)
            score(runs)
            target.write_text(json.dumps({**incoming, "runs": runs}, indent=1))
            print(f"merged {path} into {target}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(NAMES))
    parser.add_argument("--dims", nargs="+", type=int, default=[100])
    parser.add_argument("--methods", nargs="+", default=["first-order", "activity", "subspace"])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate of first-order and activity (default 1e-3)")
    parser.add_argument("--out", default="benchmarks/results/activity")
    parser.add_argument("--merge", nargs="+", metavar="DIR",
                        help="fold the results written under these --out folders into --out "
                             "and rescore (runs made in parallel processes); trains nothing")
    args = parser.parse_args(argv)
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be a positive learning rate, got {args.lr}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(out, args.merge)
        return
    for problem in args.problems:
        for dim in args.dims:
            path = out / f"{problem}-d{dim}.json"
            runs = json.loads(path.read_text())["runs"] if path.exists() else []
            for method in args.methods:
                record = run_one(problem, dim, method, args.steps, args.seed, lr=args.lr)
                runs = add_run(runs, record)
                score(runs)
                path.write_text(
                    json.dumps({"problem": problem, "dim": dim, "runs": runs}, indent=1)
                )
                print(
                    f"{problem} d={dim} {method}: final {record['final_rel_l2']:.3e} "
                    f"min {record['min_rel_l2']:.3e} train {record['train_time']:.1f}s "
                    f"{record['status']}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
