"""Sparse biharmonic cost per point against d: 2-sparse directions against the dense e_i ± e_k.

For each backend, dimension d and mode, in a fresh subprocess (so peak-memory
readings start clean), with the PINN ansatz u = (1 − ‖x‖²)(4 − ‖x‖²) N(x), N a
tanh MLP d → 128 → 128 → 128 → 128 → 1, B points and P sampled pairs, one
``SparseBiharmonic(P)`` estimate (4P fourth-order jets along e_i, e_k,
e_i + e_k, e_i − e_k) is measured in three modes:

* ``shared`` (the default, ``collapse=False``): the 4P directions are
  ``SparseDirections``; the first layer gathers 2 columns per direction and
  all of them share one jet, hence one primal pass x Wᵀ;
* ``collapsed`` (``collapse=True``): the same gathers, in two collapsed jets
  (diagonal and polarization), so the primal x Wᵀ is computed twice;
* ``dense``: what the estimator did before, the 2P directions e_i ± e_k built
  as a (2P, d) array and pushed through x Wᵀ (the model is wrapped so that it
  does not take sparse directions: the oracle's dense fallback, collapsed).

Reported per row: ``forward_s`` (median of the plain forward pass u(x), which
reads all of x), ``estimate_s`` (median of one estimate),
``extra_per_point_s`` = (estimate − forward) / B, and ``extra_peak_bytes``
(peak memory of the first estimate in a fresh process above what was held
before it: parameters and points), also per point. The shared mode's extra
time and memory per point are flat in d; the dense mode's grow as P d / B.

Writes ``benchmarks/results/sparse_biharmonic.json`` and the plot
``benchmarks/results/sparse_biharmonic.png``.

    python benchmarks/bench_sparse_biharmonic.py                  # numpy; d = 1e2..1e5
    python benchmarks/bench_sparse_biharmonic.py --backends numpy torch --dims 1e3 1e6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODES = ("shared", "collapsed", "dense")


class DenseDirectionsModel:
    """The model with jets, but without ``sparse_directions``: oracles give it dense ones."""

    def __init__(self, model):
        self.model = model

    def apply(self, params, x):
        return self.model.apply(params, x)

    def jet(self, params, x, directions, order, collapse=False):
        return self.model.jet(params, x, directions, order, collapse)


def median_time(fn, backend, repeats: int) -> float:
    backend.synchronize(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.synchronize(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backend_name: str, d: int, mode: str, batch: int, pairs: int, width: int, repeats: int):
    """One (backend, d, mode) row; runs in its own process (memory first, then timings)."""
    import sdze
    from sdze_core.models import MLP, Ansatz
    from sdze_core.oracles import SparseBiharmonic

    backend = sdze.use(backend_name, dtype="float32").backend
    key = sdze.key(d)
    model = Ansatz(MLP((d, width, width, width, width, 1)), "annulus")
    params = model.init(sdze.fold_in(key, "init"), backend)
    x = 1.5 / d**0.5 * backend.normal(sdze.fold_in(key, "points"), (batch, d))
    oracle = SparseBiharmonic(num_pairs=pairs, collapse=mode != "shared")
    evaluated = DenseDirectionsModel(model) if mode == "dense" else model
    sample = oracle.sample(sdze.fold_in(key, "spatial"), x)

    def estimate():
        return oracle.estimate(evaluated, params, x, sample).value

    row = {
        "backend": backend_name,
        "d": d,
        "mode": mode,
        "batch": batch,
        "pairs": pairs,
        "directions": 4 * pairs,
        "width": width,
        "dtype": "float32",
    }
    row["param_bytes"] = 4 * sum(math.prod(p["W"].shape) + math.prod(p["b"].shape) for p in params)
    row["batch_bytes"] = batch * d * 4
    backend.reset_peak_memory()
    before = backend.peak_memory()
    backend.synchronize(estimate())
    row["extra_peak_bytes"] = backend.peak_memory() - before
    row["extra_peak_bytes_per_point"] = row["extra_peak_bytes"] / batch
    row["forward_s"] = median_time(lambda: model.apply(params, x), backend, repeats)
    row["estimate_s"] = median_time(estimate, backend, repeats)
    row["extra_per_point_s"] = (row["estimate_s"] - row["forward_s"]) / batch
    return row


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"shared": "-o", "collapsed": "-.^", "dense": "--s"}
    colors = {"shared": "C0", "collapsed": "C2", "dense": "C3"}
    for backend in sorted({r["backend"] for r in rows}):
        for mode in MODES:
            sel = sorted(
                (r for r in rows if r["backend"] == backend and r["mode"] == mode),
                key=lambda r: r["d"],
            )
            if not sel:
                continue
            dims = [r["d"] for r in sel]
            label = f"{backend}, {mode}"
            for ax, values in (
                (axes[0], [1e3 * r["extra_per_point_s"] for r in sel]),
                (axes[1], [r["extra_peak_bytes_per_point"] / 2**20 for r in sel]),
            ):
                ax.plot(dims, values, styles[mode], color=colors[mode], label=label)
            if mode == "shared":
                axes[0].plot(
                    dims,
                    [1e3 * r["forward_s"] / r["batch"] for r in sel],
                    ":",
                    color="C7",
                    label=f"{backend}, forward pass per point (grows with d)",
                )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="d",
        ylabel="ms per point",
        title="SparseBiharmonic time per point beyond the forward pass",
    )
    axes[1].set(
        xscale="log",
        yscale="log",
        xlabel="d",
        ylabel="MiB per point",
        title="peak memory per point beyond params + batch",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpy"])
    parser.add_argument("--dims", type=float, nargs="+", default=[1e2, 1e3, 1e4, 1e5])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "sparse_biharmonic.json"))
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "D", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = ["--batch", str(args.batch), "--pairs", str(args.pairs)]
    sizes += ["--width", str(args.width), "--repeats", str(args.repeats)]

    if args.one:
        backend, d, mode = args.one
        row = measure(
            backend, int(float(d)), mode, args.batch, args.pairs, args.width, args.repeats
        )
        print(json.dumps(row))
        return

    rows = []
    for backend in args.backends:
        for d in map(int, args.dims):
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--one", backend, str(d), mode, *sizes]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    print(f"{backend} d={d} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{backend:>6} d={d:>8} {mode:>9}: forward {1e3 * row['forward_s']:8.2f} ms, "
                    f"estimate {1e3 * row['estimate_s']:8.2f} ms, beyond forward/point "
                    f"{1e3 * row['extra_per_point_s']:7.2f} ms, extra peak/point "
                    f"{row['extra_peak_bytes_per_point'] / 2**20:7.2f} MiB",
                    flush=True,
                )
    import sdze

    result = {
        "benchmark": "sparse_biharmonic",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": os.environ.get("OMP_NUM_THREADS"),
        },
        "sdze": sdze.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
