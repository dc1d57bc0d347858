"""The one-command GPU check (benchmarks/gpu_check.sh): its dry run, its JSON and its table.

CI has no CUDA device, so the check itself cannot run here; what can is run:

* the dry run, with a stand-in ``nvidia-smi`` that fails as it does on a machine without a
  driver (and with no ``nvidia-smi`` at all): exit 0, the reason printed, a JSON that says
  "skipped: no CUDA device" and lists the commands a GPU machine runs;
* ``gpu_report.py summarize`` on the files a run leaves (JUnit XML, a pytest log cut short by
  the time cap, a benchmark JSON), and ``table`` on the result;
* the block of docs/conformance.md is the table of the committed report (or says the check
  has not run on a GPU, when there is none).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "gpu_check.sh"
REPORT = ROOT / "benchmarks" / "gpu_report.py"
COMMITTED = ROOT / "benchmarks" / "results" / "gpu" / "gpu_check.json"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the check is a bash script")


def fake_bin(tmp_path: Path, nvidia_smi: str | None) -> Path:
    """A folder to put first on PATH, holding a stand-in nvidia-smi (or one that hides it)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    if nvidia_smi is not None:
        tool = folder / "nvidia-smi"
        tool.write_text(nvidia_smi)
        tool.chmod(0o755)
    return folder


def run_check(tmp_path: Path, path: str, **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": path, "OUT": str(tmp_path / "out"),
               "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, env=environ,
                          timeout=120, cwd=tmp_path)


def report(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], capture_output=True, text=True,
                          check=True, timeout=60)


NO_DRIVER = """#!/bin/sh
echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2
exit 9
"""


def test_dry_run_without_a_driver_skips_saying_why(tmp_path):
    bin_dir = fake_bin(tmp_path, NO_DRIVER)
    done = run_check(tmp_path, f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert "skipped: no CUDA device" in done.stdout
    assert "couldn't communicate with the NVIDIA driver" in done.stdout
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert written["status"] == "skipped: no CUDA device"
    assert written["reason"].startswith("nvidia-smi -L failed")
    plan = written["plan"]
    for backend in ("torch", "jax", "cupy"):
        assert f"python3 -m pytest conformance tests --backend {backend} --device cuda" in plan
        assert any(f"--backends {backend} " in c and "--dims 1e6 --device cuda" in c
                   for c in plan)
    # Nothing else is run or written on the way.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json"]


def test_dry_run_without_nvidia_smi(tmp_path):
    # PATH holds only what the script needs (bash, coreutils, grep), not nvidia-smi.
    tools = fake_bin(tmp_path, None)
    for name in ("bash", "dirname", "grep", "head", "date", "mkdir"):
        found = shutil.which(name)
        assert found is not None
        (tools / name).symlink_to(found)
    done = run_check(tmp_path, str(tools))
    assert done.returncode == 0, done.stderr
    assert "nvidia-smi is not on PATH" in done.stdout
    written = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert written["status"] == "skipped: no CUDA device"


def test_dry_run_keeps_a_real_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu_check.json").write_text(json.dumps({"status": "ran", "suites": {}}))
    done = run_check(tmp_path, f"{fake_bin(tmp_path, NO_DRIVER)}{os.pathsep}{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "gpu_check.json").read_text())["status"] == "ran"
    dry = json.loads((out / "gpu_check_dry_run.json").read_text())
    assert dry["status"] == "skipped: no CUDA device"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1"
 failures="1" skipped="2" tests="6" time="12.5">
<testcase classname="conformance.test_jets_match_autodiff" name="test_a[torch]" time="0.1"/>
<testcase classname="conformance.test_jets_match_autodiff" name="test_b[torch]" time="0.1"/>
<testcase classname="tests.test_engine" name="test_c[torch]" time="0.1">
  <failure message="AssertionError: 1e-3 &gt; 1e-4">trace</failure></testcase>
<testcase classname="tests.test_engine" name="test_d[torch]" time="0.1">
  <error message="RuntimeError: CUDA out of memory">trace</error></testcase>
<testcase classname="tests.test_cli" name="test_e" time="0.0">
  <skipped type="pytest.skip" message="no display">skip</skipped></testcase>
<testcase classname="tests.test_cli" name="test_f" time="0.0">
  <skipped type="pytest.skip" message="no display">skip</skipped></testcase>
<testcase time="0.000"/>
</testsuite></testsuites>
"""


def fake_run(dest: Path, work: Path) -> list[str]:
    """What a run on a GPU leaves: torch with a JUnit report, jax stopped at its cap with only
    a log, cupy's benchmark timed out; returns summarize's arguments."""
    dest.mkdir()
    work.mkdir()
    (dest / "pytest_torch.xml").write_text(JUNIT)
    (dest / "pytest_torch.log").write_text("..F.E\n2 passed, 1 failed, 2 skipped, 1 error\n")
    (dest / "pytest_jax.log").write_text("....\n!!! KeyboardInterrupt !!!\n40 passed, 3 skipped "
                                         "in 200.1s\n")
    rows = [{"backend": "torch", "method": "sdze", "d": 1000000, "status": "ok", "step_s": 0.0123,
             "peak_bytes": 2 * 2**30, "peak_ratio": 1.05},
            {"backend": "torch", "method": "first-order", "d": 1000000,
             "status": "timed out after 30 s"}]
    (work / "bench_torch.json").write_text(json.dumps({"meta": {"sdze": "x"}, "rows": rows}))
    (work / "bench_torch.log").write_text("wrote it\n")
    (work / "bench_cupy.log").write_text("")
    (work / "smi.txt").write_text("GPU 0: NVIDIA H200 (UUID: GPU-1)\nname, driver_version\n")
    (work / "probe.json").write_text(json.dumps({"python": "3.12.3"}))
    (work / "wheels.txt").write_text("installed from .whl/: array_api_compat.whl\n")
    return ["summarize", "--dest", str(dest),
            "--suite", "torch:1:61:200", "--suite", "jax:124:221:200",
            "--bench", f"torch:0:{work / 'bench_torch.json'}:{work / 'bench_torch.log'}",
            "--bench", f"cupy:124:{work / 'bench_cupy.json'}:{work / 'bench_cupy.log'}",
            "--smi", str(work / "smi.txt"), "--probe", str(work / "probe.json"),
            "--wheels", str(work / "wheels.txt"), "--caps", "total=470 bench=75 suite=200"]


def test_summary_counts_failures_and_a_run_cut_short(tmp_path):
    dest = tmp_path / "out"
    report(fake_run(dest, tmp_path / "work"))
    written = json.loads((dest / "gpu_check.json").read_text())
    assert written["status"] == "ran"
    torch, jax = written["suites"]["torch"], written["suites"]["jax"]
    assert (torch["passed"], torch["failed"], torch["errors"], torch["skipped"]) == (2, 1, 1, 2)
    assert torch["status"] == "failures" and not torch["timed_out"]
    assert [f["test"] for f in torch["failures"]] == ["tests.test_engine::test_c[torch]",
                                                      "tests.test_engine::test_d[torch]"]
    assert "CUDA out of memory" in torch["failures"][1]["message"]
    assert torch["skip_reasons"] == {"no display": 2}
    assert jax["timed_out"] and jax["status"] == "stopped at the 200 s cap"
    assert (jax["passed"], jax["skipped"], jax["junit"]) == (40, 3, None)
    bench = written["benchmark"]
    assert [r["method"] for r in bench["rows"]] == ["sdze", "first-order"]
    assert [(r["backend"], r["timed_out"]) for r in bench["runs"]] == [("torch", False),
                                                                      ("cupy", True)]
    assert written["caps_s"] == {"total": "470", "bench": "75", "suite": "200"}
    assert json.loads((dest / "bench_d1e6.json").read_text())["rows"] == bench["rows"]

    table = report(["table", str(dest / "gpu_check.json")]).stdout
    assert "Run on NVIDIA H200" in table
    assert "| torch | failures | 2 | 1 | 1 | 2 | 61 |" in table
    assert "| jax | stopped at the 200 s cap | 40 | 0 | 0 | 3 | 221 |" in table
    assert "| torch | sdze | 1e+06 | 12.3 | 2.00 | 1.05 |" in table
    assert "timed out after 30 s" in table


def test_table_writes_the_docs_block_in_place(tmp_path):
    doc = tmp_path / "conformance.md"
    doc.write_text("# Title\n\nbefore\n<!-- gpu-check:begin -->\nold\n<!-- gpu-check:end -->\n"
                   "after\n")
    dry = tmp_path / "dry.json"
    dry.write_text(json.dumps({"status": "skipped: no CUDA device", "reason": "no GPU",
                               "date": "2026-01-01", "commit": "abc"}))
    report(["table", str(dry), "--write", str(doc)])
    text = doc.read_text()
    assert text.startswith("# Title\n\nbefore\n<!-- gpu-check:begin -->\nNot yet run on a GPU.")
    assert text.endswith("<!-- gpu-check:end -->\nafter\n")
    assert "old" not in text and "| cupy | not yet run on GPU | not yet run on GPU |" in text


def docs_block() -> str:
    text = (ROOT / "docs" / "conformance.md").read_text()
    start = text.index("<!-- gpu-check:begin -->") + len("<!-- gpu-check:begin -->")
    return text[start:text.index("<!-- gpu-check:end -->")].strip()


def test_docs_show_the_committed_gpu_report():
    if COMMITTED.exists() and json.loads(COMMITTED.read_text()).get("status") == "ran":
        assert docs_block() == report(["table", str(COMMITTED)]).stdout.strip()
    else:
        assert docs_block().startswith("Not yet run on a GPU.")
