#!/usr/bin/env bash
# One-command GPU check (docs/conformance.md, "GPU check"): the conformance suite and the
# unit tests on CUDA for torch, jax and cupy, and the d = 10^6 step benchmark, all as JSON.
#
#     bash benchmarks/gpu_check.sh          # from anywhere; about 8 minutes at most
#
# Needs python3 with numpy, pytest, torch, jax (CUDA plugin) and cupy; no network and no
# nox. The pure-Python packages the suites import and such a machine may lack
# (array-api-compat, array-api-strict, hypothesis) are installed from .whl/ at the
# repository root when present: benchmarks/gpu_wheels.sh fills it on a networked machine.
#
# Writes into $OUT if set, else benchmarks/results/gpu/:
#   gpu_check.json        everything below in one file (counts, failures, benchmark, versions)
#   pytest_<b>.xml/.log   JUnit XML and output of `pytest conformance tests --backend <b>
#                         --device cuda`, for b in torch, jax, cupy (run side by side)
#   bench_d1e6.json       benchmarks/bench_sweep.py at d = 10^6 (sdze and first-order)
# `python benchmarks/gpu_report.py table <dir>/gpu_check.json --write docs/conformance.md`
# puts the result in the docs.
#
# Without a CUDA device (nvidia-smi missing or listing no GPU) it prints why, writes
# gpu_check.json with "status": "skipped: no CUDA device" and the commands it would have
# run, and exits 0: the dry run tests/test_gpu_check.py runs in CI.
#
# Time caps (seconds; environment): SDZE_GPU_TOTAL_CAP for the whole check (470),
# SDZE_GPU_BENCH_CAP per backend's benchmark (75; run first, one backend at a time),
# SDZE_GPU_SUITE_CAP per backend's pytest (360; the three run at once, with what is left of
# the total). SDZE_GPU_BACKENDS (default "torch jax cupy") and PYTHON (python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
DEST="${OUT:-$ROOT/benchmarks/results/gpu}"
BACKENDS="${SDZE_GPU_BACKENDS:-torch jax cupy}"
SUITE_CAP="${SDZE_GPU_SUITE_CAP:-360}"
BENCH_CAP="${SDZE_GPU_BENCH_CAP:-75}"
TOTAL_CAP="${SDZE_GPU_TOTAL_CAP:-470}"
STARTED="$(date +%s)"
DEADLINE=$((STARTED + TOTAL_CAP))
REPORT=("$PY" "$ROOT/benchmarks/gpu_report.py")
mkdir -p "$DEST"

suite_command() { echo "python3 -m pytest conformance tests --backend $1 --device cuda"; }
bench_args() {
    echo "benchmarks/bench_sweep.py --backends $1 --methods sdze first-order --dims 1e6" \
         "--device cuda --steps 3 --warmup 2 --timeout $(( (BENCH_CAP - 15) / 2 ))"
}

# -- 1. Is there a CUDA device? -------------------------------------------------------------
reason=""
if ! command -v nvidia-smi >/dev/null 2>&1; then
    reason="nvidia-smi is not on PATH"
elif ! listing="$(nvidia-smi -L 2>&1)"; then
    reason="nvidia-smi -L failed: $(echo "$listing" | head -n 1)"
elif ! grep -q "^GPU " <<<"$listing"; then
    reason="nvidia-smi -L lists no GPU"
fi
if [ -n "$reason" ]; then
    echo "gpu_check: skipped: no CUDA device ($reason); nothing run"
    plan=()
    for b in $BACKENDS; do plan+=("$(suite_command "$b")"); done
    for b in $BACKENDS; do plan+=("python3 $(bench_args "$b")"); done
    "${REPORT[@]}" skip --reason "$reason" --out "$DEST/gpu_check.json" --plan "${plan[@]}" \
        || exit 1
    exit 0
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -f "$DEST"/gpu_check.json "$DEST"/bench_d1e6.json "$DEST"/pytest_*.xml "$DEST"/pytest_*.log
{ echo "$listing"; nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
      --format=csv 2>&1; } >"$WORK/smi.txt"
echo "gpu_check: $(head -n 1 "$WORK/smi.txt")"

# -- 2. The pure-Python wheels this machine lacks (no network here) ------------------------
SITE="$WORK/site"
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl >"$WORK/pip.log" 2>&1; then
        (cd .whl && ls -1 ./*.whl | sed 's|^\./|installed from .whl/: |') >"$WORK/wheels.txt"
    else
        { echo "pip install from .whl/ failed:"; tail -n 5 "$WORK/pip.log"; } >"$WORK/wheels.txt"
    fi
else
    echo "no .whl/ folder: nothing installed (benchmarks/gpu_wheels.sh fills it)" \
        >"$WORK/wheels.txt"
fi
export PYTHONPATH="$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - >>"$WORK/wheels.txt" 2>&1 <<'EOF'
import importlib.util
for name in ("array_api_compat", "array_api_strict", "hypothesis", "pytest", "numpy"):
    if importlib.util.find_spec(name) is None:
        print(f"missing: {name} (tests that import it fail or skip)")
EOF
cat "$WORK/wheels.txt"
# JAX takes 75 % of the GPU at start by default: three suites share the device here.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
unset SDZE_TEST_BACKENDS
timeout -k 10 60 "${REPORT[@]}" probe >"$WORK/probe.json" 2>"$WORK/probe.err" \
    || echo '{"error": "probe failed or timed out"}' >"$WORK/probe.json"

# -- 3. The d = 10^6 step benchmark, one backend at a time (the GPU to itself) --------------
remaining() { echo $((DEADLINE - $(date +%s))); }
bench=()
for b in $BACKENDS; do
    left=$(( $(remaining) - 90 ))  # keep at least a minute for the suites
    if [ "$left" -lt 20 ]; then
        echo "not run: the total cap of $TOTAL_CAP s was reached" >"$WORK/bench_$b.log"
        bench+=(--bench "$b:-1:$WORK/bench_$b.json:$WORK/bench_$b.log")
        continue
    fi
    bcap=$BENCH_CAP
    [ "$left" -lt "$bcap" ] && bcap=$left
    # shellcheck disable=SC2046  # bench_args prints words to split
    timeout -k 10 "$bcap" "$PY" $(bench_args "$b") --out "$WORK/bench_$b.json" \
        >"$WORK/bench_$b.log" 2>&1
    code=$?
    bench+=(--bench "$b:$code:$WORK/bench_$b.json:$WORK/bench_$b.log")
    echo "gpu_check: benchmark $b: exit $code"
done

# -- 4. Conformance suite and unit tests, one pytest per backend, side by side --------------
# Each gets what is left of the total cap (SIGINT first, so pytest still writes its report).
cap=$(( $(remaining) - 40 ))
[ "$cap" -gt "$SUITE_CAP" ] && cap=$SUITE_CAP
[ "$cap" -lt 30 ] && cap=30
for b in $BACKENDS; do
    (
        t0=$SECONDS
        timeout -s INT -k 20 "$cap" "$PY" -m pytest conformance tests --backend "$b" \
            --device cuda -q -rfE -p no:cacheprovider --junitxml="$DEST/pytest_$b.xml" \
            >"$DEST/pytest_$b.log" 2>&1
        code=$?
        echo "$b:$code:$((SECONDS - t0)):$cap" >"$WORK/suite_$b"
    ) &
done
echo "gpu_check: pytest on $BACKENDS, side by side (cap $cap s each)"
wait
suites=()
for b in $BACKENDS; do
    suites+=(--suite "$(cat "$WORK/suite_$b")")
    echo "gpu_check: $b: $(tail -n 1 "$DEST/pytest_$b.log")"
done

# -- 5. One JSON -----------------------------------------------------------------------------
"${REPORT[@]}" summarize --dest "$DEST" "${suites[@]}" "${bench[@]}" --smi "$WORK/smi.txt" \
    --probe "$WORK/probe.json" --wheels "$WORK/wheels.txt" --started "$STARTED" \
    --caps "total=$TOTAL_CAP bench=$BENCH_CAP suite=$cap"
echo "gpu_check: wrote $DEST/gpu_check.json ($(( $(date +%s) - STARTED )) s)"
"${REPORT[@]}" table "$DEST/gpu_check.json"
