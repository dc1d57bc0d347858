"""Does averaging the weights lower the activity engine's plateau? (It does not.)

If the plateau where activity-perturbation training stops (docs/benchmarks.md,
"Why: the estimator's noise") were the weights jittering around a better
point, an exponential moving average of the iterates, θ̄ ← β θ̄ + (1 − β) θ,
would sit closer to it (Polyak–Ruppert averaging). This trains the library's
default activity engine on one problem (default: the generalisation suite's
poisson-sine, d = 100, 1000 steps, seed 0, as in bench_activity.py) and scores
the raw weights and their averages for several β at every 50 steps.

    python benchmarks/diagnose_averaging.py [--problem poisson-sine --dim 100 --steps 1000]

Writes ``benchmarks/results/activity_averaging.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_activity  # noqa: E402

from sdze_core.keys import key  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def tree_map(fn, *trees):
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees, strict=True))
    return fn(*trees)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="poisson-sine")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.9, 0.99, 0.995, 0.998])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    loss, model, params, method, test = bench_activity.setup(
        args.problem, args.dim, "numpy", "activity", args.steps, args.seed)
    state = method.init(key(args.seed), params)
    averages = {b: tree_map(lambda a: a.copy(), params) for b in args.decays}
    every = max(1, args.steps // 20)
    history = []
    for t in range(1, args.steps + 1):
        params, state, _ = method.step(loss, params, state)
        for b in args.decays:
            averages[b] = tree_map(lambda m, p, b=b: b * m + (1 - b) * p, averages[b], params)
        if t % every == 0 or t == args.steps:
            row = {"step": t, "raw": test.errors(model, params)["rel_l2"]}
            row |= {f"ema_{b}": test.errors(model, averages[b])["rel_l2"] for b in args.decays}
            history.append(row)
            print(json.dumps(row), flush=True)
    out = RESULTS / "activity_averaging.json"
    out.write_text(json.dumps({"problem": args.problem, "dim": args.dim, "steps": args.steps,
                               "seed": args.seed, "decays": args.decays,
                               "history": history}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
