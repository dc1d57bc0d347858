"""How large the built-in two-body solution is, per dimension: why some instances
need many more steps than others, whatever the method.

On the unit ball the two-body solution is u*(x) = (1 − ‖x‖²) Σ_i c_i φ(x_i, x_{i+1})
with c ~ N(0, I). In high d the coordinates of a point are O(1/√d), so
φ ≈ sin(1) and u* ≈ a (1 − ‖x‖²) with a ≈ sin(1) Σ_i c_i: an amplitude set by
the sum of the coefficients, which fluctuates like √d times a standard normal
from instance to instance. The network must grow its output to |a|; with a
normalised optimizer (Adam, Adafactor) at peak rate η, its output moves by
O(η · width) per step at most, so an instance with a large |a| needs
proportionally more steps, for first-order and zeroth-order training alike.

For each dimension this prints and records the least-squares amplitude a of
u* on (1 − ‖x‖²) over test points, Σc/‖c‖, and the relative L2 norm of what a
radial fit leaves (the part the network must learn beyond the amplitude), and
what a fit on the radial term and the one linear direction of u*/(1 − ‖x‖²),
Σ_i c_i (x_i + x_{i+1}), leaves.

    OMP_NUM_THREADS=1 python benchmarks/diagnose_amplitude.py --points 1000 \\
        --out benchmarks/results/two_body_amplitude.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

import sdze  # noqa: F401  (registers the backends)
from sdze_core.keys import fold_in, key
from sdze_core.problems import make_benchmark
from sdze_core.registry import make_backend


def amplitude(problem: str, dim: int, seed: int, points: int, sampling: str = "volume") -> dict:
    backend = make_backend("numpy", dtype="float64")  # 1 − ‖x‖² ~ 1/d near the sphere
    p = make_benchmark(problem, dim, seed, backend, sampling=sampling)
    x = p.sample_domain(fold_in(key(seed), "amplitude"), points)
    u = np.asarray(p.exact(x), dtype=np.float64)
    xs = np.asarray(x, dtype=np.float64)
    radial = 1.0 - (xs**2).sum(1)
    a = float(u @ radial / (radial @ radial))
    c = np.asarray(p.coefficients, dtype=np.float64)
    # φ(a, b) = sin(1) + cos(1)(a + b) + O(2): the linear part of u*/(1 − ‖x‖²)
    # lies along one direction, Σ_i c_i (x_i + x_{i+1}).
    linear = radial * (xs[:, :-1] @ c + xs[:, 1:] @ c)
    basis = np.stack([radial, linear], axis=1)
    coef, *_ = np.linalg.lstsq(basis, u, rcond=None)
    return {
        "problem": problem,
        "dim": dim,
        "seed": seed,
        "sampling": sampling,
        "amplitude": a,
        "sum_c_over_norm_c": float(c.sum() / np.linalg.norm(c)),
        "radial_remainder_rel_l2": float(np.linalg.norm(u - a * radial) / np.linalg.norm(u)),
        "radial_linear_remainder_rel_l2": float(np.linalg.norm(u - basis @ coef)
                                                / np.linalg.norm(u)),
        "test_points": points,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="allen-cahn-two-body")
    parser.add_argument("--dims", nargs="+", type=int,
                        default=[100, 1000, 10000, 100000, 1000000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sampling", choices=["volume", "radius"], default="volume",
                        help="test points uniform in volume (the default problems') or in "
                             "radius (the STDE preset's)")
    parser.add_argument("--points", type=int, default=500,
                        help="test points (float64; 1000 at d = 10⁶ holds ~16 GB)")
    parser.add_argument("--out", default="benchmarks/results/two_body_amplitude.json")
    args = parser.parse_args(argv)
    rows = []
    for dim, seed in [(d, s) for d in args.dims for s in args.seeds]:
        row = amplitude(args.problem, dim, seed, args.points, args.sampling)
        rows.append(row)
        print(f"d={dim:>8} seed {seed}  amplitude a = {row['amplitude']:9.2f}  Σc/‖c‖ = "
              f"{row['sum_c_over_norm_c']:6.3f}  radial fit leaves "
              f"{row['radial_remainder_rel_l2']:.2e}, radial + linear "
              f"{row['radial_linear_remainder_rel_l2']:.2e}", flush=True)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
