"""Peak memory and time of an SDZE training step against d, and against one GEMM.

For each backend, dimension d and number of queries q, in a fresh subprocess:
the PINN ansatz u = (1 − ‖x‖²) N(x), N a tanh MLP d → 128 → 128 → 128 → 128 → 1
in float32, the loss (1/B) Σ_b (Δ̂u + u − u³)_b² (Allen–Cahn with zero forcing:
the forcing is the problem's cost, not the engine's) with the sparse Laplacian
(V sampled dimensions, collapsed), B collocation points drawn in the unit ball
at every step, the low-rank subspace sampler (rank r, refresh every T steps)
and ZO-Adam.

* ``peak_bytes``: peak resident memory above the process's baseline after
  imports (host RSS on CPU; ``VmHWM`` reset through /proc/self/clear_refs),
  over parameter initialisation and ``steps`` steps that include a basis
  refresh (the merge W ← W + U A Vᵀ and new bases);
* ``peak_ratio`` = peak_bytes / (parameter bytes + batch bytes): the target is
  at most 1.3 (nothing P-sized besides the parameters);
* ``step_s``: median step time over the steps after the first two and
  outside refreshes; every step draws its batch of B × d normals, whose
  time alone is ``sample_s``; ``refresh_step_s``: the steps that refresh the
  bases; ``engine_s``: median time of further steps on a batch drawn once
  (the SDZE step proper: oracle, 2q batched evaluations, update; one of
  them refreshes the bases);
* ``gemm_s``: median time of one first-layer GEMM x Wᵀ (B × d × h) in the same
  process; ``engine_over_gemm`` and ``step_over_gemm`` are the ratios (target
  for the engine: at most 1.5).

Writes ``benchmarks/results/sdze_step.json`` and ``sdze_step.png``.

    python benchmarks/bench_sdze_step.py                          # numpy, torch; d = 1e4..1e6
    python benchmarks/bench_sdze_step.py --backends numpy --dims 1e6 --queries 1
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
WARMUP = 2  # steps left out of the median step time (they are in the memory peak)


def current_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(backend_name, d, queries, batch, directions, width, depth, rank, refresh, steps):
    """One configuration, in its own process: memory over init and steps, then timings."""
    import sdze  # noqa: F401  (registers the built-in backends)
    from sdze_core.engine import SDZE
    from sdze_core.jets import rowwise_squared_norm
    from sdze_core.keys import fold_in, key
    from sdze_core.models import MLP, Ansatz
    from sdze_core.objectives import ResidualLoss
    from sdze_core.optimizers import zo_adam
    from sdze_core.oracles import SparseLaplacian
    from sdze_core.perturbers import CRNSPerturber
    from sdze_core.registry import make_backend
    from sdze_core.samplers import LowRankSubspace

    backend = make_backend(backend_name, dtype="float32")
    xp = backend.xp
    # Warm up the library code paths on a tiny problem so lazy imports and
    # allocator pools are in the baseline, not in the measurement.
    tiny = Ansatz(MLP((4, 4, 1)))
    tiny_params = tiny.init(key(9), backend)
    tiny_params[0]["W"] @ xp.ones((4, 1), dtype=backend.dtype)

    def points_for(dim):
        def points(k):
            x = backend.normal(k, (batch, dim))
            radius = backend.uniform(fold_in(k, 1), (batch, 1))
            norm = xp.sqrt(rowwise_squared_norm(x))[:, None]  # no (B, d) temporary
            x *= radius / norm  # in place: the batch is the only (B, d) array
            return x

        return points

    def rhs(u, x):
        return u - u**3

    model = Ansatz(MLP((d,) + (width,) * depth + (1,)))
    oracle = SparseLaplacian(num_directions=directions, collapse=True)
    loss = ResidualLoss(model, oracle, rhs, points_for(d))
    engine = SDZE(
        CRNSPerturber(num_queries=queries),
        LowRankSubspace(rank=rank, refresh_every=refresh),
        zo_adam(1e-4),
    )

    backend.reset_peak_memory()
    baseline = current_rss()
    params = model.init(key(0), backend)
    state = engine.init(key(1), params)
    step_times, sample_times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        params, state, info = engine.step(loss, params, state)
        backend.synchronize(params[0]["W"])
        step_times.append(time.perf_counter() - start)
    peak = backend.peak_memory() - baseline
    if not math.isfinite(info.loss):
        raise RuntimeError(f"loss not finite: {info.loss}")

    # Timings with a batch drawn once: the engine step proper, the GEMM, the draw.
    points = points_for(d)
    x = points(key(6))
    fixed = ResidualLoss(model, oracle, rhs, lambda k: x)
    engine_times = []
    for _ in range(max(5, steps // 2)):
        start = time.perf_counter()
        params, state, info = engine.step(fixed, params, state)
        backend.synchronize(params[0]["W"])
        engine_times.append(time.perf_counter() - start)
    W = params[0]["W"]
    backend.synchronize(x @ W.T)
    gemm_times = []
    for _ in range(max(5, steps // 2)):
        start = time.perf_counter()
        backend.synchronize(x @ W.T)
        gemm_times.append(time.perf_counter() - start)
    for t in range(max(3, steps // 4)):
        start = time.perf_counter()
        backend.synchronize(points(fold_in(key(5), t)))
        sample_times.append(time.perf_counter() - start)

    param_bytes = sum(int(math.prod(p[k].shape)) * 4 for p in params for k in ("W", "b"))
    batch_bytes = batch * d * 4
    refresh_steps = [t for t in range(steps) if t > 0 and t % refresh == 0]
    # The first steps touch fresh memory (first-touch page faults, slow in a VM): skip them.
    regular = [s for t, s in enumerate(step_times) if t not in refresh_steps and t >= WARMUP]
    step_s = statistics.median(regular)
    sample_s = statistics.median(sample_times)
    gemm_s = statistics.median(gemm_times)
    engine_s = statistics.median(engine_times)
    return {
        "backend": backend_name,
        "d": d,
        "queries": queries,
        "batch": batch,
        "directions": directions,
        "width": width,
        "depth": depth,
        "rank": rank,
        "refresh_every": refresh,
        "steps": steps,
        "param_bytes": param_bytes,
        "batch_bytes": batch_bytes,
        "peak_bytes": peak,
        "peak_ratio": peak / (param_bytes + batch_bytes),
        "step_s": step_s,
        "step_times_s": step_times,
        "refresh_step_s": [step_times[t] for t in refresh_steps],
        "sample_s": sample_s,
        "engine_s": engine_s,
        "engine_times_s": engine_times,
        "gemm_s": gemm_s,
        "step_over_gemm": step_s / gemm_s,
        "engine_over_gemm": engine_s / gemm_s,
        "final_loss": info.loss,
    }


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for backend in sorted({r["backend"] for r in rows}):
        for q in sorted({r["queries"] for r in rows}):
            sel = sorted(
                (r for r in rows if r["backend"] == backend and r["queries"] == q),
                key=lambda r: r["d"],
            )
            if not sel:
                continue
            ds = [r["d"] for r in sel]
            label = f"{backend}, q={q}"
            ax_mem.plot(ds, [r["peak_ratio"] for r in sel], "o-", label=label)
            ax_time.plot(ds, [r["engine_over_gemm"] for r in sel], "o-", label=label)
    ax_mem.axhline(1.3, color="k", ls="--", lw=0.8, label="target 1.3")
    ax_time.axhline(1.5, color="k", ls="--", lw=0.8, label="target 1.5")
    for ax in (ax_mem, ax_time):
        ax.set_xscale("log")
        ax.set_xlabel("d")
        ax.legend(fontsize=8)
    ax_mem.set_ylabel("peak memory / (params + batch)")
    ax_time.set_ylabel("SDZE step (without point sampling) / first-layer GEMM")
    ax_mem.set_title("Peak memory of a float32 SDZE step")
    ax_time.set_title("Step time in units of one B × d × h GEMM")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["numpy", "torch"])
    parser.add_argument("--dims", nargs="+", type=float, default=[1e4, 1e5, 1e6])
    parser.add_argument("--queries", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--directions", type=int, default=16)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--refresh", type=int, default=5)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "sdze_step.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    config = (args.batch, args.directions, args.width, args.depth, args.rank, args.refresh)
    if args.child:
        row = measure(args.backends[0], int(args.dims[0]), args.queries[0], *config, args.steps)
        print(json.dumps(row))
        return
    rows = []
    for backend in args.backends:
        for d in args.dims:
            for q in args.queries:
                command = [
                    sys.executable, __file__, "--child", "--backends", backend,
                    "--dims", str(d), "--queries", str(q), "--batch", str(args.batch),
                    "--directions", str(args.directions), "--width", str(args.width),
                    "--depth", str(args.depth), "--rank", str(args.rank),
                    "--refresh", str(args.refresh), "--steps", str(args.steps),
                ]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{backend} d={d:g} q={q} failed")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{backend:6s} d={row['d']:>8d} q={q}: peak {row['peak_ratio']:.3f} x "
                    f"(params+batch {(row['param_bytes'] + row['batch_bytes']) / 2**20:.0f} MiB), "
                    f"engine/GEMM {row['engine_over_gemm']:.2f}, step/GEMM "
                    f"{row['step_over_gemm']:.2f} (GEMM {row['gemm_s'] * 1e3:.1f} ms)",
                    flush=True,
                )
    import sdze

    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "sdze": sdze.__version__,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
