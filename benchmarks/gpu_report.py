"""The JSON of the one-command GPU check (``benchmarks/gpu_check.sh``), and its table.

Standard library only: the check calls it before anything is installed, and on a
machine without a GPU (the dry run).

    python benchmarks/gpu_report.py skip --reason R --out DIR/gpu_check.json [--plan CMD ...]
    python benchmarks/gpu_report.py probe                # versions and devices seen, as JSON
    python benchmarks/gpu_report.py summarize --dest DIR --suite torch:RC:SECONDS:CAP ... \\
        [--bench torch:RC:JSON:LOG ...] [--smi FILE] [--probe FILE] [--wheels FILE] \\
        [--started EPOCH] [--caps "total=470 bench=75 suite=360"]
    python benchmarks/gpu_report.py table DIR/gpu_check.json          # Markdown, to stdout
    python benchmarks/gpu_report.py table DIR/gpu_check.json --write docs/conformance.md

``summarize`` reads what the check left in DIR (``pytest_<backend>.xml`` and
``.log``, the benchmark JSON) and writes ``DIR/gpu_check.json``: per backend the
counts of passed, failed, errored and skipped tests, the duration, whether the
time cap stopped it, the failures with their messages and the skip reasons; the
d = 10⁶ benchmark's rows; nvidia-smi's answer and the library versions. ``table``
turns that file into the Markdown that docs/conformance.md shows between the
``gpu-check`` markers (``--write`` replaces that block in place).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

SKIPPED = "skipped: no CUDA device"
GPU_BACKENDS = ("torch", "jax", "cupy")
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
MAX_FAILURES = 40  # failures listed per backend (the counts are always complete)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=False)
    except OSError:
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


# -- skip (the dry run) --------------------------------------------------------------------------
def skip(reason: str, out: Path, plan: list[str]) -> Path:
    """Write the dry run's report; a real run's report already there is kept (the dry run
    then goes beside it, in ``gpu_check_dry_run.json``). Returns the path written."""
    if out.exists() and json.loads(out.read_text()).get("status") == "ran":
        out = out.with_name("gpu_check_dry_run.json")
    report = {
        "status": SKIPPED,
        "reason": reason,
        "date": _now(),
        "commit": _commit(),
        "plan": plan,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


# -- probe ---------------------------------------------------------------------------------------
def probe() -> dict:
    """Versions of what the suites import, and the devices each GPU library sees."""
    from importlib import metadata

    found: dict = {"python": sys.version.split()[0], "packages": {}}
    for name in ("numpy", "pytest", "array-api-compat", "array-api-strict", "hypothesis",
                 "torch", "jax", "jaxlib", "cupy-cuda13x", "cupy-cuda12x", "matplotlib"):
        try:
            found["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    try:
        import torch

        available = torch.cuda.is_available()
        found["torch"] = {"cuda": torch.version.cuda, "cuda_available": available,
                          "device": torch.cuda.get_device_name(0) if available else None}
    except Exception as error:  # any failure is the finding, recorded
        found["torch"] = {"error": repr(error)}
    try:
        import jax

        found["jax"] = {"default_backend": jax.default_backend(),
                        "devices": [str(d) for d in jax.devices()]}
    except Exception as error:
        found["jax"] = {"error": repr(error)}
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"] if count else b""
        found["cupy"] = {"device_count": count, "device": name.decode(errors="replace")}
    except Exception as error:
        found["cupy"] = {"error": repr(error)}
    return found


# -- summarize -----------------------------------------------------------------------------------
def _short(text: str | None, limit: int = 400) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_junit(path: Path) -> dict:
    """Counts, failures and skip reasons from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = Counter()
    failures, skips = [], Counter()
    for suite in suites:
        for case in suite.iter("testcase"):
            name = case.get("name")
            if name is None:  # the test running when an interrupt stopped pytest
                continue
            test = f"{case.get('classname', '')}::{name}"
            failed = case.find("failure")
            errored = case.find("error")
            skipped = case.find("skipped")
            if failed is not None or errored is not None:
                element = failed if failed is not None else errored
                counts["failed" if failed is not None else "errors"] += 1
                failures.append({"test": test, "kind": element.tag,
                                 "message": _short(element.get("message") or element.text)})
            elif skipped is not None:
                counts["skipped"] += 1
                skips[_short(skipped.get("message"), 200)] += 1
            else:
                counts["passed"] += 1
    return {
        "passed": counts["passed"], "failed": counts["failed"], "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failures[:MAX_FAILURES],
        "failures_listed": min(len(failures), MAX_FAILURES),
        "skip_reasons": dict(skips.most_common(15)),
    }


def parse_log(path: Path) -> dict:
    """Counts from pytest's last summary line, when there is no JUnit XML."""
    text = path.read_text(errors="replace") if path.exists() else ""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    if lines:
        for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", lines[-1]):
            counts["errors" if word.startswith("error") else word] = int(number)
    return {**counts, "failures": [], "skip_reasons": {}}


def suite_result(dest: Path, spec: str) -> tuple[str, dict]:
    backend, code, seconds, cap = spec.split(":")
    code = int(code)
    junit, log = dest / f"pytest_{backend}.xml", dest / f"pytest_{backend}.log"
    try:
        counts = parse_junit(junit) if junit.exists() else parse_log(log)
    except ET.ParseError:
        counts = parse_log(log)
    tail = log.read_text(errors="replace").splitlines()[-15:] if log.exists() else []
    timed_out = code in (124, 137)
    if timed_out:
        status = f"stopped at the {cap} s cap"
    elif code == 0:
        status = "passed"
    elif code == 1:
        status = "failures"
    elif code == 5:
        status = "no tests collected"
    else:
        status = f"pytest exit code {code}"
    return backend, {
        "command": f"python3 -m pytest conformance tests --backend {backend} --device cuda",
        "status": status,
        "exit_code": code,
        "timed_out": timed_out,
        "duration_s": float(seconds),
        "cap_s": float(cap),
        **counts,
        "junit": junit.name if junit.exists() else None,
        "log": log.name if log.exists() else None,
        "log_tail": tail,
    }


def summarize(args) -> dict:
    dest = Path(args.dest)
    suites = dict(suite_result(dest, spec) for spec in args.suite)
    rows, runs = [], []
    for spec in args.bench:
        backend, code, path, log = spec.split(":", 3)
        path, log = Path(path), Path(log)
        run = {"backend": backend, "exit_code": int(code), "timed_out": code in ("124", "137")}
        if path.exists():
            data = json.loads(path.read_text())
            run["meta"] = data.get("meta")
            rows.extend(data.get("rows", []))
        run["log_tail"] = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        runs.append(run)
    report = {
        "status": "ran",
        "date": _now(),
        "commit": _commit(),
        "duration_s": None,
        "nvidia_smi": Path(args.smi).read_text().strip() if args.smi else None,
        "environment": json.loads(Path(args.probe).read_text()) if args.probe else None,
        "wheels": Path(args.wheels).read_text().strip().splitlines() if args.wheels else None,
        "suites": suites,
        "caps_s": dict(part.split("=") for part in args.caps.split()) if args.caps else None,
        "benchmark": {"runs": runs, "rows": rows},
    }
    if args.started:
        report["duration_s"] = round(_dt.datetime.now().timestamp() - float(args.started), 1)
    if rows:
        (dest / "bench_d1e6.json").write_text(
            json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
    (dest / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# -- table ---------------------------------------------------------------------------------------
def _gpu_name(report: dict) -> str:
    smi = report.get("nvidia_smi") or ""
    match = re.search(r"GPU \d+: ([^(\n]+)", smi)
    return match.group(1).strip() if match else "a CUDA device"


def table(report: dict) -> str:
    """The Markdown block docs/conformance.md shows for the latest GPU check."""
    if report.get("status") != "ran":
        return "\n".join([
            f"Not yet run on a GPU. Latest dry run: {report.get('date', '?')} (commit "
            f"`{report.get('commit', 'unknown')[:12]}`), {report.get('status')}: "
            f"{report.get('reason', '').rstrip('.')}.",
            "",
            "| backend (CUDA) | conformance + tests | d = 10⁶ step |",
            "| --- | --- | --- |",
            *(f"| {b} | not yet run on GPU | not yet run on GPU |" for b in GPU_BACKENDS),
        ])
    lines = [
        f"Run on {_gpu_name(report)}, {report.get('date', '?')} (commit "
        f"`{report.get('commit', 'unknown')[:12]}`), {report.get('duration_s')} s in all.",
        "",
        "| backend (CUDA) | status | passed | failed | errors | skipped | time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, suite in report.get("suites", {}).items():
        lines.append(f"| {name} | {suite['status']} | {suite['passed']} | {suite['failed']} | "
                     f"{suite['errors']} | {suite['skipped']} | {suite['duration_s']:.0f} |")
    rows = report.get("benchmark", {}).get("rows", [])
    if rows:
        lines += ["", "| backend | method | d | step (ms) | peak memory (GiB) | "
                  "peak / (params + batch) |", "| --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            if row.get("status") == "ok":
                lines.append(f"| {row['backend']} | {row['method']} | {row['d']:.0e} | "
                             f"{row['step_s'] * 1e3:.1f} | {row['peak_bytes'] / 2**30:.2f} | "
                             f"{row['peak_ratio']:.2f} |")
            else:
                lines.append(f"| {row['backend']} | {row['method']} | {row['d']:.0e} | "
                             f"{_short(row.get('status'), 80)} | | |")
    return "\n".join(lines)


def write_block(doc: Path, block: str) -> None:
    text = doc.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} block")
    doc.write_text(text[: start + len(BEGIN)] + "\n" + block + "\n" + text[end:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("skip")
    p.add_argument("--reason", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--plan", nargs="*", default=[])
    commands.add_parser("probe")
    p = commands.add_parser("summarize")
    p.add_argument("--dest", required=True)
    p.add_argument("--suite", action="append", default=[], help="BACKEND:RC:SECONDS:CAP")
    p.add_argument("--bench", action="append", default=[], help="BACKEND:RC:JSON:LOG")
    p.add_argument("--caps", help='"total=470 bench=75 suite=360"')
    p.add_argument("--smi")
    p.add_argument("--probe")
    p.add_argument("--wheels")
    p.add_argument("--started")
    p = commands.add_parser("table")
    p.add_argument("report", type=Path)
    p.add_argument("--write", type=Path, help="replace the gpu-check block of this Markdown file")
    args = parser.parse_args(argv)
    if args.command == "skip":
        print(f"gpu_check: wrote {skip(args.reason, args.out, args.plan)}")
    elif args.command == "probe":
        print(json.dumps(probe(), indent=1))
    elif args.command == "summarize":
        summarize(args)
    else:
        block = table(json.loads(args.report.read_text()))
        if args.write:
            write_block(args.write, block)
        else:
            print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
