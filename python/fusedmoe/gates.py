# python/fusedmoe/gates.py — router (gate) modules, FastMoE-style: each gate owns its parameters
# (weight [E, H], optional bias [E], and the noise weight / selection bias of its kind) and the
# config fields of its kind. fusedmoe.MoE hands them to the fused op; calling a gate on its own
# routes tokens with the plain-PyTorch reference (fusedmoe.reference.route).
#
# Kinds (semantics: include/fusedmoe/config.hpp, GateKind):
#   SoftmaxTopKGate  softmax, top-k, optional renormalisation
#   SigmoidTopKGate  sigmoid scores, top-k on score + selection_bias (DeepSeek-V3 aux-loss-free
#                    balancing: the bias steers selection only; update_selection_bias() adjusts it)
#   NoisyTopKGate    Shazeer et al.: logits + ε ⊙ softplus(x·Wnᵀ) in training
#   SwitchGate       top-1, multiplicative jitter U(1-ε, 1+ε) on the router input in training
#   GShardGate       top-2, renormalised; the second expert is randomly dropped in training
# Test: tests/python/test_modules.py.
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from . import reference
from .config import MoeConfig, normalize_gate_kind

__all__ = [
    "BaseGate",
    "SoftmaxTopKGate",
    "SigmoidTopKGate",
    "NoisyTopKGate",
    "SwitchGate",
    "GShardGate",
    "make_gate",
]


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} = {value!r}: must be a positive integer")
    return value


class BaseGate(nn.Module):
    """A router: logits = x·weightᵀ + bias over E experts; picks top_k of them per token.

    Args:
        d_model: H, the token width.
        num_experts: E.
        top_k: k, experts per token (1 <= k <= E).
        bias: give the router a trained bias [E].
        renormalize: divide the k weights by their sum.
        dtype: parameter dtype (default: torch.get_default_dtype()).
        device: parameter device.
    Parameters:
        weight: [E, H].  bias: [E] or None.
    Attributes (None unless the kind has them):
        noise_weight: [E, H] parameter (noisy gate).  selection_bias: [E] buffer (sigmoid gate).
    """

    kind = "softmax"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False,
                 renormalize: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__()
        self.d_model = _check_positive(d_model, "d_model")
        self.num_experts = _check_positive(num_experts, "num_experts")
        self.top_k = _check_positive(top_k, "top_k")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {top_k}: must be in [1, num_experts = {num_experts}]")
        self.renormalize = bool(renormalize)
        self.jitter_eps = 0.0
        factory = {"dtype": dtype, "device": device}
        self.weight = nn.Parameter(torch.empty(num_experts, d_model, **factory))
        self.bias = nn.Parameter(torch.empty(num_experts, **factory)) if bias else None
        # Registered as absent here so that subclasses can fill them in.
        self.register_parameter("noise_weight", None)
        self.register_buffer("selection_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear-style init: weight and bias ~ U(±1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.d_model)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def config_fields(self) -> dict:
        """The MoeConfig fields this gate decides (gate, top_k, renormalize, gate_bias, jitter_eps)."""
        return {"gate": self.kind, "top_k": self.top_k, "renormalize": self.renormalize,
                "gate_bias": self.bias is not None, "jitter_eps": self.jitter_eps}

    @property
    def stochastic(self) -> bool:
        """Whether training-mode routing draws random numbers (noise, jitter, random drop)."""
        return False

    def forward(self, x: torch.Tensor, *, seed: int = 0, token_offset: int = 0):
        """Routes tokens with the plain-PyTorch reference (training mode follows self.training).

        Args:
            x: [T, H] tokens.
            seed: noise key (training mode of stochastic gates).
            token_offset: global index of x's first token.
        Returns:
            (topk_idx int64 [T, k] (-1 = none), topk_weight [T, k] in x's dtype, differentiable).
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [T, d_model = {self.d_model}]")
        config = MoeConfig(hidden_size=self.d_model, ffn_size=1, num_experts=self.num_experts,
                           **self.config_fields())
        r = reference.route(x, self.weight, self.bias, self.noise_weight, self.selection_bias, config,
                            training=self.training, seed=seed, token_offset=token_offset)
        return r.topk_idx, r.topk_weight.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, d_model={self.d_model}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, bias={self.bias is not None}, renormalize={self.renormalize}")


class SoftmaxTopKGate(BaseGate):
    """Softmax top-k gate (FastMoE's NaiveGate). Args as BaseGate."""

    kind = "softmax"


class SigmoidTopKGate(BaseGate):
    """Sigmoid top-k gate with a selection-only bias (DeepSeek-V3).

    Args: as BaseGate.
    Buffers:
        selection_bias: [E], zeros at start; added to the sigmoid scores for selection only (no
        gradient); adjust with update_selection_bias().
    """

    kind = "sigmoid"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False,
                 renormalize: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__(d_model, num_experts, top_k, bias=bias, renormalize=renormalize,
                         dtype=dtype, device=device)
        self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=self.weight.dtype,
                                                           device=self.weight.device))

    @torch.no_grad()
    def update_selection_bias(self, expert_counts: torch.Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step: b_e += rate · sign(mean load − load_e).

        Args:
            expert_counts: [E] tokens routed to each expert (e.g. MoE.last_expert_counts).
            rate: update speed γ.
        """
        if expert_counts.shape != (self.num_experts,):
            raise ValueError(f"expert_counts: shape {tuple(expert_counts.shape)}, expected "
                             f"[num_experts = {self.num_experts}]")
        load = expert_counts.to(self.selection_bias)
        self.selection_bias += rate * torch.sign(load.mean() - load)


class NoisyTopKGate(BaseGate):
    """Noisy top-k gate (Shazeer et al. 2017): in training, logits + ε ⊙ softplus(x·Wnᵀ).

    Args: as BaseGate.
    Parameters:
        noise_weight: [E, H], zero at start (as in the paper; the noise scale is then softplus(0)).
    """

    kind = "noisy"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False,
                 renormalize: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__(d_model, num_experts, top_k, bias=bias, renormalize=renormalize,
                         dtype=dtype, device=device)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model, dtype=self.weight.dtype,
                                                     device=self.weight.device))

    @property
    def stochastic(self) -> bool:
        return True


class SwitchGate(BaseGate):
    """Switch Transformer gate: top-1, weight = p (never renormalised), jitter in training.

    Args:
        d_model, num_experts, bias, dtype, device: as BaseGate.
        jitter_eps: the router sees x ⊙ U(1 − eps, 1 + eps) in training (0 = off).
    """

    kind = "switch"

    def __init__(self, d_model: int, num_experts: int, *, bias: bool = False,
                 jitter_eps: float = 1e-2, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        super().__init__(d_model, num_experts, 1, bias=bias, renormalize=False, dtype=dtype,
                         device=device)
        if not 0.0 <= float(jitter_eps) < 1.0:
            raise ValueError(f"jitter_eps = {jitter_eps}: must be in [0, 1)")
        self.jitter_eps = float(jitter_eps)

    @property
    def stochastic(self) -> bool:
        return self.jitter_eps > 0.0


class GShardGate(BaseGate):
    """GShard gate: top-2, renormalised; in training the second expert is dropped when 2·w₂ < u.

    Args:
        d_model, num_experts, bias, dtype, device: as BaseGate (num_experts >= 2).
    """

    kind = "gshard"

    def __init__(self, d_model: int, num_experts: int, *, bias: bool = False,
                 dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None):
        if isinstance(num_experts, int) and not isinstance(num_experts, bool) and num_experts < 2:
            raise ValueError(f"num_experts = {num_experts}: gate 'gshard' needs at least 2 experts")
        super().__init__(d_model, num_experts, 2, bias=bias, renormalize=True, dtype=dtype,
                         device=device)

    @property
    def stochastic(self) -> bool:
        return True


def make_gate(name: str, d_model: int, num_experts: int, top_k: Optional[int] = None, *,
              bias: bool = False, renormalize: bool = True, jitter_eps: float = 1e-2,
              dtype: Optional[torch.dtype] = None,
              device: Optional[Union[str, torch.device]] = None) -> BaseGate:
    """A gate module from its name.

    Args:
        name: "softmax", "sigmoid", "noisy", "switch" or "gshard" (aliases as in C++).
        d_model: H.
        num_experts: E.
        top_k: k; None = 2 (1 for "switch"). "switch" needs 1 and "gshard" 2.
        bias: trained router bias [E].
        renormalize: divide the k weights by their sum (softmax, sigmoid, noisy).
        jitter_eps: Switch jitter half-width.
        dtype, device: parameter dtype and device.
    Raises:
        ValueError naming `gate` for an unknown name, `top_k` for a k the gate cannot use.
    """
    kind = normalize_gate_kind(name, "gate")
    common = {"bias": bias, "dtype": dtype, "device": device}
    if kind == "switch":
        if top_k not in (None, 1):
            raise ValueError(f"top_k = {top_k}: gate 'switch' routes to exactly 1 expert (top_k = 1)")
        return SwitchGate(d_model, num_experts, jitter_eps=jitter_eps, **common)
    if kind == "gshard":
        if top_k not in (None, 2):
            raise ValueError(f"top_k = {top_k}: gate 'gshard' routes to exactly 2 experts (top_k = 2)")
        return GShardGate(d_model, num_experts, **common)
    k = 2 if top_k is None else top_k
    cls = {"softmax": SoftmaxTopKGate, "sigmoid": SigmoidTopKGate, "noisy": NoisyTopKGate}[kind]
    return cls(d_model, num_experts, k, renormalize=renormalize, **common)
