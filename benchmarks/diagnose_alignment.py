"""How fast the residual-aligned basis finds the first layer's direction (diagnostic).

Trains SDZE with the solver's defaults (plus the JSON settings given) on
Allen–Cahn two-body and prints, every 250 steps: the step's loss, cos(h, w)
between the running residual-weighted input mean h and the direction w the
first layer must learn (w_j = c_j + c_{j−1}, the linear part of
u*/(1 − ‖x‖²) near the sphere, up to the factor cos 1), |Vᵀŵ| for the first
layer's current input basis V, the RMS over the first layer's rows of their
component along ŵ, and the relative L2 error on 200 test points.

    python benchmarks/diagnose_alignment.py '{"dim": 10000, "steps": 3000, "input_memory": 2.0}'

``benchmarks/results/alignment_d1e4.log`` is the output of that command
(input_memory 2.0 is now the default), stopped after step 2500.
"""
import json
import sys

import numpy as np

from sdze.solver import SolverConfig, build
from sdze_core.keys import fold_in, key

kw = json.loads(sys.argv[1])
dim = kw.pop("dim", 1000)
kw.setdefault("perturbation", "subspace")  # the residual-aligned basis is the subspace's
cfg = SolverConfig("allen-cahn-two-body", dim, test_points=200, **kw)
run = build(cfg)
params = run.model.init(fold_in(key(0), "params"), run.backend)
state = run.method.init(key(0), params)
c = np.asarray(run.problem.coefficients)
w = np.zeros(dim)
w[:-1] += c
w[1:] += c
for t in range(cfg.steps):
    params, state, info = run.method.step(run.loss, params, state)
    if t % 250 == 249:
        h = state.sampler.inputs
        V0 = state.sampler.bases[0][1]
        _, merged = run.method.merge(params, state)
        W1 = merged[0]["W"]
        current = run.method.evaluation_model(run.model, params, state)
        err = run.test.errors(current, params)["rel_l2"]
        cos = h @ w / np.linalg.norm(h) / np.linalg.norm(w)
        print(t + 1, f"loss {info.loss:.3e} cos(h,w) {cos:.3f}"
              f"  |V0^T w|/|w| {np.linalg.norm(V0.T @ w) / np.linalg.norm(w):.3f}"
              f"  W1 w-comp rms {np.sqrt(np.mean((W1 @ w / np.linalg.norm(w)) ** 2)):.3f}"
              f" err {err:.4f}", flush=True)
