#!/usr/bin/env bash
# Builds the grouped-GEMM GPU test/benchmark (tests/gpu/gemm/grouped_gemm_test.cu) with the
# Hopper kernel and the reference kernel of src/cuda/gemm/.
#   CUTLASS_INCLUDE=<dir containing cute/ and cutlass/> tests/gpu/gemm/build.sh [out_dir]
# Default out_dir: build/gemm. Compiles one translation unit at a time (heavy CuTe TUs).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
out="${1:-$root/build/gemm}"
if [[ -z "${CUTLASS_INCLUDE:-}" ]]; then
  CUTLASS_INCLUDE="$(python3 -c 'import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))' 2>/dev/null || true)"
fi
if [[ ! -f "${CUTLASS_INCLUDE}/cute/tensor.hpp" ]]; then
  echo "build.sh: set CUTLASS_INCLUDE to a directory containing cute/tensor.hpp (got '${CUTLASS_INCLUDE}')" >&2
  exit 2
fi
mkdir -p "$out"
flags=(-std=c++20 -gencode=arch=compute_90a,code=sm_90a -DNDEBUG --expt-relaxed-constexpr
       -lineinfo -Xptxas=-warn-spills -O3 -I"$CUTLASS_INCLUDE" -I"$root/src/cuda/gemm" -I"$root/include")
for src in grouped_gemm_sm90 grouped_gemm_reference; do
  if [[ ! -f "$out/$src.o" || "$root/src/cuda/gemm/$src.cu" -nt "$out/$src.o" ||
        "$root/src/cuda/gemm/grouped_gemm_sm90.cuh" -nt "$out/$src.o" ||
        "$root/src/cuda/gemm/grouped_gemm_wgrad_sm90.cuh" -nt "$out/$src.o" ||
        "$root/src/cuda/gemm/grouped_gemm.hpp" -nt "$out/$src.o" ||
        "$root/src/cuda/gemm/epilogue_math.cuh" -nt "$out/$src.o" ]]; then
    echo "nvcc $src.cu"
    nvcc "${flags[@]}" -Xptxas=-v -c "$root/src/cuda/gemm/$src.cu" -o "$out/$src.o" 2> "$out/$src.ptxas.log" \
      || { cat "$out/$src.ptxas.log" >&2; exit 1; }
    if grep -E "spill (stores|loads)" "$out/$src.ptxas.log" | grep -vq " 0 bytes spill stores, 0 bytes spill loads"; then
      grep -B2 -E "[1-9][0-9]* bytes spill" "$out/$src.ptxas.log" >&2 || true
      echo "build.sh: register spills in $src (treated as a failure)" >&2
      exit 1
    fi
    if grep -qE "C7514|C7520" "$out/$src.ptxas.log"; then
      grep -E "C7514|C7520" "$out/$src.ptxas.log" >&2
      echo "build.sh: ptxas serialised the wgmmas of a kernel in $src (treated as a failure)" >&2
      exit 1
    fi
    grep -i "warning" "$out/$src.ptxas.log" >&2 || true
  fi
done
echo "nvcc grouped_gemm_test.cu"
nvcc "${flags[@]}" "$root/tests/gpu/gemm/grouped_gemm_test.cu" "$out/grouped_gemm_sm90.o" \
  "$out/grouped_gemm_reference.o" -o "$out/grouped_gemm_test"
echo "built $out/grouped_gemm_test"
echo "nvcc layout_probe.cu (host-only check, runs without a GPU)"
nvcc "${flags[@]}" "$root/tests/gpu/gemm/layout_probe.cu" -o "$out/layout_probe"
"$out/layout_probe"
