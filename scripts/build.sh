#!/usr/bin/env bash
# scripts/build.sh — configures and builds everything into ${BUILD_DIR:-build}: the library, the
# CLI (build/cli/fusedmoe), the C++ tests and the torch op library (build/python/fusedmoe).
# CUDA sources are compiled for sm_90a (+ portable PTX) when nvcc is found. TARGET=<name>
# builds one target (and what it needs) only.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_BUILD_TORCH=ON \
  -DPython3_EXECUTABLE="$(command -v "${PYTHON:-python3}")" "$@" >"$BUILD_DIR.configure.log" 2>&1 \
  || { cat "$BUILD_DIR.configure.log"; exit 1; }
grep -E "fusedmoe:" "$BUILD_DIR.configure.log" || true
cmake --build "$BUILD_DIR" -j "${JOBS:-$(nproc)}" ${TARGET:+--target "$TARGET"}
