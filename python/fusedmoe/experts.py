# python/fusedmoe/experts.py — Experts: the stacked FFN weights of E experts, in the layout of
# include/fusedmoe/moe_layer.hpp (w1 [E, H, N1], b1 [E, N1], w2 [E, I, H], b2 [E, H]; N1 = I, or
# 2I for gated kinds with the gate half in columns [0, I) and the up half in [I, 2I)).
# Used for routed experts and, with E = S, for shared experts. Calling it on rows of one expert
# runs that expert in plain PyTorch (fusedmoe.reference.expert_ffn).
# Test: tests/python/test_modules.py.
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from . import reference
from .config import normalize_ffn_kind

__all__ = ["Experts"]


class Experts(nn.Module):
    """E expert FFNs stored as stacked parameters.

    Args:
        num_experts: E (> 0).
        d_model: H.
        d_ffn: I, the hidden width of each expert.
        ffn: "relu" | "gelu" | "swiglu" | "geglu" (y = act(x·w1 + b1)·w2 + b2; gated kinds use
            act(g) ⊙ u).
        bias: give every expert b1 and b2.
        dtype: parameter dtype (default: torch.get_default_dtype()).
        device: parameter device.
    Parameters:
        w1: [E, H, N1]   b1: [E, N1] or None   w2: [E, I, H]   b2: [E, H] or None
        Initialised like nn.Linear: w1, b1 ~ U(±1/sqrt(H)); w2, b2 ~ U(±1/sqrt(I)).
    """

    def __init__(self, num_experts: int, d_model: int, d_ffn: int, ffn: str = "swiglu", *,
                 bias: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ffn", d_ffn)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} = {value!r}: must be a positive integer")
        self.ffn = normalize_ffn_kind(ffn, "ffn")
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_ffn = d_ffn
        n1 = 2 * d_ffn if self.ffn in ("swiglu", "geglu") else d_ffn
        self.in_width = n1
        factory = {"dtype": dtype, "device": device}
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, n1, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ffn, d_model, **factory))
        if bias:
            self.b1 = nn.Parameter(torch.empty(num_experts, n1, **factory))
            self.b2 = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        else:
            self.register_parameter("b1", None)
            self.register_parameter("b2", None)
        self.reset_parameters()

    @property
    def has_bias(self) -> bool:
        return self.b1 is not None

    def reset_parameters(self) -> None:
        """w1, b1 ~ U(±1/sqrt(H)); w2, b2 ~ U(±1/sqrt(I)) (fan-in of each GEMM)."""
        bound1 = 1.0 / math.sqrt(self.d_model)
        bound2 = 1.0 / math.sqrt(self.d_ffn)
        with torch.no_grad():
            self.w1.uniform_(-bound1, bound1)
            self.w2.uniform_(-bound2, bound2)
            if self.b1 is not None:
                self.b1.uniform_(-bound1, bound1)
                self.b2.uniform_(-bound2, bound2)

    def forward(self, x: torch.Tensor, expert_idx: int) -> torch.Tensor:
        """Runs one expert on some rows, in plain PyTorch.

        Args:
            x: [n, H] rows.
            expert_idx: which expert, in [0, E).
        Returns:
            [n, H].
        """
        if not 0 <= int(expert_idx) < self.num_experts:
            raise ValueError(f"expert_idx = {expert_idx}: must be in [0, num_experts = {self.num_experts})")
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [n, d_model = {self.d_model}]")
        e = int(expert_idx)
        return reference.expert_ffn(x, self.w1[e], None if self.b1 is None else self.b1[e],
                                    self.w2[e], None if self.b2 is None else self.b2[e], self.ffn)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ffn={self.d_ffn}, "
                f"ffn={self.ffn}, bias={self.has_bias}")
