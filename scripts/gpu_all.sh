#!/usr/bin/env bash
# scripts/gpu_all.sh — on a machine with a GPU: builds (or reuses a prebuilt tree given as
# BUILD_DIR), runs every GPU test, compute-sanitizer on the small cases, and the benchmark
# table; logs go to ${OUT:-out}/.
#   BUILD_DIR=build-cuda OUT=/tmp/out bash scripts/gpu_all.sh
# ARCHIVE=<file.tgz> also packs everything written to OUT into one archive at the end.
# The fused kernel's randomized harness runs FUSEDMOE_FUSED_CASES cases (default 2000).
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

export LD_LIBRARY_PATH="$PWD/$BUILD_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The NCCL transport's tests need a libnccl no older than the headers of the build: torch's
# when the system one is older (FUSEDMOE_NCCL_LIBRARY, fusedmoe/transport.hpp).
if [ -z "${FUSEDMOE_NCCL_LIBRARY:-}" ]; then
  torch_nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2'))" 2>/dev/null)
  [ -n "$torch_nccl" ] && [ -f "$torch_nccl" ] && export FUSEDMOE_NCCL_LIBRARY="$torch_nccl"
fi
step "GPU tests"
# A hang is a bug, never a wait: the suite runs under a timeout.
timeout 600 "$BUILD_DIR/tests/gpu/fusedmoe_gpu_tests" --gtest_output="xml:$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1 || status=1
grep -E "^\[  (PASSED|FAILED|SKIPPED) |FAILED  \]|Failure|error" "$OUT/gpu_tests.log" | head -60
tail -3 "$OUT/gpu_tests.log"

# The fused kernel over NCCL from the command line: one rank per GPU under mpirun (here as many
# ranks as GPUs, at least 1), checked against the naive reference of the whole layer.
if [ -x "$BUILD_DIR/cli/fusedmoe" ] && command -v mpirun >/dev/null; then
  step "fusedmoe run --transport nccl under mpirun"
  ranks=$(nvidia-smi -L | wc -l)
  OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NCCL_NVLS_ENABLE=0 timeout 300 \
    mpirun -np "$ranks" -x LD_LIBRARY_PATH -x FUSEDMOE_NCCL_LIBRARY -x NCCL_NVLS_ENABLE \
    "$BUILD_DIR/cli/fusedmoe" run --transport nccl --dtype fp32 --tokens $((512 * ranks)) --world-size "$ranks" \
    >"$OUT/cli_nccl.log" 2>&1 || status=1
  grep -E "^rank" "$OUT/cli_nccl.log"
fi

if [ -f "$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so" ] && python3 -c "import torch.distributed.run" 2>/dev/null; then
  step "the fused op over NCCL under torchrun (examples/fused_torchrun.py)"
  ranks=$(nvidia-smi -L | wc -l)
  FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so" PYTHONPATH="$PWD/python" NCCL_NVLS_ENABLE=0 \
    timeout 300 python3 -m torch.distributed.run --nproc_per_node "$ranks" examples/fused_torchrun.py \
    >"$OUT/torchrun_nccl.log" 2>&1 || status=1
  grep -E "^rank|Error" "$OUT/torchrun_nccl.log"
  step "a training step across the GPUs (expert parallel; x data parallel from 4 GPUs) equals one process"
  for dtype in fp32 bf16; do
    FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so" PYTHONPATH="$PWD/python" NCCL_NVLS_ENABLE=0 \
      timeout 300 python3 -m torch.distributed.run --nproc_per_node "$ranks" scripts/multi_gpu_train_check.py \
      --dtype "$dtype" >"$OUT/train_check_$dtype.log" 2>&1 || status=1
    grep -E "PASS|FAIL|Error" "$OUT/train_check_$dtype.log"
  done
fi

if [ -f "$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so" ] && [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step "the layer across the GPUs: fused over NCCL, modular + all_to_all, torch all_to_all + _grouped_mm"
  FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so" PYTHONPATH="$PWD/python" NCCL_NVLS_ENABLE=0 \
    timeout 600 python3 -m torch.distributed.run --nproc_per_node "$(nvidia-smi -L | wc -l)" scripts/multi_gpu_bench.py \
    --out "$OUT" 2>&1 | grep -E "^W=|wrote|Error" | tee "$OUT/multi_gpu_bench.txt"
fi

if [ -x "$BUILD_DIR/tests/gpu/fusedmoe_gemm_tests" ]; then
  step "grouped GEMM engine: tests + benchmark"
  "$BUILD_DIR/tests/gpu/fusedmoe_gemm_tests" --results "$OUT/gemm_ours.txt" >"$OUT/gemm_tests.log" 2>&1 || status=1
  grep -iE "fail|passed|TFLOP|error" "$OUT/gemm_tests.log" | tail -12
  python3 tests/gpu/gemm/bench_torch.py --ours "$OUT/gemm_ours.txt" 2>&1 | tee "$OUT/gemm_torch.log" | grep -vE "^  " | tail -16
fi

export LD_LIBRARY_PATH="$PWD/$BUILD_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FUSEDMOE_OPS_LIBRARY="$PWD/$BUILD_DIR/python/fusedmoe/_fusedmoe_ops.so"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
if [ -f "$FUSEDMOE_OPS_LIBRARY" ]; then
  step "torch ops on CUDA (pytest)"
  python3 -m pytest -q tests/gpu/test_torch_cuda.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  if [ -z "${NO_BENCH:-}" ]; then
    step "benchmark (fusedmoe bench)"
    timeout 900 python3 -m fusedmoe.bench --timeline --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.txt" | grep -v "^\[" || status=1
  fi
  if [ -z "${NO_EXAMPLE:-}" ]; then
    step "training example: ${EXAMPLE_STEPS:-500} steps, fusedmoe and the plain-PyTorch MoE from the same init"
    timeout 600 python3 examples/train_lm.py --device cuda --moe both --steps "${EXAMPLE_STEPS:-500}" --no-progress \
      --out "$OUT/train_lm" 2>&1 | tee "$OUT/train_lm.log" | tail -8
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
  fi
fi
if [ "${SANITIZE:-1}" != 0 ] && command -v compute-sanitizer >/dev/null; then
  for tool in ${SANITIZERS:-memcheck racecheck}; do
    step "compute-sanitizer $tool (small cases)"
    FUSEDMOE_FUSED_TIMEOUT_MS=120000 compute-sanitizer --tool "$tool" --error-exitcode 3 "$BUILD_DIR/tests/gpu/fusedmoe_gpu_tests" \
      --gtest_filter='All/GpuKinds.ForwardBackwardMatchOracle/fp32_softmax_swiglu:All/GpuKinds.ForwardBackwardMatchOracle/bf16_gshard_geglu:GpuLayer.CapacityAndSharedExperts:All/FusedKinds.MatchesOracleAtW1AndW4/bf16_softmax_swiglu:All/FusedKinds.MatchesOracleAtW1AndW4/fp32_noisy_geglu:FusedKernel.DecodeShapesSplitRouting:FusedKernel.SharedExperts:FusedKernel.GinPathsOnEmulatedRanks' \
      >"$OUT/sanitizer_$tool.log" 2>&1 || status=1
    tail -4 "$OUT/sanitizer_$tool.log"
  done
fi

[ -z "${ARCHIVE:-}" ] || tar czf "$ARCHIVE" -C "$OUT" .
exit $status
