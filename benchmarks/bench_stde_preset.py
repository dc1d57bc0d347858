"""STDE's published first-order errors, reproduced with ``--preset stde``, and SDZE beside them.

Allen–Cahn two-body (docs/method.md), STDE's setting (``sdze.solver.PRESETS["stde"]``:
three hidden tanh layers of 128 with U(±1/√fan) initialisation, radius-uniform
points, 100 points and 16 coordinates a step, Adam 1e-3 (b2 0.999) decaying
linearly over 10 000 steps, 20 000 test points, an evaluation every 1000
steps, the minimum over the evaluations reported). First-order runs on
PyTorch; SDZE (activity perturbations, its own optimizer defaults: Adafactor,
b2 0.99) on NumPy, with the same network, points and steps.

Published (A100, JAX, mean over seeds 0-4): 1.89e-2 (d = 100), 7.07e-4 (10^3),
8.33e-4 (10^4). Appends to ``benchmarks/results/stde_preset.json``.

    python benchmarks/bench_stde_preset.py --dims 100 1000 10000 --methods first-order
    python benchmarks/bench_stde_preset.py --dims 100 1000 --methods sdze
    python benchmarks/bench_stde_preset.py --report        # the table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import sdze

PUBLISHED = {100: 1.89e-2, 1000: 7.07e-4, 10000: 8.33e-4, 100000: 1.50e-3, 1000000: 3.99e-3}
OUT = pathlib.Path(__file__).parent / "results" / "stde_preset.json"


def run(dim: int, method: str, seed: int, steps: int | None) -> dict:
    settings = {"backend": "torch"} if method == "first-order" else {"adam_b2": 0.99}
    if steps is not None:
        settings["steps"] = steps
    result = sdze.solve("allen-cahn-two-body", dim, method=method, preset="stde", seed=seed,
                        out=None, quiet=True, plots=False, **settings)
    m = result.metrics
    return {
        "dim": dim,
        "method": method,
        "seed": seed,
        "config": m["config"],
        "status": m["status"],
        "min_rel_l2": m["min_rel_l2"],
        "min_rel_l2_step": m["min_rel_l2_step"],
        "final_rel_l2": m["rel_l2"],
        "published_first_order": PUBLISHED.get(dim),
        "history": m["history"],
        "wall_time": m["wall_time"],
        "median_step_s": m["median_step_s"],
    }


def report(rows: list[dict]) -> str:
    """Markdown table: per d and method, min-over-evaluations error against the published one."""
    lines = ["| d | method | seed | min rel. L2 (step) | final rel. L2 | published first-order | "
             "× published | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["dim"], r["method"], r["seed"])):
        published = r["published_first_order"]
        ratio = f"{r['min_rel_l2'] / published:.2f}" if published else "–"
        lines.append(
            f"| {r['dim']} | {r['method']} | {r['seed']} | {r['min_rel_l2']:.3g} "
            f"({r['min_rel_l2_step']}) | "
            f"{r['final_rel_l2']:.3g} | {published:.3g} | {ratio} | {r['wall_time']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--methods", nargs="+", default=["first-order", "sdze"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, help="override the preset's 10 000 (smoke runs)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--report", action="store_true", help="print the table of --out only")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    if args.report:
        print(report(rows))
        return
    for dim in args.dims:
        for method in args.methods:
            for seed in args.seeds:
                row = run(dim, method, seed, args.steps)
                same = (dim, method, seed)
                rows = [r for r in rows if (r["dim"], r["method"], r["seed"]) != same]
                rows.append(row)
                out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
                published = row["published_first_order"]
                ratio = f" ({row['min_rel_l2'] / published:.2f}x published)" if published else ""
                print(f"d={dim} {method} seed {seed}: min rel. L2 {row['min_rel_l2']:.3e}{ratio}, "
                      f"final {row['final_rel_l2']:.3e}, {row['wall_time']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
