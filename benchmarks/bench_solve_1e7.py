"""A 10^7-dimensional Allen–Cahn two-body run of ``sdze solve`` on the CPU, with its memory.

The solver's own code path (problem, forcing, oracle, SDZE engine, test
errors, atomic checkpoint), in a child process, at d = 10^7 in float32 with
STDE's network (4 hidden tanh layers of width 128: 1.28·10^9 parameters,
5.1 GB) and batch (100 points: 4.0 GB). Recorded:

* ``peak_rss_bytes``: the child's peak resident memory (``ru_maxrss``),
  over imports, parameter initialisation, the steps, the test evaluation and
  the checkpoint write; ``peak_over_params_batch`` = peak / (parameter +
  batch bytes);
* ``median_step_s`` (a step: drawing the batch of 10^9 normals, the
  forcing, the oracle, 2q perturbed evaluations, the update),
  ``solve_wall_s`` and ``it_per_s`` (evaluation and checkpoint included),
  the metrics the solver wrote (loss, errors) and the checkpoint's size
  (the checkpoint is deleted afterwards unless ``--keep``).

How it fits (docs/method.md#crns, #subspace-perturbations): the parameters are the only P-sized
arrays (no gradient, no moments: ZO-Adam's state is r × r per layer); the
batch is the only (B × d) array: it is rescaled into the ball in place, its
‖x‖² is a batched matmul, the forcing is accumulated over blocks of 2^16
columns, the first layer's x Wᵀ and Vᵀx are computed once for all 2q
perturbed evaluations and the coordinate jets gather W[:, j]; the test
points are drawn one at a time (2^24 numbers per block) and evaluated in
groups of 2^28 numbers.

    python benchmarks/bench_solve_1e7.py                 # d = 1e7, 3 steps
    python benchmarks/bench_solve_1e7.py --dim 1e6 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(args) -> None:
    import sdze

    t0 = time.perf_counter()
    result = sdze.solve(
        "allen-cahn-two-body",
        args.dim,
        steps=args.steps,
        eval_every=args.steps,
        test_points=args.test_points,
        num_queries=args.queries,
        perturbation="subspace",  # results/solve_1e7.json measured the subspace estimator
        out=args.out,
        quiet=True,
    )
    wall = time.perf_counter() - t0
    ckpt = Path(args.out) / "checkpoint.npz"
    print(json.dumps({"wall_s": wall, "metrics": result.metrics,
                      "checkpoint_bytes": ckpt.stat().st_size}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=float, default=1e7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--queries", type=int, default=4)
    parser.add_argument("--test-points", type=int, default=26)
    parser.add_argument("--out", help="run folder (default: a temporary folder, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the 5 GB checkpoint")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dim = int(args.dim)
    if args.child:
        child(args)
        return

    out = args.out or tempfile.mkdtemp(prefix="sdze-1e7-")
    command = [sys.executable, __file__, "--child", "--dim", str(args.dim), "--steps",
               str(args.steps), "--queries", str(args.queries), "--test-points",
               str(args.test_points), "--out", out]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if done.returncode != 0:
        sys.exit(f"the run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    d, h, depth, batch = args.dim, 128, 4, 100
    params = d * h + h + (depth - 1) * (h * h + h) + h + 1
    param_bytes, batch_bytes = 4 * params, 4 * batch * d
    m = report["metrics"]
    record = {
        "problem": "allen-cahn-two-body",
        "dim": d,
        "steps": args.steps,
        "num_queries": args.queries,
        "parameters": params,
        "param_bytes": param_bytes,
        "batch_bytes": batch_bytes,
        "peak_rss_bytes": peak,
        "peak_over_params_batch": peak / (param_bytes + batch_bytes),
        "machine_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "process_wall_s": total,
        "solve_wall_s": report["wall_s"],
        "train_wall_s": m["wall_time_this_run"],
        "it_per_s": m["it_per_s"],
        "median_step_s": m["median_step_s"],
        "history": m["history"],
        "rel_l2": m["rel_l2"],
        "test_points": args.test_points,
        "checkpoint_bytes": report["checkpoint_bytes"],
        "status": m["status"],
        "versions": m["versions"],
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    if not args.keep:
        for name in ("checkpoint.npz", "metrics.json", "loss.png", "error.png"):
            Path(out, name).unlink(missing_ok=True)
    RESULTS.mkdir(exist_ok=True)
    name = "solve_1e7.json" if d == 10**7 else f"solve_d{d}.json"
    (RESULTS / name).write_text(json.dumps(record, indent=2))
    gib = 2**30
    print(f"d = {d:.0e}: {args.steps} steps, median {m['median_step_s']:.1f} s/step, peak "
          f"{peak / gib:.1f} GiB = {record['peak_over_params_batch']:.2f} x (params "
          f"{param_bytes / gib:.1f} GiB + batch {batch_bytes / gib:.1f} GiB); "
          f"rel-L2 {m['rel_l2']:.3f}; wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
