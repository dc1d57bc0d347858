"""Tables and a plot of the activity-perturbation study (benchmarks/bench_activity.py).

    python benchmarks/report_activity.py                 # markdown table on stdout
    python benchmarks/report_activity.py --plot          # + benchmarks/results/activity/study.png

For each problem and dimension: final relative L2 error of each method after
the same number of steps, its ratio to first-order's, training time (the
methods ran one after the other in one process, so the ratio of times is a
side-by-side measurement) and time to reach 2x first-order's final error.
"""

from __future__ import annotations

import argparse
import json
import pathlib

RESULTS = pathlib.Path(__file__).parent / "results" / "activity"
ORDER = ["first-order", "activity", "activity-adam", "activity-adafactor-3e-3",
         "activity-adafactor-1e-2", "activity-adam-3e-3", "activity-q2", "activity-b1-0.98",
         "activity-forward", "activity-torch", "activity-jax", "subspace"]


def load(folder: pathlib.Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.json")):
        rows += json.loads(path.read_text())["runs"]
    return rows


def table(rows: list[dict]) -> str:
    out = ["| problem | d | steps | method | final rel. L2 | × first-order | train time (s) "
           "| × first-order's time | time to 2× FO's final (s) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["problem"], r["dim"], r["steps"], r.get("lr") or 0.0), {})[
            r["method"]] = r
    for (problem, dim, steps, lr), runs in sorted(keyed.items()):
        fo = runs.get("first-order")
        for method in sorted(runs, key=lambda m: ORDER.index(m) if m in ORDER else 99):
            r = runs[method]
            ratio = f"{r['final_rel_l2'] / fo['final_rel_l2']:.2f}" if fo else "–"
            tratio = f"{r['train_time'] / fo['train_time']:.1f}" if fo else "–"
            reach = r.get("time_to_2x_first_order")
            out.append(
                f"| {problem} | {dim} | {steps} | {method}{f' (lr {lr:g})' if lr else ''} "
                f"| {r['final_rel_l2']:.2e} | {ratio} "
                f"| {r['train_time']:.0f} | {tratio} | "
                f"{'never' if reach is None else f'{reach:.0f}'} |"
            )
    return "\n".join(out)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keyed = {}
    for r in rows:
        keyed.setdefault((r["problem"], r["dim"]), []).append(r)
    n = len(keyed)
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + 2) // 3)),
                             squeeze=False)
    for ax, ((problem, dim), runs) in zip(axes.flat, sorted(keyed.items()), strict=False):
        for r in sorted(runs, key=lambda r: ORDER.index(r["method"]) if r["method"] in ORDER
                        else 99):
            h = r["history"]
            label = r["method"] + (f" (lr {r['lr']:g})" if r.get("lr") else "")
            if len({run["steps"] for run in runs}) > 1:
                label += f", {r['steps']} steps"
            ax.semilogy([e["step"] for e in h], [e["rel_l2"] for e in h], label=label)
        ax.set_title(f"{problem}, d = {dim}")
        ax.set_xlabel("step")
        ax.set_ylabel("relative L2 error")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args(argv)
    rows = load(args.results)
    print(table(rows))
    if args.plot:
        plot(rows, args.results / "study.png")
        print(f"wrote {args.results / 'study.png'}")


if __name__ == "__main__":
    main()
