"""Portable (Threefry in array-API integer ops) against native draws, per backend.

For each installed CPU backend and draw size n, times the median of several
repetitions of ``normal`` and ``uniform`` in both rng modes and of
``random_bits``, side by side in one process, and writes
``benchmarks/results/random_draws.json`` with the portable/native ratios.

    python benchmarks/bench_random.py [--sizes 1e4 1e6] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import sdze


def median_seconds(backend, method: str, key, size: int, repeats: int) -> float:
    """Median wall time of ``backend.method(key, (size,))`` after one warm-up."""
    draw = getattr(backend, method)
    backend.synchronize(draw(key, (size,)))  # warm-up (and compile, on jax)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.synchronize(draw(key, (size,)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, size: int, repeats: int) -> dict:
    native = sdze.use(name).backend.with_config(rng="native")
    portable = native.with_config(rng="portable")
    key = sdze.key(size)
    row = {"backend": name, "n": size, "dtype": "float32"}
    for draw in ("normal", "uniform"):
        t_native = median_seconds(native, draw, key, size, repeats)
        t_portable = median_seconds(portable, draw, key, size, repeats)
        row[f"{draw}_native_s"] = t_native
        row[f"{draw}_portable_s"] = t_portable
        row[f"{draw}_portable_over_native"] = t_portable / t_native
    row["bits_s"] = median_seconds(portable, "random_bits", key, size, repeats)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e6])
    parser.add_argument("--repeats", type=int, default=7)
    default_out = Path(__file__).parent / "results" / "random_draws.json"
    parser.add_argument("--out", default=str(default_out))
    args = parser.parse_args()

    rows = []
    for name in [n for n, status in sdze.available_backends().items() if status == "ok"]:
        for size in map(int, args.sizes):
            row = measure(name, size, args.repeats)
            rows.append(row)
            print(
                f"{name:>17} n={size:>8}  portable/native: "
                f"normal {row['normal_portable_over_native']:6.2f}, "
                f"uniform {row['uniform_portable_over_native']:6.2f}"
            )
    result = {
        "benchmark": "random_draws",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "sdze": sdze.__version__,
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
