"""Where an activity-perturbation step's time goes, in first-layer GEMMs, at one d.

    OMP_NUM_THREADS=1 python benchmarks/bench_activity_step.py --backend numpy --dim 1000000

The solver's run (Allen–Cahn two-body, defaults, B = 100) and, in the same
process, the median over ``--repeats`` of: one first-layer GEMM x Wᵀ
(B × d × 128); drawing the points; the closed-form forcing; the estimate
(the unperturbed and perturbed forward passes and the factored gradients);
the optimizer's plan and its commit (the streamed update). Writes
``benchmarks/results/activity_step_<backend>_d<d>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

from sdze.solver import SolverConfig, build
from sdze_core.keys import fold_in, key
from sdze_core.problems import sample_ball

RESULTS = pathlib.Path(__file__).parent / "results"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--dim", type=int, default=10**6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run = build(SolverConfig("allen-cahn-two-body", args.dim, backend=args.backend,
                             steps=100, test_points=100))
    b = run.backend
    method = run.method
    params = run.model.init(fold_in(key(0), "params"), b)
    state = method.init(key(0), params)
    params, state, _ = method.step(run.loss, params, state)  # warm-up (and the two-pass step 0)
    phases = {name: [] for name in ("gemm", "points", "forcing", "estimate", "plan", "commit")}

    def timed(name, fn):
        start = time.perf_counter()
        out = fn()
        b.synchronize(*[a for a in (out if isinstance(out, tuple) else (out,))
                        if hasattr(a, "shape")])
        phases[name].append(time.perf_counter() - start)
        return out

    for i in range(args.repeats):
        k = key(100 + i)
        x = timed("points", lambda k=k: sample_ball(b, k, 100, args.dim))
        timed("forcing", lambda x=x: run.problem.forcing(x))
        timed("gemm", lambda x=x, W=params[0]["W"]: x @ W.T)
        del x
        spatial, param = method.step_keys(state)
        grads, _, _ = timed("estimate", lambda s=spatial, p=param, th=params: method.estimate(
            run.loss, th, s, p))
        plan, opt_state = timed("plan", lambda g=grads, th=params, st=state: method.optimizer.plan(
            th, g, st.optimizer, st.step))
        params, opt_state = timed("commit", lambda g=grads, pl=plan, o=opt_state, th=params:
                                  method.optimizer.commit(th, g, pl, o))
        state = state._replace(step=state.step + 1, optimizer=opt_state)
    medians = {name: statistics.median(v) for name, v in phases.items()}
    gemm = medians["gemm"]
    # the estimate draws the points and the forcing itself (loss.sample): count them once
    step = medians["estimate"] + medians["plan"] + medians["commit"]
    row = {
        "backend": args.backend, "dim": args.dim, "seconds": medians, "samples": phases,
        "in_gemms": {name: t / gemm for name, t in medians.items()},
        "step_in_gemms": step / gemm,
        "forward_passes_in_gemms": (medians["estimate"] - medians["points"]
                                    - medians["forcing"]) / gemm,
    }
    out = RESULTS / f"activity_step_{args.backend}_d{args.dim}.json"
    out.write_text(json.dumps(row, indent=1))
    print(json.dumps({k: round(v, 2) for k, v in row["in_gemms"].items()}),
          f"step {row['step_in_gemms']:.1f} GEMMs", f"wrote {out}")


if __name__ == "__main__":
    main()
