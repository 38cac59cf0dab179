# tests/python/conftest.py — pytest setup for the fusedmoe Python package: poisons op outputs,
# locates the op library, and seeds every test from one printed base seed.
#
# Run (from the repository root, after building with -DFUSEDMOE_BUILD_TORCH=ON):
#   PYTHONPATH=python FUSEDMOE_OPS_LIBRARY=build-py/python/fusedmoe/_fusedmoe_ops.so \
#     python3 -m pytest tests/python
# FUSEDMOE_TEST_SEED=<n> repeats a run's inputs (the seed is printed in the header and, for a
# failing test, in its captured output). Without FUSEDMOE_OPS_LIBRARY the package's own
# directory is used, then <repo>/build*/python/fusedmoe/ (first match; printed in the header).
import glob
import os
import random
import sys
import zlib

import pytest

# Every output of the op is filled with NaN before the library writes it (see binding.cpp), so an
# element the library forgets to write fails the comparison instead of passing as zero.
os.environ.setdefault("FUSEDMOE_POISON_OUTPUTS", "1")

_REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
try:
    import fusedmoe  # noqa: F401  (PYTHONPATH=python, or installed)
except ImportError:
    sys.path.insert(0, os.path.join(_REPO, "python"))
    if not os.environ.get("FUSEDMOE_OPS_LIBRARY"):
        here = os.path.join(_REPO, "python", "fusedmoe", "_fusedmoe_ops.so")
        built = sorted(glob.glob(os.path.join(_REPO, "build*", "python", "fusedmoe", "_fusedmoe_ops.so")))
        if not os.path.isfile(here) and built:
            os.environ["FUSEDMOE_OPS_LIBRARY"] = built[0]
    import fusedmoe  # noqa: F401,E402  (raises a clear ImportError when the library is missing)

import torch  # noqa: E402

BASE_SEED = int(os.environ.get("FUSEDMOE_TEST_SEED", str(random.SystemRandom().randrange(1, 2**31))))


def pytest_report_header(config):
    return [f"fusedmoe test seed: {BASE_SEED} (repeat with FUSEDMOE_TEST_SEED={BASE_SEED})",
            f"fusedmoe op library: {fusedmoe.ops_library_path or '(already loaded)'}",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"]


@pytest.fixture(autouse=True)
def seeded(request):
    """Seeds torch and random per test: BASE_SEED mixed with the test's id (fresh, repeatable)."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(seed)
    random.seed(seed)
    print(f"seed {seed} (base {BASE_SEED})")
    return seed
