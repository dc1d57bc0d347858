"""Sparse Laplacian cost per point against d, and the saving of the collapsed top order.

For each backend and dimension d, in a fresh subprocess (so peak-memory
readings start clean), with the PINN ansatz u = (1 − ‖x‖²) N(x), N a tanh MLP
d → 128 → 128 → 128 → 128 → 1, B points and V sampled coordinates:

* ``primal_s``: median time of the first layer's primal GEMM x Wᵀ (B × d × h),
  the part of any forward pass that must grow with d;
* ``estimate_s``: median time of one ``SparseLaplacian(V)`` estimate, with the
  collapsed top order and without (``collapse=False``);
* ``extra_per_point_s`` = (estimate − primal) / B: what the estimator adds per
  point. SPEC section 2 says it does not grow with d (the tangents are the
  gathered columns W[:, j], O(h V)); this benchmark shows it;
* ``extra_peak_bytes``: peak memory during one estimate above the memory
  held before it (parameters and points), per point.

Writes ``benchmarks/results/sparse_laplacian.json`` and a plot
``benchmarks/results/sparse_laplacian.png``.

    python benchmarks/bench_sparse_laplacian.py                  # numpy, torch; d = 1e3..1e6
    python benchmarks/bench_sparse_laplacian.py --backends numpy --dims 1e3 1e4
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def median_time(fn, backend, repeats: int) -> float:
    backend.synchronize(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.synchronize(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backend_name: str, d: int, batch: int, directions: int, width: int, repeats: int):
    """One (backend, d) point; runs in its own process."""
    import sdze
    from sdze_core.models import MLP, Ansatz
    from sdze_core.oracles import SparseLaplacian

    backend = sdze.use(backend_name, dtype="float32").backend
    key = sdze.key(d)
    model = Ansatz(MLP((d, width, width, width, width, 1)))
    params = model.init(sdze.fold_in(key, "init"), backend)
    x = 0.5 / d**0.5 * backend.normal(sdze.fold_in(key, "points"), (batch, d))
    W0 = params[0]["W"]
    collapsed = SparseLaplacian(num_directions=directions, collapse=True)
    uncollapsed = SparseLaplacian(num_directions=directions, collapse=False)
    step = sdze.fold_in(key, "spatial")

    row = {
        "backend": backend_name,
        "d": d,
        "batch": batch,
        "directions": directions,
        "width": width,
        "dtype": "float32",
    }
    row["primal_s"] = median_time(lambda: x @ W0.T, backend, repeats)
    row["estimate_s"] = median_time(
        lambda: collapsed(model, params, x, step).value, backend, repeats
    )
    row["estimate_uncollapsed_s"] = median_time(
        lambda: uncollapsed(model, params, x, step).value, backend, repeats
    )
    for name in ("estimate", "estimate_uncollapsed"):
        row[f"{name}_extra_per_point_s"] = (row[f"{name}_s"] - row["primal_s"]) / batch
    row["collapsed_speedup"] = row["estimate_uncollapsed_s"] / row["estimate_s"]

    for name, oracle in (("estimate", collapsed), ("estimate_uncollapsed", uncollapsed)):
        backend.reset_peak_memory()
        before = backend.peak_memory()
        backend.synchronize(oracle(model, params, x, step).value)
        row[f"{name}_extra_peak_bytes"] = backend.peak_memory() - before
        row[f"{name}_extra_peak_bytes_per_point"] = row[f"{name}_extra_peak_bytes"] / batch
    row["param_bytes"] = 4 * sum(math.prod(p["W"].shape) + math.prod(p["b"].shape) for p in params)
    row["batch_bytes"] = batch * d * 4
    return row


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in sorted({r["backend"] for r in rows}):
        sel = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["d"])
        dims = [r["d"] for r in sel]
        for name, style in (("estimate", "-o"), ("estimate_uncollapsed", "--s")):
            label = f"{backend}, {'collapsed' if name == 'estimate' else 'uncollapsed'}"
            axes[0].plot(
                dims, [1e6 * r[f"{name}_extra_per_point_s"] for r in sel], style, label=label
            )
            axes[1].plot(
                dims,
                [r[f"{name}_extra_peak_bytes_per_point"] / 2**10 for r in sel],
                style,
                label=label,
            )
        axes[0].plot(
            dims,
            [1e6 * r["primal_s"] / r["batch"] for r in sel],
            ":",
            color="gray",
            label=f"{backend}, primal x Wᵀ per point",
        )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="d",
        ylabel="µs per point",
        title="time per point beyond the primal GEMM",
    )
    axes[1].set(
        xscale="log",
        xlabel="d",
        ylabel="KiB per point",
        title="peak memory per point beyond params + batch",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--dims", type=float, nargs="+", default=[1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS / "sparse_laplacian.json"))
    parser.add_argument("--one", nargs=2, metavar=("BACKEND", "D"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        row = measure(
            args.one[0],
            int(float(args.one[1])),
            args.batch,
            args.directions,
            args.width,
            args.repeats,
        )
        print(json.dumps(row))
        return

    rows = []
    for backend in args.backends:
        for d in map(int, args.dims):
            cmd = [
                sys.executable,
                __file__,
                "--one",
                backend,
                str(d),
                "--batch",
                str(args.batch),
                "--directions",
                str(args.directions),
                "--width",
                str(args.width),
                "--repeats",
                str(args.repeats),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{backend} d={d}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"{backend:>6} d={d:>8}: primal {1e3 * row['primal_s']:8.2f} ms, "
                f"estimate {1e3 * row['estimate_s']:8.2f} ms, extra/point "
                f"{1e6 * row['estimate_extra_per_point_s']:7.1f} µs, collapsed speed-up "
                f"{row['collapsed_speedup']:.2f}x, extra peak/point "
                f"{row['estimate_extra_peak_bytes_per_point'] / 2**10:7.1f} KiB"
            )
    import sdze

    result = {
        "benchmark": "sparse_laplacian",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
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
