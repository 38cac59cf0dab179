#!/usr/bin/env bash
# scripts/run.sh — the main job on a fresh machine: installs the dependencies, builds, and runs
# `fusedmoe run` on its default config (extra arguments go to `fusedmoe run`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
TARGET=fusedmoe_cli bash scripts/build.sh  # the CLI and the library it links
exec "${BUILD_DIR:-build}/cli/fusedmoe" run "$@"
