"""Markdown tables from the JSON results (the tables of docs/benchmarks.md).

    python benchmarks/report.py sweep benchmarks/results/sweep.json
    python benchmarks/report.py convergence benchmarks/results/convergence_main.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def sweep(rows: list) -> str:
    rows = [r for r in rows if not r["status"].startswith("not applicable")]
    dims = sorted({r["d"] for r in rows})
    keys = sorted({(r["backend"], r["method"]) for r in rows},
                  key=lambda k: (["numpy", "torch", "jax", "cupy"].index(k[0])
                                 if k[0] in ("numpy", "torch", "jax", "cupy") else 9, k[1]))
    out = []
    for title, cell in [
        ("step time (ms) / first-layer GEMMs", lambda r: f"{r['step_s'] * 1e3:.3g} / "
                                                         f"{r['step_over_gemm']:.0f}"),
        ("peak memory / (params + batch)", lambda r: f"{_fmt_bytes(r['peak_bytes'])} / "
                                                     f"{r['peak_ratio']:.2f}"),
    ]:
        out.append(f"**{title}**\n")
        out.append("| backend | method | " + " | ".join(f"d = {d:.0e}" for d in dims) + " |")
        out.append("| --- | --- | " + " | ".join("---" for _ in dims) + " |")
        for backend, method in keys:
            cells = []
            for d in dims:
                match = [r for r in rows if (r["backend"], r["method"], r["d"]) ==
                         (backend, method, d)]
                if not match:
                    cells.append("")
                elif match[0]["status"] == "ok":
                    cells.append(cell(match[0]))
                else:
                    status = match[0]["status"]
                    cells.append("n/a (no autodiff)" if status.startswith("not applicable")
                                 else status.split(":")[0])
            out.append(f"| {backend} | {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def convergence(rows: list) -> str:
    out = ["| problem | d | method | it/s | rel-L2 final | best | train time (s) | "
           "time to 1e-2 (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        best = min(h["rel_l2"] for h in r["history"])
        to = r.get("time_to_1e-2_s")
        out.append(f"| {r['problem']} | {r['dim']:g} | {r['label']} | {r['it_per_s']:.1f} | "
                   f"{r['rel_l2']:.2e} | {best:.2e} | {r['train_s']:.0f} | "
                   f"{'—' if to is None else f'{to:.0f}'} |")
    return "\n".join(out)


def main() -> None:
    kind, path = sys.argv[1], Path(sys.argv[2])
    rows = json.loads(path.read_text())["rows"]
    print(sweep(rows) if kind == "sweep" else convergence(rows))


if __name__ == "__main__":
    main()
