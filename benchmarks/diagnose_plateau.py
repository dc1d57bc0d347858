"""Why zeroth-order training stalled at the 2.3 % plateau (Allen–Cahn two-body, d = 1000).

At the plateau (after 600 first-order Adam steps, which reach it like SDZE
does) this script measures, per layer l, over 60 independent steps' samples ξ:

* the mean gradient ‖E ∇_W ℓ‖ and the RMS of its per-sample fluctuation;
* the same projected on a random rank-8 subspace as SDZE sees it,
  c Uᵀ ∇_W V with c = √(mn) / 8 (what one query's g_i sums over);
* the bias gradients' mean and fluctuation.

and, for the first layer, what the missing part of the solution is: the
least-squares affine fit of N* − N on fresh points (N = u / (1 − ‖x‖²)), the
direction w the first layer must learn, and how much of w a random rank-8
input basis holds against the residual-weighted input mean h = (1/B) Σ_b r_b x_b.

Writes ``benchmarks/results/plateau.json``.

    python benchmarks/diagnose_plateau.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    import torch

    from sdze.solver import SolverConfig, build
    from sdze_core.keys import fold_in, key

    d, samples = 1000, 60
    config = SolverConfig("allen-cahn-two-body", d, method="first-order", backend="torch",
                          steps=600, adam_b2=0.999, schedule="constant", test_points=200)
    run = build(config)
    params = run.model.init(fold_in(key(0), "params"), run.backend)
    state = run.method.init(key(0), params)
    for _ in range(config.steps):
        params, state, info = run.method.step(run.loss, params, state)

    value_and_grad = run.backend.value_and_grad(run.loss)
    grads, xs, rs = [], [], []
    for i in range(samples):
        xi = run.loss.sample(fold_in(key(77), i))
        _, g = value_and_grad(params, xi)
        grads.append([{k: a.clone() for k, a in layer.items()} for layer in g])
        (r,) = run.loss.residuals(params, xi)
        xs.append(xi.x)
        rs.append(r.detach())
    mean = [{k: sum(g[i][k] for g in grads) / samples for k in grads[0][i]}
            for i in range(len(params))]
    generator = torch.Generator().manual_seed(1)
    layers = []
    for i, p in enumerate(params):
        m, n = p["W"].shape
        r = min(8, m, n)
        U = torch.linalg.qr(torch.randn(m, r, generator=generator))[0]
        V = torch.linalg.qr(torch.randn(n, r, generator=generator))[0]
        c = math.sqrt(m * n) / r

        def rms(values):
            return float(torch.stack(values).pow(2).mean().sqrt())

        layers.append({
            "layer": i, "shape": [m, n],
            "mean_grad_W": float(mean[i]["W"].norm()),
            "fluctuation_W": rms([(g[i]["W"] - mean[i]["W"]).norm() for g in grads]),
            "projected_mean_W": float((c * U.T @ mean[i]["W"] @ V).norm()),
            "projected_fluctuation_W": rms([(c * U.T @ (g[i]["W"] - mean[i]["W"]) @ V).norm()
                                            for g in grads]),
            "mean_grad_b": float(mean[i]["b"].norm()),
            "fluctuation_b": rms([(g[i]["b"] - mean[i]["b"]).norm() for g in grads]),
        })

    # The missing part: N* − N on fresh points, and its affine fit.
    x = run.problem.sample_domain(fold_in(key(1), "fit"), 3000)
    with torch.no_grad():
        g = 1 - (x * x).sum(1)
        missing = ((run.problem.exact(x) - run.model.apply(params, x)) / g).numpy()
        target = (run.problem.exact(x) / g).numpy()
    X = np.c_[np.ones(len(missing)), x.numpy()]
    coef, *_ = np.linalg.lstsq(X, missing, rcond=None)
    affine_residual = missing - X @ coef
    w = coef[1:] / np.linalg.norm(coef[1:])
    random_V = np.linalg.qr(np.random.default_rng(2).standard_normal((d, 8)))[0]
    h = sum((r.numpy() @ xb.numpy()) / len(r) for r, xb in zip(rs, xs, strict=True))
    result = {
        "problem": "allen-cahn-two-body", "d": d, "plateau_steps": config.steps,
        "samples": samples, "loss_at_plateau": info.loss,
        "layers": layers,
        "missing_part": {
            "rms_N_star": float(target.std()),
            "rms_missing": float(missing.std()),
            "rms_missing_after_affine_fit": float(affine_residual.std()),
            "norm_of_linear_part": float(np.linalg.norm(coef[1:])),
        },
        "w_in_random_rank8_basis": float(np.linalg.norm(random_V.T @ w)),
        "cos_h_w": float(abs(h @ w) / np.linalg.norm(h)),
        "command": "python benchmarks/diagnose_plateau.py",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "plateau.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
