"""HJB-LIN and KdV (the built-ins ``hjb-lin`` and ``kdv``): rel. L2 of first-order and SDZE.

HJB-LIN (u_t + Δ_x u − (1/d) Σ_i |∂_i u|^1.75 = −2 on R^d × [0, 1], u* = Σ_i x_i
+ 1 − t) in d = 10 and 100, and KdV (u_t + u u_x + 0.0025 u_xxx = f on
[−1, 1] × [0, 1], u* = sech²(3 (x − t/2 + 1/4))) in its one space dimension,
each trained with both methods from the same network, points and steps:
first-order Adam on PyTorch (its defaults: 1e-3 decaying linearly, b2 0.99)
and SDZE (activity perturbations, its defaults: Adafactor 1e-3) on NumPy.
Each row also has the error of the lift alone (the ansatz with N = 0: what
the network adds is the gap between the two). Appends to
``benchmarks/results/hjb_kdv.json``.

    python benchmarks/bench_hjb_kdv.py                         # the default runs
    python benchmarks/bench_hjb_kdv.py --cases hjb-lin:1000 --methods first-order
    python benchmarks/bench_hjb_kdv.py --report                # the table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np

import sdze
from sdze_core import jets
from sdze_core.keys import fold_in, key
from sdze_core.problem_registry import make_problem
from sdze_core.registry import make_backend

OUT = pathlib.Path(__file__).parent / "results" / "hjb_kdv.json"
#: Steps per problem: KdV's third-order residual needs more than HJB-LIN's.
STEPS = {"hjb-lin": 1000, "kdv": 2000}
BACKEND = {"first-order": "torch", "sdze": "numpy"}


def lift_rel_l2(name: str, dim: int, points: int = 5000) -> float:
    """‖g − u*‖ / ‖u*‖ on the problem's points: the ansatz's error with N = 0."""
    b = make_backend("numpy").with_config(dtype="float64", rng="portable")
    problem = make_problem(name, dim, backend=b)
    x = problem.sample_domain(fold_in(key(0), "lift"), points)
    g = problem.model(8, 1).lift(jets.Jet(x, ())).primal
    exact = problem.exact(x)
    return float(np.linalg.norm(g - exact) / np.linalg.norm(exact))


def run(name: str, dim: int, method: str, steps: int, width: int, depth: int,
        test_points: int) -> dict:  # fmt: skip
    result = sdze.solve(name, dim, method=method, backend=BACKEND[method], steps=steps,
                        width=width, depth=depth, test_points=test_points,
                        eval_every=max(1, steps // 10), out=None, quiet=True, plots=False)
    m = result.metrics
    return {
        "problem": name,
        "dim": dim,
        "method": method,
        "config": m["config"],
        "status": m["status"],
        "final_rel_l2": m["rel_l2"],
        "min_rel_l2": m["min_rel_l2"],
        "min_rel_l2_step": m["min_rel_l2_step"],
        "lift_rel_l2": lift_rel_l2(name, dim),
        "history": m["history"],
        "wall_time": m["wall_time"],
        "median_step_s": m["median_step_s"],
    }


def report(rows: list[dict]) -> str:
    """Markdown table: per problem, d and method, the final and best rel. L2 and the lift's."""
    lines = ["| problem | d | method | steps | final rel. L2 | min rel. L2 (step) | "
             "lift alone (N = 0) | s / step | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["problem"], r["dim"], r["method"])):
        lines.append(
            f"| {r['problem']} | {r['dim']} | {r['method']} | {r['config']['steps']} | "
            f"{r['final_rel_l2']:.3g} | {r['min_rel_l2']:.3g} ({r['min_rel_l2_step']}) | "
            f"{r['lift_rel_l2']:.3g} | {r['median_step_s']:.3f} | {r['wall_time']:.0f} |"
        )
    return "\n".join(lines)


def parse_case(text: str) -> tuple[str, int]:
    name, _, dim = text.partition(":")
    return name, int(dim)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=parse_case, nargs="+",
                        default=[("hjb-lin", 10), ("hjb-lin", 100), ("kdv", 1)],
                        help="NAME:DIM pairs (default hjb-lin:10 hjb-lin:100 kdv:1)")
    parser.add_argument("--methods", nargs="+", default=["first-order", "sdze"])
    parser.add_argument("--steps", type=int, help="override the per-problem steps (smoke runs)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--test-points", type=int, default=5000)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--report", action="store_true", help="print the table of --out only")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() else {}
    rows, commands = saved.get("rows", []), saved.get("commands", [])
    if args.report:
        print(report(rows))
        return
    for name, dim in args.cases:
        for method in args.methods:
            steps = args.steps or STEPS[name]
            row = run(name, dim, method, steps, args.width, args.depth, args.test_points)
            same = (name, dim, method)
            rows = [r for r in rows if (r["problem"], r["dim"], r["method"]) != same]
            rows.append(row)
            command = " ".join(sys.argv)
            commands = commands if command in commands else [*commands, command]
            out.write_text(json.dumps({"commands": commands, "rows": rows}, indent=1))
            print(f"{name} d={dim} {method}: rel. L2 {row['final_rel_l2']:.3e} (min "
                  f"{row['min_rel_l2']:.3e}; lift alone {row['lift_rel_l2']:.3e}), "
                  f"{row['wall_time']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
