#!/usr/bin/env bash
# scripts/pack_gpu_tree.sh — copies the run-time artifacts of a CUDA build (the library, the GPU
# test binaries, the torch op library) into a small tree that can travel to a GPU machine and be
# used there as BUILD_DIR of scripts/gpu_all.sh:
#   bash scripts/pack_gpu_tree.sh build-cuda build-wt
#   (on the GPU machine) BUILD_DIR=build-wt OUT=out bash scripts/gpu_all.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-build-cuda}
DST=${2:-build-wt}
rm -rf "$DST"
mkdir -p "$DST/tests/gpu" "$DST/python/fusedmoe" "$DST/cli"
cp -a "$SRC"/libfusedmoe.so* "$DST/"
for f in tests/gpu/fusedmoe_gpu_tests tests/gpu/fusedmoe_gemm_tests tests/gpu/fusedmoe_fused_tests \
         python/fusedmoe/_fusedmoe_ops.so cli/fusedmoe; do
  [ -e "$SRC/$f" ] && cp -a "$SRC/$f" "$DST/$f"
done
du -sh "$DST"
