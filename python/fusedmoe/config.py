# python/fusedmoe/config.py — MoeConfig: the Python mirror of fusedmoe::MoeConfig
# (include/fusedmoe/config.hpp) and its "key=value;..." string, which is how the torch ops
# receive a layer's configuration (fusedmoe::parse_config_string on the C++ side).
#
# Test: tests/python/test_modules.py (config round trip, validation messages).
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "MoeConfig",
    "GATE_KINDS",
    "FFN_KINDS",
    "normalize_gate_kind",
    "normalize_ffn_kind",
    "dtype_name",
]

# Canonical names (fusedmoe::to_string) and the aliases fusedmoe::parse_*_kind accepts.
GATE_KINDS = ("softmax", "sigmoid", "noisy", "switch", "gshard")
FFN_KINDS = ("relu", "gelu", "swiglu", "geglu")
_GATE_ALIASES = {
    "softmax": "softmax", "softmax_topk": "softmax", "topk": "softmax",
    "sigmoid": "sigmoid", "sigmoid_topk": "sigmoid", "deepseek": "sigmoid",
    "noisy": "noisy", "noisy_topk": "noisy",
    "switch": "switch", "switch_top1": "switch",
    "gshard": "gshard", "gshard_top2": "gshard",
}
_FFN_ALIASES = {
    "relu": "relu", "relu_mlp": "relu", "gelu": "gelu", "gelu_mlp": "gelu",
    "swiglu": "swiglu", "geglu": "geglu",
}
_DTYPE_NAMES = {
    torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16",
}
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp64": "fp64", "float64": "fp64", "double": "fp64",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
}


# Short keys fusedmoe::set_config_field accepts.
_KEY_ALIASES = {"h": "hidden_size", "i": "ffn_size", "e": "num_experts", "k": "top_k", "w": "world_size"}


def _key(text: str) -> str:
    return str(text).strip().lower().replace("-", "_")


def normalize_gate_kind(name: str, argument: str = "gate") -> str:
    """Canonical gate name for `name` (aliases as in C++).

    Args:
        name: a gate name such as "softmax", "sigmoid", "noisy", "switch", "gshard".
        argument: the argument name used in the error message.
    Raises:
        ValueError naming `argument` for an unknown name.
    """
    if not isinstance(name, str) or _key(name) not in _GATE_ALIASES:
        raise ValueError(f"{argument}: unknown gate kind {name!r} (allowed: {', '.join(GATE_KINDS)})")
    return _GATE_ALIASES[_key(name)]


def normalize_ffn_kind(name: str, argument: str = "ffn") -> str:
    """Canonical FFN name for `name`.

    Args:
        name: "relu", "gelu", "swiglu" or "geglu" (or an alias such as "relu_mlp").
        argument: the argument name used in the error message.
    Raises:
        ValueError naming `argument` for an unknown name.
    """
    if not isinstance(name, str) or _key(name) not in _FFN_ALIASES:
        raise ValueError(f"{argument}: unknown FFN kind {name!r} (allowed: {', '.join(FFN_KINDS)})")
    return _FFN_ALIASES[_key(name)]


def dtype_name(dtype: torch.dtype, argument: str = "dtype") -> str:
    """The config name ("fp32", ...) of a torch floating dtype.

    Args:
        dtype: torch.float32, torch.float64, torch.bfloat16 or torch.float16.
        argument: the argument name used in the error message.
    Raises:
        TypeError naming `argument` for any other dtype.
    """
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"{argument}: dtype {dtype} is not supported "
                        "(expected float32, float64, bfloat16 or float16)")
    return _DTYPE_NAMES[dtype]


def _parse_bool(text: str, key: str) -> bool:
    t = _key(text)
    if t in ("1", "true", "on", "yes"):
        return True
    if t in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{key}: expected true/false, got {text!r}")


@dataclass
class MoeConfig:
    """Shapes, kinds and world of one MoE layer; field for field fusedmoe::MoeConfig.

    Fields (E experts, H hidden, I ffn size):
        hidden_size: H.
        ffn_size: I of each routed expert.
        num_experts: E.
        top_k: k, experts per token (1 <= k <= E; 1 for "switch", 2 for "gshard").
        ffn: "relu" | "gelu" | "swiglu" | "geglu" (gated kinds have w1 of width 2I).
        gate: "softmax" | "sigmoid" | "noisy" | "switch" | "gshard".
        renormalize: divide the k gate weights by their sum.
        capacity_factor: 0 = dropless; else C = ceil(cf * T_r * k / E) rows per (rank, expert).
        num_shared_experts: S experts applied to every token with weight 1.
        shared_ffn_size: I of each shared expert (0 = ffn_size).
        expert_bias: b1/b2 on routed and shared experts.
        gate_bias: a trained router bias [E].
        jitter_eps: half-width of the Switch gate's multiplicative jitter.
        dtype: "fp32" | "fp64" | "bf16" | "fp16".
        fp32_math: "tf32" | "exact" (GPU expert GEMMs on fp32 data).
        world_size: W ranks of the expert-parallel group (emulated in one call on CPU).
        rank: this process's rank.
        expert_placement: owner rank of each expert; empty = contiguous blocks.
    """

    hidden_size: int = 0
    ffn_size: int = 0
    num_experts: int = 0
    top_k: int = 1
    ffn: str = "swiglu"
    gate: str = "softmax"
    renormalize: bool = True
    capacity_factor: float = 0.0
    num_shared_experts: int = 0
    shared_ffn_size: int = 0
    expert_bias: bool = False
    gate_bias: bool = False
    jitter_eps: float = 1e-2
    dtype: str = "fp32"
    fp32_math: str = "tf32"
    world_size: int = 1
    rank: int = 0
    expert_placement: list = field(default_factory=list)

    # --- derived quantities (as in config.hpp) ------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.ffn in ("swiglu", "geglu")

    @property
    def ffn_in_width(self) -> int:
        """N1: width of w1 (2I for gated FFNs)."""
        return 2 * self.ffn_size if self.gated else self.ffn_size

    @property
    def shared_size(self) -> int:
        return self.shared_ffn_size if self.shared_ffn_size > 0 else self.ffn_size

    @property
    def shared_in_width(self) -> int:
        return 2 * self.shared_size if self.gated else self.shared_size

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == 0.0

    def capacity(self, num_tokens: int) -> int:
        """Rows each expert accepts from one source rank holding `num_tokens` tokens."""
        if self.dropless:
            return num_tokens
        c = math.ceil(self.capacity_factor * float(num_tokens * self.top_k) / float(self.num_experts))
        return min(num_tokens, int(c))

    def expert_rank(self, expert_idx: int) -> int:
        if self.expert_placement:
            return int(self.expert_placement[expert_idx])
        per_rank = (self.num_experts + self.world_size - 1) // self.world_size
        return expert_idx // per_rank

    # --- checks -----------------------------------------------------------------------------
    def problems(self) -> list:
        """Every violated rule of fusedmoe::MoeConfig::problems() (messages name the field)."""
        out = []
        if self.hidden_size <= 0:
            out.append(f"hidden_size = {self.hidden_size}: must be > 0")
        if self.ffn_size <= 0:
            out.append(f"ffn_size = {self.ffn_size}: must be > 0")
        if not 1 <= self.num_experts <= 4096:
            out.append(f"num_experts = {self.num_experts}: must be in [1, 4096]")
        if self.top_k < 1 or (self.num_experts > 0 and self.top_k > self.num_experts):
            out.append(f"top_k = {self.top_k}: must be in [1, num_experts = {self.num_experts}]")
        if self.gate == "switch" and self.top_k != 1:
            out.append(f"top_k = {self.top_k}: gate 'switch' routes to exactly 1 expert (top_k = 1)")
        if self.gate == "gshard" and self.top_k != 2:
            out.append(f"top_k = {self.top_k}: gate 'gshard' routes to exactly 2 experts (top_k = 2)")
        if not (self.capacity_factor >= 0.0 and math.isfinite(self.capacity_factor)):
            out.append(f"capacity_factor = {self.capacity_factor}: must be 0 (dropless) or > 0")
        if not 0 <= self.num_shared_experts <= 64:
            out.append(f"num_shared_experts = {self.num_shared_experts}: must be in [0, 64]")
        if self.shared_ffn_size < 0:
            out.append(f"shared_ffn_size = {self.shared_ffn_size}: must be >= 0")
        if not 0.0 <= self.jitter_eps < 1.0:
            out.append(f"jitter_eps = {self.jitter_eps}: must be in [0, 1)")
        if not 1 <= self.world_size <= 1024:
            out.append(f"world_size = {self.world_size}: must be in [1, 1024]")
        if not 0 <= self.rank < max(self.world_size, 1):
            out.append(f"rank = {self.rank}: must be in [0, world_size = {self.world_size})")
        if not self.expert_placement and self.num_experts > 0 and self.world_size > self.num_experts:
            out.append(f"world_size = {self.world_size}: exceeds num_experts = {self.num_experts}")
        return out

    def validate(self) -> "MoeConfig":
        """Raises ValueError listing problems(); returns self when valid."""
        problems = self.problems()
        if problems:
            raise ValueError("invalid MoeConfig: " + "; ".join(problems))
        return self

    # --- the config string --------------------------------------------------------------------
    def to_string(self) -> str:
        """The "key=value;..." string of fusedmoe::to_config_string (every field)."""
        def fmt(value):
            if isinstance(value, bool):
                return "1" if value else "0"
            if isinstance(value, float):
                return repr(value)  # shortest round-trip text; strtod reads it back exactly
            if isinstance(value, list):
                return ",".join(str(int(v)) for v in value)
            return str(value)
        return ";".join(f"{f.name}={fmt(getattr(self, f.name))}" for f in dataclasses.fields(self))

    @classmethod
    def from_string(cls, text: str) -> "MoeConfig":
        """Parses a config string (fusedmoe::parse_config_string); unknown keys raise ValueError."""
        config = cls()
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for item in str(text).split(";"):
            if not item.strip():
                continue
            if "=" not in item:
                raise ValueError(f"config string: expected 'key=value', got {item!r}")
            key, value = (part.strip() for part in item.split("=", 1))
            key = _key(key)
            key = _KEY_ALIASES.get(key, key)
            if key not in types:
                raise ValueError(f"unknown config key {key!r}")
            kind = types[key]
            if kind == "int":
                setattr(config, key, int(value))
            elif kind == "float":
                setattr(config, key, float(value))
            elif kind == "bool":
                setattr(config, key, _parse_bool(value, key))
            elif kind == "list":
                setattr(config, key, [int(v) for v in value.replace(",", " ").split()])
            elif key == "gate":
                config.gate = normalize_gate_kind(value, key)
            elif key == "ffn":
                config.ffn = normalize_ffn_kind(value, key)
            elif key == "dtype":
                if _key(value) not in _DTYPE_ALIASES:
                    raise ValueError(f"dtype: unknown dtype {value!r} (allowed: fp32, fp64, bf16, fp16)")
                config.dtype = _DTYPE_ALIASES[_key(value)]
            else:
                setattr(config, key, value)
        return config

    def replace(self, **changes) -> "MoeConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
