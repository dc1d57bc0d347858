"""The closed-form forcing's cost at large d: the two- and three-body sums, per chunk size.

    OMP_NUM_THREADS=1 python benchmarks/bench_forcing.py --dim 1000000

Times :func:`sdze_core.problems.term_sums` (order 2: s, x·∇s and Δs, which the
Laplacian problems' forcing needs) on B = 100 float32 points of dimension d,
NumPy, for several chunk sizes, beside one first-layer GEMM (B × d × 128) of
the same process and, for the two-body sums, beside the formula used until
this benchmark was written (its elementwise operations on the strided views
of the shifted columns). Medians of ``--repeats`` rounds, each of which runs every case once; writes
``benchmarks/results/forcing_d<d>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from functools import partial

import numpy as np

from sdze_core.problems import DEFAULT_CHUNK, ThreeBody, TwoBody, term_sums

RESULTS = pathlib.Path(__file__).parent / "results"


class TwoBodyBefore(TwoBody):
    """The two-body local sums as first written: every operation on strided views."""

    @staticmethod
    def local(block, order):
        xp = np
        a, b = block[:, :-1], block[:, 1:]
        cos_x, sin_x = xp.cos(block), xp.sin(block)
        cos_a, sin_a, cos_b, sin_b = cos_x[:, :-1], sin_x[:, :-1], cos_x[:, 1:], sin_x[:, 1:]
        w = a + cos_b + b * cos_a
        w_a, w_b = 1 - b * sin_a, cos_a - sin_b
        w_aa, w_bb = -b * cos_a, -cos_b
        sin_w, cos_w = xp.sin(w), xp.cos(w)
        return {
            "s": sin_w,
            "x_grad": cos_w * (a * w_a + b * w_b),
            "lap": cos_w * (w_aa + w_bb) - sin_w * (w_a * w_a + w_b * w_b),
        }


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=10**6)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, args.dim), dtype=np.float32)
    x /= np.float32(np.sqrt(args.dim))
    weights = rng.standard_normal((128, args.dim), dtype=np.float32)
    cases = [("two-body", TwoBody), ("two-body (before)", TwoBodyBefore),
             ("three-body", ThreeBody)]
    runs = {}
    for name, solution in cases:
        c = rng.standard_normal(solution.num_terms(args.dim)).astype(np.float32)
        for chunk in args.chunks:
            runs[name, chunk] = partial(term_sums, solution, x, c, 2, chunk)
    # Interleaved: every repeat runs every case once, so that a slow phase of a
    # shared machine (or the first run's page faults) does not favour one case.
    samples = {case: [] for case in runs}
    gemms = []
    for _ in range(args.repeats):
        gemms.append(median_time(lambda: x @ weights.T, 1))
        for case, fn in runs.items():
            samples[case].append(median_time(fn, 1))
    gemm = statistics.median(gemms)
    rows = []
    for (name, chunk), times in samples.items():
        seconds = statistics.median(times)
        rows.append({"solution": name, "chunk": chunk, "seconds": seconds,
                     "in_gemms": seconds / gemm, "samples": times})
        print(f"{name:18s} chunk {chunk:5d}: {seconds:.3f} s = {seconds / gemm:.2f} GEMMs",
              flush=True)
    out = RESULTS / f"forcing_d{args.dim}.json"
    out.write_text(json.dumps({"dim": args.dim, "batch": 100, "gemm_s": gemm, "gemm_samples": gemms,
                               "default_chunk": DEFAULT_CHUNK, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
