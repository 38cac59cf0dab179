#!/usr/bin/env bash
# scripts/install_deps.sh — installs what building and testing fusedmoe needs on a Debian machine:
# cmake, ninja, a C++20 compiler and GoogleTest from apt (only when missing), and the pinned
# Python packages of requirements-dev.txt. The CUDA toolkit (nvcc) is optional: without it the
# CPU backend alone is built.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cmake >/dev/null || need_apt+=(cmake)
command -v ninja >/dev/null || need_apt+=(ninja-build)
command -v g++ >/dev/null || need_apt+=(g++)
[ -f /usr/include/gtest/gtest.h ] || need_apt+=(libgtest-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install_deps: apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

PYTHON=${PYTHON:-python3}
echo "install_deps: pip install -r requirements-dev.txt"
"$PYTHON" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
