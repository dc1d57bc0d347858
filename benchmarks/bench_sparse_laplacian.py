"""Sparse Laplacian cost per point against d, and the saving of the collapsed top order.

For each backend and dimension d, in a fresh subprocess (so peak-memory
readings start clean), with the PINN ansatz u = (1 − ‖x‖²) N(x), N a tanh MLP
d → 128 → 128 → 128 → 128 → 1, B points and V sampled coordinates:

* ``gemm_s``: median time of the first layer's primal GEMM x Wᵀ (B × d × h);
* ``forward_s``: median time of the plain forward pass u(x), which must read
  all of x: the GEMM and the ansatz's ‖x‖², both O(B d);
* ``estimate_s``: median time of one ``SparseLaplacian(V)`` estimate, with the
  collapsed top order (``collapse=True``) or without, in separate processes;
* ``extra_per_point_s`` = (estimate − forward) / B: what the estimator adds to
  the primal per point. docs/method.md#jets says it does not grow with d (the
  tangents are the gathered columns W[:, j], O(h V)); this shows it;
* ``extra_peak_bytes``: peak memory of the first estimate in a fresh process
  above the memory held before it (parameters and points), and per point.

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


def measure(
    backend_name: str, d: int, batch: int, directions: int, width: int, repeats: int, collapse: bool
):
    """One (backend, d, collapse) point; runs in its own process.

    Memory is measured first, on the first estimate in a fresh process, so
    that no allocator cache from earlier calls hides it; then the timings.
    """
    import sdze
    from sdze_core.models import MLP, Ansatz
    from sdze_core.oracles import SparseLaplacian

    backend = sdze.use(backend_name, dtype="float32").backend
    key = sdze.key(d)
    model = Ansatz(MLP((d, width, width, width, width, 1)))
    params = model.init(sdze.fold_in(key, "init"), backend)
    x = 0.5 / d**0.5 * backend.normal(sdze.fold_in(key, "points"), (batch, d))
    W0 = params[0]["W"]
    oracle = SparseLaplacian(num_directions=directions, collapse=collapse)
    step = sdze.fold_in(key, "spatial")

    row = {
        "backend": backend_name,
        "d": d,
        "batch": batch,
        "directions": directions,
        "width": width,
        "dtype": "float32",
        "collapse": collapse,
    }
    row["param_bytes"] = 4 * sum(math.prod(p["W"].shape) + math.prod(p["b"].shape) for p in params)
    row["batch_bytes"] = batch * d * 4
    backend.reset_peak_memory()
    before = backend.peak_memory()
    backend.synchronize(oracle(model, params, x, step).value)
    row["extra_peak_bytes"] = backend.peak_memory() - before
    row["extra_peak_bytes_per_point"] = row["extra_peak_bytes"] / batch

    row["gemm_s"] = median_time(lambda: x @ W0.T, backend, repeats)
    row["forward_s"] = median_time(lambda: model.apply(params, x), backend, repeats)
    row["estimate_s"] = median_time(lambda: oracle(model, params, x, step).value, backend, repeats)
    row["extra_per_point_s"] = (row["estimate_s"] - row["forward_s"]) / batch
    row["extra_over_gemm_per_point_s"] = (row["estimate_s"] - row["gemm_s"]) / batch
    return row


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for backend in sorted({r["backend"] for r in rows}):
        for collapse, style in ((True, "-o"), (False, "--s")):
            sel = sorted(
                (r for r in rows if r["backend"] == backend and r["collapse"] == collapse),
                key=lambda r: r["d"],
            )
            dims = [r["d"] for r in sel]
            label = f"{backend}, {'collapsed' if collapse else 'uncollapsed'}"
            axes[0].plot(dims, [1e6 * r["extra_per_point_s"] for r in sel], style, label=label)
            axes[1].plot(
                dims, [r["extra_peak_bytes_per_point"] / 2**10 for r in sel], style, label=label
            )
            if collapse:
                axes[0].plot(
                    dims,
                    [1e6 * r["forward_s"] / r["batch"] for r in sel],
                    ":",
                    label=f"{backend}, forward pass per point (grows with d)",
                )
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="d",
        ylabel="µs per point",
        title="estimate time per point beyond the forward pass",
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
    parser.add_argument(
        "--one", nargs=3, metavar=("BACKEND", "D", "COLLAPSE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()

    if args.one:
        row = measure(
            args.one[0],
            int(float(args.one[1])),
            args.batch,
            args.directions,
            args.width,
            args.repeats,
            collapse=args.one[2] == "collapse",
        )
        print(json.dumps(row))
        return

    rows = []
    for backend in args.backends:
        for d in map(int, args.dims):
            for mode in ("collapse", "no-collapse"):
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    backend,
                    str(d),
                    mode,
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
                    print(f"{backend} d={d} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{backend:>6} d={d:>8} {mode:>11}: gemm {1e3 * row['gemm_s']:8.2f} ms, "
                    f"forward {1e3 * row['forward_s']:8.2f} ms, estimate "
                    f"{1e3 * row['estimate_s']:8.2f} ms, beyond forward/point "
                    f"{1e6 * row['extra_per_point_s']:6.1f} µs, extra peak/point "
                    f"{row['extra_peak_bytes_per_point'] / 2**10:7.1f} KiB"
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
