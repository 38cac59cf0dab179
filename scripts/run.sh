#!/usr/bin/env bash
# scripts/run.sh — the main job on a fresh machine: installs the dependencies, builds, and runs
# `fusedmoe run` on its default config (extra arguments go to `fusedmoe run`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
exec "${BUILD_DIR:-build}/cli/fusedmoe" run "$@"
