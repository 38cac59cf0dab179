#!/usr/bin/env bash
# One-call GPU session for the grouped GEMM: build (if no prebuilt binary is given), SASS
# check, correctness tests, benchmark, torch baseline in the same run. Logs under $OUT (or
# ./out). Usage: tests/gpu/gemm/run_gpu.sh [prebuilt_binary]
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
out="${OUT:-$root/out}"
mkdir -p "$out"
bin="${1:-}"
[[ $# -gt 0 ]] && shift
if [[ -z "$bin" ]]; then
  if [[ -z "${CUTLASS_INCLUDE:-}" && -f "$root/.carry/cutlass-include.tar.gz" ]]; then
    mkdir -p /tmp/cutlass && tar xzf "$root/.carry/cutlass-include.tar.gz" -C /tmp/cutlass
    export CUTLASS_INCLUDE=/tmp/cutlass/include
  fi
  "$root/tests/gpu/gemm/build.sh" /tmp/gemm-build 2>&1 | tee "$out/build.log" || exit 1
  bin=/tmp/gemm-build/grouped_gemm_test
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv | tee "$out/gpu.txt"
echo "== SASS: instruction counts of the Hopper kernels"
cuobjdump -sass "$bin" > /tmp/sass.txt 2>&1
grep -oE "HGMMA\.[A-Za-z0-9.]+|UTMALDG\.[A-Za-z0-9.]+|USETMAXREG[A-Za-z0-9.]*|UTMACCTL[A-Za-z0-9.]*|\bHMMA\.[A-Za-z0-9.]+|LDL|STL" /tmp/sass.txt | sort | uniq -c | sort -rn | head -20 | tee "$out/sass_summary.txt"
if [[ -n "${SANITIZE:-}" ]]; then
  echo "== compute-sanitizer memcheck (tests only)"
  timeout 240 compute-sanitizer --tool memcheck --print-limit 20 "$bin" --no-bench 2>&1 | tail -n 25 | tee "$out/memcheck.log"
fi
echo "== tests + benchmark"
timeout 300 "$bin" --results "$out/ours.txt" "$@" 2>&1 | tee "$out/test.log"
status=${PIPESTATUS[0]}
echo "== torch baseline (same session)"
PYTHONUNBUFFERED=1 python3 "$root/tests/gpu/gemm/bench_torch.py" --ours "$out/ours.txt" 2>&1 | tee "$out/torch.log"
echo "test exit status: $status"
exit $status
