"""STDE's semilinear parabolic problems: u(0, 0) against the multilevel-Picard reference.

Allen–Cahn, semilinear heat and Sine–Gordon on R^d × [0, 0.3]
(``sdze_core.parabolic``, docs/problems.md#parabolic-problems), scored by ``rel_ref``
= |u_θ(0, 0) − u_ref| / |u_ref| (the target: 1e-2). First-order (PyTorch
autograd, Adam) and SDZE (the default zeroth-order method, activity
perturbations, on NumPy) with the same network, points and steps:
4 hidden tanh layers of 128, 100 points and 16 space coordinates a step,
learning rate 1e-3 decaying linearly (first-order; SDZE's own default
rate), ``--steps`` steps (1000 by default), an evaluation every steps/10.
Appends to ``benchmarks/results/parabolic.json``.

    python benchmarks/bench_parabolic.py --dims 10 100 1000 --methods first-order
    python benchmarks/bench_parabolic.py --dims 10 100 --methods sdze
    python benchmarks/bench_parabolic.py --report        # the table of docs/problems.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import sdze
from sdze_core.parabolic import PARABOLIC, REFERENCE_VALUES

OUT = pathlib.Path(__file__).parent / "results" / "parabolic.json"
TARGET = 1e-2


def run(name: str, dim: int, method: str, steps: int, seed: int, width: int) -> dict:
    backend = "torch" if method == "first-order" else "numpy"
    settings = {"learning_rate": 1e-3} if method == "first-order" else {}
    result = sdze.solve(name, dim, method=method, backend=backend, steps=steps, seed=seed,
                        width=width, eval_every=max(1, steps // 10), out=None, quiet=True,
                        plots=False, **settings)
    m = result.metrics
    return {
        "problem": name,
        "dim": dim,
        "method": method,
        "seed": seed,
        "config": m["config"],
        "status": m["status"],
        "reference": REFERENCE_VALUES[name][dim],
        "u_final": m["u_ref"][0],
        "rel_ref": m["rel_ref"],
        "min_rel_ref": m["min_rel_ref"],
        "min_rel_ref_step": m["min_rel_ref_step"],
        "history": m["history"],
        "wall_time": m["wall_time"],
        "it_per_s": m["it_per_s"],
    }


def report(rows: list[dict]) -> str:
    """Markdown table: per problem, d and method, u(0, 0) at the end against the reference."""
    lines = ["| problem | d | method | steps | u(0,0) reached | reference | rel. error (final) | "
             "min rel. error (step) | within 1e-2 | wall (s) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = {name: i for i, name in enumerate(PARABOLIC)}
    for r in sorted(rows, key=lambda r: (order[r["problem"]], r["dim"], r["method"], r["seed"])):
        reached = "yes" if r["rel_ref"] <= TARGET else "no"
        lines.append(
            f"| {r['problem']} | {r['dim']} | {r['method']} | {r['config']['steps']} | "
            f"{r['u_final']:.6g} | {r['reference']:.6g} | {r['rel_ref']:.2e} | "
            f"{r['min_rel_ref']:.2e} ({r['min_rel_ref_step']}) | {reached} | "
            f"{r['wall_time']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PARABOLIC), choices=list(PARABOLIC))
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--methods", nargs="+", default=["first-order", "sdze"])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--report", action="store_true", help="print the table of --out only")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    if args.report:
        print(report(rows))
        return
    for method in args.methods:
        for dim in args.dims:
            for name in args.problems:
                row = run(name, dim, method, args.steps, args.seed, args.width)
                same = (name, dim, method, args.seed)
                rows = [r for r in rows
                        if (r["problem"], r["dim"], r["method"], r["seed"]) != same]
                rows.append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
                print(f"{name} d={dim} {method}: u(0,0) {row['u_final']:.6g} (reference "
                      f"{row['reference']:.6g}), rel. error {row['rel_ref']:.2e}, min "
                      f"{row['min_rel_ref']:.2e}, {row['wall_time']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
