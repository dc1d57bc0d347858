"""Inverse problem: recover an unknown diffusivity with first-order and zeroth-order training.

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py

The equation −a Δu = f on the unit ball in d = 5, with the manufactured
u* = (1 − ‖x‖²) sin(w·x), w = (1, …, 1)/√d, and a* = 2, so f = −a* Δu*. The
model knows f, not a: a starts at 0.5 and is fitted (docs/inverse.md) from
the residual Δu + f/a (an exact Laplacian, B = 64 interior points per step)
and 256 noise-free observations of u* (a DataTerm with weight 1000), with a
5-32-32-1 tanh ansatz u = (1 − ‖x‖²) N(x) (float32, same seed for both):

* first-order: FirstOrderAdam (η = 3e-3), ∇_a by the same reverse pass
  (torch);
* zeroth-order: the activity engine's defaults (Adafactor, η = 1e-3), a by
  the CRNS estimate with q = 2 Gaussian perturbations (numpy);

a's optimizer: Adam with η = 0.05 in both. Reports a every ``--every``
steps, the recovered a, |a − a*| / a*, and the rel-L2 error of u on 2000 test
points; writes ``benchmarks/results/inverse.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np

import sdze  # noqa: F401 (registers the built-in backends)
from sdze_core.activity import ActivityPerturbation
from sdze_core.coefficients import TrainCoefficients, uses_coefficients
from sdze_core.domains import Ball
from sdze_core.first_order import FirstOrderAdam
from sdze_core.keys import key
from sdze_core.loss_terms import DataTerm, InteriorTerm, WeightedLoss, domain_points
from sdze_core.models import MLP, Ansatz
from sdze_core.optimizers import zo_adam
from sdze_core.oracles import ExactLaplacian
from sdze_core.registry import make_backend

RESULTS = pathlib.Path(__file__).parent / "results"
D, A_TRUE, A_START = 5, 2.0, 0.5


def manufactured(xp, d=D, a=A_TRUE):
    """(u*, f): Δu* = −2d s − 4 (w·x) cos(w·x) − (1 − ‖x‖²) s with s = sin(w·x), f = −a Δu*."""
    w = 1.0 / math.sqrt(d)

    def exact(x):
        return (1 - xp.sum(x * x, axis=-1)) * xp.sin(w * xp.sum(x, axis=-1))

    def forcing(x):
        t = w * xp.sum(x, axis=-1)
        g = 1 - xp.sum(x * x, axis=-1)
        return -a * (-2 * d * xp.sin(t) - 4 * t * xp.cos(t) - g * xp.sin(t))

    return exact, forcing


def run(backend_name: str, method, steps: int, every: int) -> dict:
    b = make_backend(backend_name)
    exact, f = manufactured(b.xp)
    model = Ansatz(MLP((D, 32, 32, 1)))
    params = model.init(key(0), b)
    observed = Ball().sample(b, key(7), 256, D)
    interior = InteriorTerm(
        ExactLaplacian(),
        uses_coefficients(lambda u, x, c: -f(x) / c["a"]),
        domain_points(Ball(), b, 64, D),
    )
    loss = WeightedLoss(model, (interior, DataTerm(observed, exact(observed), weight=1000.0)))
    trainer = TrainCoefficients(method, {"a": A_START}, zo_adam(0.05))
    state = trainer.init(key(1), params)
    history, start = [], time.perf_counter()
    for t in range(1, steps + 1):
        params, state, info = trainer.step(loss, params, state)
        if t % every == 0 or t == steps:
            a = trainer.coefficients(state)["a"]
            history.append({"step": t, "loss": info.loss, "a": a})
            print(f"  {backend_name} step {t}: loss {info.loss:.3e}, a {a:.4f}", flush=True)
    seconds = time.perf_counter() - start
    x = Ball().sample(b, key(9), 2000, D)
    u, u_star = b.to_host(model.apply(params, x)), b.to_host(exact(x))
    a = trainer.coefficients(state)["a"]
    return {
        "backend": backend_name,
        "steps": steps,
        "a": a,
        "a_rel_error": abs(a - A_TRUE) / A_TRUE,
        "rel_l2": float(np.linalg.norm(u - u_star) / np.linalg.norm(u_star)),
        "seconds": seconds,
        "history": history,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--first-order-backend", default="torch")
    parser.add_argument("--zeroth-order-backend", default="numpy")
    parser.add_argument("--out", default=str(RESULTS / "inverse.json"))
    args = parser.parse_args(argv)
    setting = {
        "equation": "-a Δu = f on the unit ball, u* = (1 - |x|^2) sin(w·x), w = 1/sqrt(d)",
        "d": D, "a_true": A_TRUE, "a_start": A_START, "network": [D, 32, 32, 1],
        "interior_points": 64, "observations": 256, "data_weight": 1000.0,
        "dtype": "float32", "coefficient_optimizer": "Adam, lr 0.05",
    }
    methods = {
        "first_order": (args.first_order_backend, FirstOrderAdam(3e-3)),
        "activity": (args.zeroth_order_backend, ActivityPerturbation()),
    }
    results = {"setting": setting}
    for name, (backend_name, method) in methods.items():
        print(f"{name} ({backend_name}):", flush=True)
        results[name] = run(backend_name, method, args.steps, args.every)
        r = results[name]
        print(f"  a = {r['a']:.4f} (truth {A_TRUE}, rel error {r['a_rel_error']:.2e}), "
              f"rel_l2 {r['rel_l2']:.3e}, {r['seconds']:.0f} s", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
