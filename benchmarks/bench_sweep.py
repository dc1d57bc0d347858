"""Speed and memory of every method against d, side by side in one run.

Issue 7; the methods are those of docs/method.md#baselines.

For each backend, method and dimension d, in a fresh subprocess (so the peak
is the configuration's own), the solver's own run (``sdze.solver.build``:
the Allen–Cahn two-body problem with its closed-form forcing, the ansatz
(1 − ‖x‖²) N(x), N a float32 tanh MLP d → 128 → 128 → 128 → 128 → 1, B = 100
points and V = 16 sampled dimensions per step) is trained for a few steps:

* ``sdze``: CRNS, rank-8 subspace, ZO-Adam, q = 4 (the solver's defaults);
* ``sdze-naive``: the same without CRNS;
* ``zo-full``: CRNS with full-space Gaussian perturbations (q = 4, ZO-SGD);
* ``first-order``: STDE, the same jet oracle, autodiff and Adam (torch, jax);
* ``sdgd``: Adam on the same estimator computed by nested autodiff (torch, jax).

Recorded per configuration:

* ``step_s``: median wall time of a training step (points, forcing, oracle,
  the method's evaluations and its update) after ``warmup`` steps;
* ``gemm_s``: median time of one first-layer GEMM x Wᵀ (B × d × h) in the same
  process, and ``step_over_gemm``;
* ``peak_bytes``: peak resident memory above the process's baseline (host
  RSS on CPU, the allocator's peak on a GPU) over initialisation and the steps;
  ``peak_ratio`` = peak_bytes / (parameter bytes + batch bytes);
* the learning rate is 0 (the step does the same work; nothing diverges);
* a configuration that needs more than ``--memory-limit`` GiB of RSS is
  stopped and recorded as ``out of memory``; a backend without autodiff is
  recorded as ``not applicable`` for first-order and SDGD.

Writes ``benchmarks/results/sweep.json`` (one row per configuration, with the
machine and versions) and ``sweep.png`` (step time, peak memory and both
ratios against d, log-log).

    python benchmarks/bench_sweep.py                                  # the full sweep
    python benchmarks/bench_sweep.py --backends torch --dims 1e2 1e3 --steps 3   # quick
    python benchmarks/bench_sweep.py --backends torch --methods first-order --dims 2e6 5e6 \\
        --out benchmarks/results/sweep_first_order_max.json            # largest feasible d
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
METHODS = ["sdze", "sdze-naive", "zo-full", "first-order", "sdgd"]


def current_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(backend_name: str, method: str, d: int, problem: str, steps: int, warmup: int,
            device: str | None) -> dict:
    """One configuration, in its own process."""
    import sdze
    from sdze.solver import SolverConfig, build
    from sdze_core.backend import AutodiffNotAvailableError
    from sdze_core.keys import fold_in, key

    def config(dim):
        # Learning rate 1e-30 (a run's must be > 0): the same work per step, and steps far
        # below round-off, so no run can diverge (ZO-SGD on full-space perturbations would
        # at some d) and every configuration is timed.
        return SolverConfig(problem, dim, method=method, backend=backend_name, device=device,
                            steps=warmup + steps, test_points=100, learning_rate=1e-30)

    # The method's code paths on a tiny problem first, so that lazy imports,
    # allocator pools and compilation caches are in the baseline.
    tiny = build(config(8))
    tiny_params = tiny.model.init(key(9), tiny.backend)
    try:
        tiny.method.step(tiny.loss, tiny_params, tiny.method.init(key(9), tiny_params))
    except AutodiffNotAvailableError as error:
        return {"status": f"not applicable: {error}"}

    run = build(config(d))
    backend = run.backend
    backend.reset_peak_memory()
    on_gpu = any(word in str(backend.device).lower() for word in ("cuda", "gpu"))
    baseline = 0 if on_gpu else current_rss()  # on a GPU the allocator's own peak
    params = run.model.init(fold_in(key(0), "params"), backend)
    state = run.method.init(key(0), params)
    times = []
    for _ in range(warmup + steps):
        start = time.perf_counter()
        params, state, info = run.method.step(run.loss, params, state)
        backend.synchronize(params[0]["W"])
        times.append(time.perf_counter() - start)
    peak = backend.peak_memory() - baseline

    x = run.loss.sample(key(6)).x
    W = params[0]["W"]
    backend.synchronize(x @ W.T)
    gemm = []
    for _ in range(max(5, steps)):
        start = time.perf_counter()
        backend.synchronize(x @ W.T)
        gemm.append(time.perf_counter() - start)

    param_bytes = sum(int(math.prod(p[k].shape)) * 4 for p in params for k in ("W", "b"))
    batch_bytes = int(math.prod(x.shape)) * 4
    step_s = statistics.median(times[warmup:])
    gemm_s = statistics.median(gemm)
    return {
        "status": "ok",
        "step_s": step_s,
        "step_times_s": times,
        "gemm_s": gemm_s,
        "step_over_gemm": step_s / gemm_s,
        "param_bytes": param_bytes,
        "batch_bytes": batch_bytes,
        "peak_bytes": peak,
        "peak_ratio": peak / (param_bytes + batch_bytes),
        "loss": info.loss,
        "versions": sdze.solver._versions(backend),
        "device": str(backend.device),
    }


def run_child(args, backend: str, method: str, d: int) -> dict:
    """Run one configuration in a subprocess under the RSS watchdog."""
    command = [sys.executable, __file__, "--child", "--backends", backend, "--methods", method,
               "--dims", str(d), "--problem", args.problem, "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--device", args.device] if args.device else [])
    limit = args.memory_limit * 2**30
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    peak_rss, killed = 0, None
    while child.poll() is None:
        peak_rss = max(peak_rss, rss_of(child.pid))
        if peak_rss > limit:
            killed = f"out of memory: RSS above the {args.memory_limit:g} GiB limit"
        elif time.perf_counter() - start > args.timeout:
            killed = f"timed out after {args.timeout:g} s"
        if killed:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            break
        time.sleep(0.2)
    out, err = child.communicate()
    if killed:
        return {"status": killed}
    if child.returncode != 0:
        reason = err.strip().splitlines()[-1] if err.strip() else f"exit {child.returncode}"
        return {"status": f"failed: {reason}"}
    return json.loads(out.strip().splitlines()[-1])


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("step_s", "step time (s)"), ("step_over_gemm", "step time / first-layer GEMM"),
              ("peak_bytes", "peak memory (bytes)"), ("peak_ratio", "peak / (params + batch)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    styles = {"numpy": "-", "torch": "--", "jax": ":", "cupy": "-."}
    colors = dict(zip(METHODS, ["C0", "C1", "C2", "C3", "C4"], strict=True))
    ok = [r for r in rows if r["status"] == "ok"]
    for ax, (field, label) in zip(axes.flat, panels, strict=True):
        for backend in sorted({r["backend"] for r in ok}):
            for method in METHODS:
                sel = sorted((r for r in ok if r["backend"] == backend and r["method"] == method),
                             key=lambda r: r["d"])
                if sel:
                    ax.plot([r["d"] for r in sel], [max(r[field], 1e-12) for r in sel],
                            marker="o", ls=styles.get(backend, "-"), color=colors[method],
                            label=f"{method} ({backend})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.suptitle("Allen–Cahn two-body, float32, B = 100, V = 16, 4 × 128 tanh; one run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch", "jax"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--dims", nargs="+", type=float, default=[1e2, 1e3, 1e4, 1e5, 1e6])
    parser.add_argument("--problem", default="allen-cahn-two-body")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--device", help="the backends' device, e.g. cuda")
    parser.add_argument("--memory-limit", type=float, default=20.0, help="GiB of RSS")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS / "sweep.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = measure(args.backends[0], args.methods[0], int(args.dims[0]), args.problem,
                      args.steps, args.warmup, args.device)
        print(json.dumps(row))
        return
    rows = []
    for d in sorted(int(d) for d in args.dims):
        for backend in args.backends:
            for method in args.methods:
                row = {"backend": backend, "method": method, "d": d, "problem": args.problem,
                       **run_child(args, backend, method, d)}
                rows.append(row)
                if row["status"] == "ok":
                    print(f"{backend:6s} {method:12s} d={d:>9d}: step {row['step_s']:.4f} s "
                          f"= {row['step_over_gemm']:.1f} GEMM, peak "
                          f"{row['peak_bytes'] / 2**20:.0f} MiB = {row['peak_ratio']:.2f} x "
                          f"(params+batch)", flush=True)
                else:
                    print(f"{backend:6s} {method:12s} d={d:>9d}: {row['status'][:100]}",
                          flush=True)
    import sdze

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                   "MKL_NUM_THREADS")},
        "python": platform.python_version(),
        "sdze": sdze.__version__,
        "command": " ".join(["python", "benchmarks/" + Path(__file__).name] + sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
