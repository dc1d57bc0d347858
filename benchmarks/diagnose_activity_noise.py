"""Why activity-perturbation training stops short of first-order: the estimator's noise.

Two measurements on the generalisation suite's poisson-sine problem (d = 100,
width 128, depth 4, B = 100 points, V = 16 collapsed Laplacian directions),
PyTorch, float64 for the moments and float32 for training:

1. **Second moment per point.** For single points b (B = 1), over ``--draws``
   independent ζ, E‖Ĝ_b‖² / ‖G_b‖² per layer, against m·K, the number of
   perturbed pre-activation coefficients of the layer (m neurons × K jet
   slots). For Gaussian ζ the ratio is ≈ m·K + 2 whatever the problem
   (E[(aᵀζ)² ‖Mζ‖²] with M = I_m ⊗ X_b), so the noise is set by the network's
   width and the operator's jet, not by d or P. And at B = 100: the relative
   noise of one step's estimate, ‖Ĝ − G‖ / ‖G‖ (RMS over the draws), per layer.

2. **Noise injection.** The exact (autodiff) gradient of the same loss, driven
   through the same optimizer (activity Adafactor, 1e-3 linear decay, 1000
   steps), with isotropic Gaussian noise of relative size ρ added to every
   weight matrix's gradient (‖noise‖ ≈ ρ‖G‖; biases exact), ρ ∈ ``--rho``.
   ρ = 0 is first-order training with Adafactor. If the injected noise at the
   measured ρ reproduces the activity run's curve (benchmarks/results/activity/
   poisson-sine-d100.json), the noise, not a bias or the optimizer, is what
   limits it.

Writes ``benchmarks/results/activity_noise.json`` and ``activity_noise.png``.

    python benchmarks/diagnose_activity_noise.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_activity  # noqa: E402
from generalisation import GeneralisationProblem  # noqa: E402

import sdze  # noqa: E402, F401  (registers the backends)
from sdze_core.activity import (  # noqa: E402
    ActivityPerturbation,
    LayerGradient,
    activity_adafactor,
)
from sdze_core.keys import fold_in, key  # noqa: E402
from sdze_core.optimizers import linear_decay  # noqa: E402
from sdze_core.registry import backend_of, make_backend  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
PROBLEM, DIM = "poisson-sine", 100


def perturbed_slots(problem) -> list[int]:
    """K per layer: the pre-activation jet slots the engine perturbs (from one call)."""
    backend = problem.backend
    loss = problem.loss(batch_size=1)
    params = loss.model.init(fold_in(key(0), "params"), backend)
    engine = ActivityPerturbation()
    scales, _ = engine._scales(params)
    from sdze_core.activity import _per_point_losses, _perturbed_model

    layers = tuple(range(len(params)))
    model = _perturbed_model(loss.model, (key(1), scales, layers))
    _per_point_losses(loss, params, loss.sample(key(2)), model)
    call = model.network.calls[0]
    slots = []
    for shapes in call.zeta_shapes:
        slots.append(sum(math.prod(s[:-2]) if len(s) > 2 else 1 for s in shapes if s is not None))
    return slots


def second_moments(draws: int, points: int) -> dict:
    backend = make_backend("torch", dtype="float64")
    problem = GeneralisationProblem(PROBLEM, DIM, backend, 0)
    engine = ActivityPerturbation()
    slots = perturbed_slots(problem)
    out = {"slots_per_neuron": slots, "per_point": [], "batch": {}}
    widths = None
    for batch in (1, 100):
        loss = problem.loss(batch_size=batch)
        params = loss.model.init(fold_in(key(0), "params"), backend)
        widths = [int(p["W"].shape[0]) for p in params]
        for point in range(points if batch == 1 else 1):
            spatial = key(100 + point)
            xi = loss.sample(spatial)
            _, grads = backend.value_and_grad(loss)(params, xi)
            exact = [g["W"] for g in grads]
            second = [0.0] * len(params)
            error = [0.0] * len(params)
            for i in range(draws):
                estimate, _, _ = engine.estimate(loss, params, spatial, fold_in(key(7), i))
                for layer, g in enumerate(estimate):
                    G = g.dense()
                    second[layer] += float((G * G).sum()) / draws
                    error[layer] += float(((G - exact[layer]) ** 2).sum()) / draws
            norms = [float((G * G).sum()) for G in exact]
            if batch == 1:
                out["per_point"].append([s / n for s, n in zip(second, norms, strict=True)])
            else:
                out["batch"] = {
                    "B": batch,
                    "relative_noise": [
                        math.sqrt(e / n) for e, n in zip(error, norms, strict=True)
                    ],
                }
    out["m_times_K"] = [m * k for m, k in zip(widths, slots, strict=True)]
    return out


@dataclass(frozen=True)
class NoisyExactGradient(ActivityPerturbation):
    """The activity engine's optimizer driven by the autodiff gradient plus noise:
    Ĝ = G + ρ (‖G‖ / √(mn)) Z, Z ~ N(0, I) (seeded per step), biases exact."""

    rho: float = 0.0

    def estimate(self, loss, params, spatial_key, param_key):
        backend = backend_of(params[0]["W"])
        xp = backend.xp
        xi = loss.sample(spatial_key)
        value, grads = backend.value_and_grad(loss)(params, xi)
        out = []
        for layer, g in enumerate(grads):
            W = g["W"]
            if self.rho:
                z = backend.normal(fold_in(param_key, layer), tuple(W.shape), dtype=W.dtype)
                scale = float(xp.linalg.vector_norm(W)) / math.sqrt(math.prod(W.shape))
                W = W + (self.rho * scale) * z
            eye = xp.eye(W.shape[1], dtype=W.dtype)
            out.append(LayerGradient([xp.matrix_transpose(W)], [eye], g["b"]))
        return out, value, None


def injection(rhos, steps: int) -> list[dict]:
    runs = []
    for rho in rhos:
        name = f"exact+noise{rho:g}"
        bench_activity.VARIANTS[name] = (
            "torch",
            lambda s, rho=rho: NoisyExactGradient(activity_adafactor(linear_decay(1e-3, s)),
                                                  rho=rho),
        )
        record = bench_activity.run_one(PROBLEM, DIM, name, steps)
        record["rho"] = rho
        print(f"rho = {rho:g}: final rel. L2 {record['final_rel_l2']:.3e}", flush=True)
        runs.append(record)
    return runs


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in result["injection"]:
        h = run["history"]
        ax.semilogy([r["step"] for r in h], [r["rel_l2"] for r in h],
                    label=f"exact gradient + noise ρ = {run['rho']:g}")
    for run in result.get("reference_runs", []):
        h = run["history"]
        ax.semilogy([r["step"] for r in h], [r["rel_l2"] for r in h], "k--" if
                    run["method"] == "activity" else "k:", label=f"{run['method']} (study)")
    ax.set_xlabel("step")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{PROBLEM}, d = {DIM}: activity's curve is the noisy gradient's")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--points", type=int, default=3)
    parser.add_argument("--rho", type=float, nargs="+", default=[0, 3, 10, 30])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS / "activity_noise.json"))
    args = parser.parse_args(argv)
    result = {"problem": PROBLEM, "dim": DIM, "command": " ".join(sys.argv)}
    result["moments"] = second_moments(args.draws, args.points)
    print(json.dumps(result["moments"], indent=1), flush=True)
    result["injection"] = injection(args.rho, args.steps)
    study = RESULTS / "activity" / f"{PROBLEM}-d{DIM}.json"
    if study.exists():
        runs = json.loads(study.read_text())["runs"]
        wanted = ("activity", "first-order")
        result["reference_runs"] = [
            r for r in runs if r["method"] in wanted and r["steps"] == args.steps
        ]
    out = pathlib.Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    docs = pathlib.Path(__file__).parent.parent / "docs" / "img"
    if docs.is_dir() and out.parent == RESULTS:
        plot(result, docs / "activity_noise.png")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
