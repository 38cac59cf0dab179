#!/usr/bin/env bash
# scripts/gpu_all.sh — on a machine with a GPU: builds (or reuses a prebuilt tree given as
# BUILD_DIR), runs every GPU test, compute-sanitizer on the small cases, and the benchmark
# table; logs go to ${OUT:-out}/.
#   BUILD_DIR=build-cuda OUT=/tmp/out bash scripts/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
BUILD_DIR=${BUILD_DIR:-build-gpu}
status=0
step() { echo; echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/device.txt"

if [ ! -x "$BUILD_DIR/tests/gpu/fusedmoe_gpu_tests" ]; then
  step "build ($BUILD_DIR)"
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_BUILD_CLI=ON >"$OUT/configure.log" 2>&1 \
    && cmake --build "$BUILD_DIR" -j "$(nproc)" >"$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
fi

step "GPU tests"
"$BUILD_DIR/tests/gpu/fusedmoe_gpu_tests" --gtest_output="xml:$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]|Failure|error" "$OUT/gpu_tests.log" | head -60
tail -3 "$OUT/gpu_tests.log"

if [ -n "${SANITIZE:-1}" ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck; do
    step "compute-sanitizer $tool (small cases)"
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$BUILD_DIR/tests/gpu/fusedmoe_gpu_tests" \
      --gtest_filter='All/GpuKinds.ForwardBackwardMatchOracle/fp32_softmax_swiglu:All/GpuKinds.ForwardBackwardMatchOracle/bf16_gshard_geglu:GpuLayer.CapacityAndSharedExperts' \
      >"$OUT/sanitizer_$tool.log" 2>&1 || status=1
    tail -4 "$OUT/sanitizer_$tool.log"
  done
fi

if [ -x "$BUILD_DIR/tests/gpu/fusedmoe_gpu_bench" ]; then
  step "benchmark"
  "$BUILD_DIR/tests/gpu/fusedmoe_gpu_bench" | tee "$OUT/bench.txt" || status=1
fi
exit $status
