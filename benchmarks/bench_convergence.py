"""Time to accuracy: SDZE against first-order STDE (and ablations), one run, one machine.

Each entry of the grid is one ``sdze.solve`` run with the solver's defaults
(only what the grid names is changed), evaluated every ``--eval-every`` steps
on the solver's fixed test points; the runs go one after the other so that
their wall times are comparable. The evaluation time is not counted in the
wall-time axis (the records' ``time`` is training time only).

Grids:

* ``main``: {Allen–Cahn, Poisson, Sine–Gordon} two-body at d = 10^2, 10^3,
  10^4; SDZE (NumPy, forward passes only) and first-order STDE (PyTorch
  autograd + Adam), both at their defaults;
* ``ablation``: Allen–Cahn two-body at d = 10^3: what the defaults were chosen
  from (Adam's b2 for first-order; for SDZE the residual-aligned first-layer
  basis, one layer per query, q and the schedule, and CRNS).

Writes ``benchmarks/results/convergence_<grid>.json`` (every run's config,
history and final errors, the machine) and ``convergence_<grid>.png``
(relative L2 against wall time, one panel per problem and d).

    python benchmarks/bench_convergence.py                      # main grid
    python benchmarks/bench_convergence.py --grid ablation
    python benchmarks/bench_convergence.py --dims 1000 --problems allen-cahn-two-body
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MAIN_PROBLEMS = ["allen-cahn-two-body", "poisson-two-body", "sine-gordon-two-body"]
# (label, solver settings) of the methods compared
MAIN_METHODS = [
    ("sdze (numpy)", {"method": "sdze", "backend": "numpy"}),
    ("first-order (torch)", {"method": "first-order", "backend": "torch"}),
]
ABLATION = [
    ("first-order, b2 0.999", {"method": "first-order", "backend": "torch", "adam_b2": 0.999}),
    ("first-order (default: b2 0.99)", {"method": "first-order", "backend": "torch"}),
    ("sdze (default)", {}),
    ("sdze, no residual alignment", {"residual_aligned": False}),
    ("sdze, all layers per query", {"layerwise": False}),
    ("sdze, q 4, constant 0.03", {"num_queries": 4, "schedule": "constant",
                                  "learning_rate": 0.03}),
    ("sdze, before the study", {"num_queries": 4, "schedule": "linear", "learning_rate": 0.03,
                                "layerwise": False, "residual_aligned": False}),
    ("sdze-naive (no CRNS)", {"method": "sdze-naive"}),
]


def grid(args) -> list[dict]:
    if args.grid == "ablation":
        return [{"label": label, "problem": "allen-cahn-two-body", "dim": 1000, **settings}
                for label, settings in ABLATION]
    runs = []
    for d in args.dims:
        for problem in args.problems:
            for label, settings in MAIN_METHODS:
                if args.methods and settings["method"] not in args.methods:
                    continue
                runs.append({"label": label, "problem": problem, "dim": int(d), **settings})
    return runs


def solve_one(entry: dict, args) -> dict:
    import sdze

    settings = {k: v for k, v in entry.items() if k not in ("label", "problem", "dim")}
    if settings.get("method", "sdze") in ("sdze", "sdze-naive"):
        # this study measured the subspace estimator (the default before issue 13)
        settings.setdefault("perturbation", "subspace")
    if args.steps is not None:
        settings["steps"] = args.steps
    start = time.perf_counter()
    result = sdze.solve(entry["problem"], entry["dim"], out=None, quiet=True,
                        eval_every=args.eval_every, **settings)
    return {
        **entry,
        "config": result.metrics["config"],
        "status": result.status,
        "rel_l2": result.rel_l2,
        "rel_linf": result.rel_linf,
        "history": result.history,
        "wall_s": time.perf_counter() - start,
        "train_s": result.history[-1]["time"] if result.history else None,
        "it_per_s": result.metrics.get("it_per_s"),
        "versions": result.metrics.get("versions"),
    }


def time_to(history: list, target: float):
    """Training time at the first evaluation with rel-L2 <= target (None if never)."""
    for record in history:
        if record.get("rel_l2", float("inf")) <= target:
            return record["time"]
    return None


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["problem"], r["dim"]) for r in rows}, key=lambda p: (p[1], p[0]))
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.8 * nrows), squeeze=False)
    for ax, (problem, d) in zip(axes.flat, panels, strict=False):
        for r in rows:
            if (r["problem"], r["dim"]) == (problem, d) and r["history"]:
                h = r["history"]
                ax.loglog([max(x["time"], 1e-2) for x in h], [x["rel_l2"] for x in h],
                          marker=".", label=r["label"])
        ax.axhline(1e-2, color="k", lw=0.6, ls="--")
        ax.set(title=f"{problem}, d = {d:g}", xlabel="training wall time (s)",
               ylabel="relative L2 error")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=["main", "ablation"], default="main")
    parser.add_argument("--problems", nargs="+", default=MAIN_PROBLEMS)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e2, 1e3, 1e4])
    parser.add_argument("--methods", nargs="+", help="only these methods of the main grid")
    parser.add_argument("--steps", type=int, help="override the solver's default steps")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    out = args.out or RESULTS / f"convergence_{args.grid}.json"
    import sdze

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sdze": sdze.__version__,
        "command": " ".join(["python", "benchmarks/" + Path(__file__).name] + sys.argv[1:]),
    }
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for entry in grid(args):
        row = solve_one(entry, args)
        row["time_to_1e-2_s"] = time_to(row["history"], 1e-2)
        rows.append(row)
        print(f"{row['problem']:22s} d={row['dim']:>6d} {row['label']:32s} rel-L2 "
              f"{row['rel_l2']:.3e}  train {row['train_s']:.1f} s  {row['it_per_s']:.1f} it/s  "
              f"to 1e-2: {row['time_to_1e-2_s']}", flush=True)
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # after every run
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
