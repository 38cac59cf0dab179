#!/usr/bin/env bash
# scripts/test.sh — the test suite on a machine without a GPU: installs what is missing
# (scripts/install_deps.sh; SKIP_DEPS=1 skips that), builds (scripts/build.sh), runs
# the GoogleTest suite and the CLI tests through ctest, then pytest on the Python package
# against the freshly built op library. Set FUSEDMOE_DIFF_CASES to change the size of the
# randomized differential harness (default 1000) and FUSEDMOE_TEST_SEED to replay a run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
PYTHON=${PYTHON:-python3}
[ -n "${SKIP_DEPS:-}" ] || bash scripts/install_deps.sh  # quick when everything is there
bash scripts/build.sh
echo "== ctest"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "${JOBS:-$(nproc)}"
echo "== pytest"
export FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m pytest tests/python -q -rs
