# python/fusedmoe/noise.py — the counter-based random numbers of include/fusedmoe/noise.hpp, in
# numpy uint64 arithmetic (wrapping like C++), so that the plain-PyTorch reference draws exactly
# the noise of the library: the noisy gate's ε, Switch jitter and GShard's second-expert test.
#
# A value is a pure function of (seed, stream, global token index, column).
# Test: tests/python/test_training_mode.py (reference vs op in training mode).
from __future__ import annotations

import numpy as np
import torch

__all__ = ["NOISY_GATE", "SWITCH_JITTER", "GSHARD_SECOND", "hash64", "uniform", "normal"]

NOISY_GATE = 1
SWITCH_JITTER = 2
GSHARD_SECOND = 3

_MASK = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_STREAM_MUL = 0xD1B54A32D192ED03
_COLUMN_MUL = np.uint64(0x8CB92BA72F3D8DD7)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrap-around arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def hash64(seed: int, stream: int, token_idx: np.ndarray, column: np.ndarray) -> np.ndarray:
    """noise::hash for every (token, column) pair.

    Args:
        seed: the call's seed (any Python int; taken modulo 2**64 like the op's int64 → uint64).
        stream: NOISY_GATE, SWITCH_JITTER or GSHARD_SECOND.
        token_idx: [T] global token indices (token_offset + t).
        column: [C] column indices.
    Returns:
        uint64 array [T, C].
    """
    with np.errstate(over="ignore"):
        s = np.array([(int(seed) & _MASK) ^ ((int(stream) * _STREAM_MUL) & _MASK)], dtype=np.uint64)
        h = _mix64(s)                                                      # [1]
        h = _mix64(h ^ np.asarray(token_idx, dtype=np.uint64))             # [T]
        c = np.asarray(column, dtype=np.uint64) * _COLUMN_MUL              # [C]
        return _mix64(h[:, None] ^ c[None, :])                             # [T, C]


def _uniform_np(seed, stream, token_idx, column) -> np.ndarray:
    bits = hash64(seed, stream, token_idx, column) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)


def _tokens(num_tokens: int, token_offset: int) -> np.ndarray:
    return np.arange(int(token_offset), int(token_offset) + int(num_tokens), dtype=np.uint64)


def uniform(seed: int, stream: int, num_tokens: int, num_columns: int, token_offset: int = 0) -> torch.Tensor:
    """noise::uniform, open interval (0, 1), for tokens token_offset .. + num_tokens.

    Args:
        seed, stream: as in hash64.
        num_tokens: T.
        num_columns: C (columns 0 .. C-1).
        token_offset: global index of the first token.
    Returns:
        float64 tensor [T, C].
    """
    cols = np.arange(int(num_columns), dtype=np.uint64)
    return torch.from_numpy(_uniform_np(seed, stream, _tokens(num_tokens, token_offset), cols))


def normal(seed: int, stream: int, num_tokens: int, num_columns: int, token_offset: int = 0) -> torch.Tensor:
    """noise::normal (Box-Muller of the uniforms at columns 2c and 2c+1).

    Args:
        seed, stream, num_tokens, num_columns, token_offset: as in uniform().
    Returns:
        float64 tensor [T, C] of standard normal draws.
    """
    tokens = _tokens(num_tokens, token_offset)
    cols = np.arange(int(num_columns), dtype=np.uint64)
    u1 = _uniform_np(seed, stream, tokens, 2 * cols)
    u2 = _uniform_np(seed, stream, tokens, 2 * cols + np.uint64(1))
    return torch.from_numpy(np.sqrt(-2.0 * np.log(u1)) * np.cos(6.283185307179586 * u2))
