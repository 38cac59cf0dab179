# python/fusedmoe/__init__.py — the fusedmoe PyTorch package: MoE layers (fusedmoe.MoE), gates,
# experts, balance losses, a plain-PyTorch reference of the same layer, and expert / data
# parallelism (fusedmoe.distributed, fusedmoe.shadowing).
#
# On import it loads the op library _fusedmoe_ops.so (bindings/torch) with torch.ops.load_library:
# from $FUSEDMOE_OPS_LIBRARY when set (tests point it at a build tree), else from this package's
# directory (where the wheel installs it). The ops are then torch.ops.fusedmoe.moe_forward and
# torch.ops.fusedmoe.moe_backward; _ops.py adds their fake kernels and autograd.
#
# Test: PYTHONPATH=python FUSEDMOE_OPS_LIBRARY=<build>/python/fusedmoe/_fusedmoe_ops.so \
#       python3 -m pytest tests/python
from __future__ import annotations

import os as _os

import torch as _torch

__version__ = "0.1.0"

_LIBRARY_NAMES = ("_fusedmoe_ops.so", "_fusedmoe_ops.dylib", "_fusedmoe_ops.dll")


def _ops_registered() -> bool:
    try:
        _torch.ops.fusedmoe.moe_forward  # noqa: B018 (attribute lookup raises when absent)
        return True
    except (AttributeError, RuntimeError):
        return False


def _load_ops_library() -> str:
    """Loads the op library once; returns the path it came from ("" when already present)."""
    if _ops_registered():
        return ""
    override = _os.environ.get("FUSEDMOE_OPS_LIBRARY", "")
    if override:
        candidates = [override]
    else:
        here = _os.path.dirname(_os.path.abspath(__file__))
        candidates = [_os.path.join(here, name) for name in _LIBRARY_NAMES]
    for path in candidates:
        if _os.path.isfile(path):
            try:
                _torch.ops.load_library(path)
            except OSError as error:
                raise ImportError(f"fusedmoe: could not load the op library {path}: {error}") from error
            return path
    where = ("FUSEDMOE_OPS_LIBRARY=" + override) if override else ("the package directory " + _os.path.dirname(candidates[0]))
    raise ImportError(
        f"fusedmoe: the op library _fusedmoe_ops.so was not found ({where}). Build it with "
        "`cmake -S . -B build -DFUSEDMOE_BUILD_TORCH=ON && cmake --build build` and set "
        "FUSEDMOE_OPS_LIBRARY=build/python/fusedmoe/_fusedmoe_ops.so, or install the package "
        "with `pip install --no-build-isolation .`")


ops_library_path = _load_ops_library()

from . import _ops  # noqa: E402

_ops.register()

from . import reference  # noqa: E402
from .config import MoeConfig  # noqa: E402
from .experts import Experts  # noqa: E402
from .gates import (  # noqa: E402
    BaseGate,
    GShardGate,
    NoisyTopKGate,
    SigmoidTopKGate,
    SoftmaxTopKGate,
    SwitchGate,
    make_gate,
    node_limited_topk,
)
from .losses import balance_loss, moe_modules, update_selection_biases  # noqa: E402
from .moe import MoE  # noqa: E402
from . import distributed, shadowing  # noqa: E402

__all__ = [
    "MoE",
    "Experts",
    "BaseGate",
    "SoftmaxTopKGate",
    "SigmoidTopKGate",
    "NoisyTopKGate",
    "SwitchGate",
    "GShardGate",
    "make_gate",
    "node_limited_topk",
    "balance_loss",
    "moe_modules",
    "update_selection_biases",
    "MoeConfig",
    "reference",
    "distributed",
    "shadowing",
    "ops_library_path",
    "__version__",
]
