#!/usr/bin/env bash
# Fetch the pure-Python wheels that benchmarks/gpu_check.sh installs on a GPU machine
# without network: run this on a machine with network, then carry .whl/ along with the
# checkout (.whl/ is in .gitignore; nothing here is committed).
#
#     bash benchmarks/gpu_wheels.sh        # writes .whl/ at the repository root
#
# The GPU machine has python3 (3.12), numpy, pytest, torch, jax and cupy, but not
# array-api-compat (an sdze dependency) nor array-api-strict (a test dependency): those two
# are pinned to the versions of the project's development environment. hypothesis (the
# property-based tests) is there, at a version not checked; the newest one the index offers
# (at least 6.100) is carried so the run does not depend on it (its one dependency,
# sortedcontainers, is there). All are py3-none-any wheels. SDZE_GPU_WHEELS="name==version
# ..." overrides the list. Old wheels in .whl/ are removed first (two versions of one
# package stop the install there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEFAULT_WHEELS="array-api-compat==1.16.0 array-api-strict==2.6.1 hypothesis>=6.100"
read -r -a WHEELS <<<"${SDZE_GPU_WHEELS:-$DEFAULT_WHEELS}"
mkdir -p .whl
rm -f .whl/*.whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --abi none --platform any -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl
