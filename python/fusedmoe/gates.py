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
#
# Topology-aware routing (every kind but GShard): with ranks_per_node and max_remote_choices set,
# a token routed on an expert-parallel rank takes at most max_remote_choices of its k experts from
# ranks of other nodes (inter-node links are the slow ones); the remaining choices are the
# best-scoring experts of its own node (node_limited_topk). fusedmoe.MoE computes this selection
# in Python and hands it to the fused op as forced expert indices, so the op's gate weights,
# losses and counts follow the constrained routing.
# Test: tests/python/test_modules.py, tests/python/test_topology_gate.py.
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
    "node_limited_topk",
]


def _check_positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} = {value!r}: must be a positive integer")
    return value


def node_limited_topk(scores: torch.Tensor, top_k: int, expert_node: torch.Tensor,
                      token_node: torch.Tensor, max_remote: int) -> torch.Tensor:
    """Top-k selection with at most `max_remote` of a token's k experts on other nodes.

    Walks each token's experts in descending score (ties: lower expert index first, as the
    unconstrained top-k); an expert on the token's node is always taken, one on another node only
    while fewer than `max_remote` such experts were taken; the first k taken are the result, in
    that order. Without a binding limit this is exactly the plain top-k.

    Args:
        scores: [T, E] selection scores (higher is better).
        top_k: k (1 <= k <= E).
        expert_node: [E] integer node of each expert.
        token_node: [T] integer node of each token (or a 0-dim tensor: all tokens on one node).
        max_remote: 0 <= max_remote <= k.
    Returns:
        [T, k] int64 expert indices.
    Raises:
        ValueError when some token's node holds fewer than k − max_remote experts.
    """
    T, E = scores.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k = {top_k}: must be in [1, {E}]")
    if not 0 <= max_remote <= top_k:
        raise ValueError(f"max_remote = {max_remote}: must be in [0, top_k = {top_k}]")
    if expert_node.shape != (E,):
        raise ValueError(f"expert_node: shape {tuple(expert_node.shape)}, expected [E = {E}]")
    device = scores.device
    expert_node = expert_node.to(device=device, dtype=torch.int64)
    token_node = token_node.to(device=device, dtype=torch.int64).expand(T)
    if T == 0:
        return torch.empty(0, top_k, dtype=torch.int64, device=device)
    local_experts = (expert_node.unsqueeze(0) == token_node.unsqueeze(1)).sum(dim=1)
    if int(local_experts.min()) < top_k - max_remote:
        raise ValueError(f"a node holds {int(local_experts.min())} experts, fewer than top_k − "
                         f"max_remote = {top_k - max_remote}: the limit cannot be met")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices       # [T, E]
    remote = expert_node[order] != token_node.unsqueeze(1)                          # [T, E]
    allowed = ~remote | (torch.cumsum(remote.to(torch.int64), dim=1) <= max_remote)
    take = allowed & (torch.cumsum(allowed.to(torch.int64), dim=1) <= top_k)
    # Every row takes exactly k (the check above); boolean indexing keeps each row's order.
    return order[take].reshape(T, top_k)


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
        ranks_per_node: topology-aware routing: ranks of the expert-parallel group per node
            (ranks r with equal r // ranks_per_node share a node); None = off. Needs
            max_remote_choices.
        max_remote_choices: topology-aware routing: at most this many of a token's k experts
            (0 <= m <= k) may live on other nodes than the token's rank; the others are the
            best-scoring experts of its own node. None = off. Applies when a fusedmoe.MoE with
            an expert-parallel group (W ranks, experts in contiguous blocks of E / W) uses the
            gate, or when forward() is given world_size and token_rank; one process holding every
            expert is one node, where the limit never binds.
    Parameters:
        weight: [E, H].  bias: [E] or None.
    Attributes (None unless the kind has them):
        noise_weight: [E, H] parameter (noisy gate).  selection_bias: [E] buffer (sigmoid gate).
    """

    kind = "softmax"

    def __init__(self, d_model: int, num_experts: int, top_k: int = 2, *, bias: bool = False,
                 renormalize: bool = True, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 ranks_per_node: Optional[int] = None, max_remote_choices: Optional[int] = None):
        super().__init__()
        self.d_model = _check_positive(d_model, "d_model")
        self.num_experts = _check_positive(num_experts, "num_experts")
        self.top_k = _check_positive(top_k, "top_k")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k = {top_k}: must be in [1, num_experts = {num_experts}]")
        if (ranks_per_node is None) != (max_remote_choices is None):
            raise ValueError("ranks_per_node, max_remote_choices: set both (topology-aware routing) or neither")
        if ranks_per_node is not None:
            _check_positive(ranks_per_node, "ranks_per_node")
            if isinstance(max_remote_choices, bool) or not isinstance(max_remote_choices, int) \
                    or not 0 <= max_remote_choices <= self.top_k:
                raise ValueError(f"max_remote_choices = {max_remote_choices!r}: must be an integer in "
                                 f"[0, top_k = {self.top_k}]")
            if self.kind == "gshard":
                # GShard's random second-expert drop is part of its top-2 selection, which a
                # forced routing replaces; the two cannot be combined.
                raise ValueError("ranks_per_node: gate 'gshard' has no topology-aware routing")
        self.ranks_per_node = ranks_per_node
        self.max_remote_choices = max_remote_choices
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

    @property
    def node_limited(self) -> bool:
        """Whether topology-aware routing is on and can bind (max_remote_choices < top_k)."""
        return self.max_remote_choices is not None and self.max_remote_choices < self.top_k

    def selection_scores(self, probs: torch.Tensor) -> torch.Tensor:
        """What the top-k selection ranks: the probabilities, plus selection_bias when present.

        Args:
            probs: [T, E] gate probabilities (reference.Routing.probs).
        Returns:
            [T, E], detached.
        """
        score = probs.detach()
        if self.selection_bias is not None:
            score = score + self.selection_bias.detach().to(score.dtype)
        return score

    def node_limited_topk(self, scores: torch.Tensor, world_size: int,
                          token_rank: Union[int, torch.Tensor]) -> torch.Tensor:
        """The topology-aware selection (node_limited_topk) for a layer over `world_size` ranks.

        Experts lie in contiguous blocks of E / W per rank; rank r is on node r // ranks_per_node.

        Args:
            scores: [T, E] selection scores (selection_scores()).
            world_size: W ranks of the expert-parallel group (E % W == 0).
            token_rank: the rank holding the tokens (int), or [T] integer ranks, one per token.
        Returns:
            [T, k] int64 expert indices (the plain top-k when the option is off).
        """
        E = self.num_experts
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1 or E % world_size:
            raise ValueError(f"world_size = {world_size!r}: must be a positive divisor of num_experts = {E}")
        rpn = self.ranks_per_node or world_size
        m = self.top_k if self.max_remote_choices is None else self.max_remote_choices
        expert_node = torch.arange(E, device=scores.device) // (E // world_size) // rpn
        token_node = torch.as_tensor(token_rank, device=scores.device, dtype=torch.int64) // rpn
        return node_limited_topk(scores, self.top_k, expert_node, token_node, m)

    def forward(self, x: torch.Tensor, *, seed: int = 0, token_offset: int = 0,
                world_size: int = 1, token_rank: Union[int, torch.Tensor] = 0):
        """Routes tokens with the plain-PyTorch reference (training mode follows self.training).

        Args:
            x: [T, H] tokens.
            seed: noise key (training mode of stochastic gates).
            token_offset: global index of x's first token.
            world_size: W ranks the experts are spread over (topology-aware routing only).
            token_rank: the rank holding x (int) or [T] ranks per token (topology-aware routing).
        Returns:
            (topk_idx int64 [T, k] (-1 = none), topk_weight [T, k] in x's dtype, differentiable).
        """
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [T, d_model = {self.d_model}]")
        config = MoeConfig(hidden_size=self.d_model, ffn_size=1, num_experts=self.num_experts,
                           **self.config_fields())
        args = (x, self.weight, self.bias, self.noise_weight, self.selection_bias, config)
        kwargs = {"training": self.training, "seed": seed, "token_offset": token_offset}
        r = reference.route(*args, **kwargs)
        if self.node_limited and world_size > 1:
            forced = self.node_limited_topk(self.selection_scores(r.probs), world_size, token_rank)
            r = reference.route(*args, **kwargs, forced_topk_idx=forced)
        return r.topk_idx, r.topk_weight.to(x.dtype)

    def extra_repr(self) -> str:
        text = (f"kind={self.kind}, d_model={self.d_model}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, bias={self.bias is not None}, renormalize={self.renormalize}")
        if self.ranks_per_node is not None:
            text += f", ranks_per_node={self.ranks_per_node}, max_remote_choices={self.max_remote_choices}"
        return text


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
                 device: Optional[Union[str, torch.device]] = None,
                 ranks_per_node: Optional[int] = None, max_remote_choices: Optional[int] = None):
        super().__init__(d_model, num_experts, top_k, bias=bias, renormalize=renormalize,
                         dtype=dtype, device=device, ranks_per_node=ranks_per_node,
                         max_remote_choices=max_remote_choices)
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
                 device: Optional[Union[str, torch.device]] = None,
                 ranks_per_node: Optional[int] = None, max_remote_choices: Optional[int] = None):
        super().__init__(d_model, num_experts, top_k, bias=bias, renormalize=renormalize,
                         dtype=dtype, device=device, ranks_per_node=ranks_per_node,
                         max_remote_choices=max_remote_choices)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, d_model, dtype=self.weight.dtype,
                                                     device=self.weight.device))

    @property
    def stochastic(self) -> bool:
        return True


class SwitchGate(BaseGate):
    """Switch Transformer gate: top-1, weight = p (never renormalised), jitter in training.

    Args:
        d_model, num_experts, bias, dtype, device, ranks_per_node, max_remote_choices: as BaseGate.
        jitter_eps: the router sees x ⊙ U(1 − eps, 1 + eps) in training (0 = off).
    """

    kind = "switch"

    def __init__(self, d_model: int, num_experts: int, *, bias: bool = False,
                 jitter_eps: float = 1e-2, dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None,
                 ranks_per_node: Optional[int] = None, max_remote_choices: Optional[int] = None):
        super().__init__(d_model, num_experts, 1, bias=bias, renormalize=False, dtype=dtype,
                         device=device, ranks_per_node=ranks_per_node,
                         max_remote_choices=max_remote_choices)
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
              device: Optional[Union[str, torch.device]] = None,
              ranks_per_node: Optional[int] = None,
              max_remote_choices: Optional[int] = None) -> BaseGate:
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
        ranks_per_node, max_remote_choices: topology-aware routing (BaseGate); not for "gshard".
    Raises:
        ValueError naming `gate` for an unknown name, `top_k` for a k the gate cannot use.
    """
    kind = normalize_gate_kind(name, "gate")
    common = {"bias": bias, "dtype": dtype, "device": device}
    if ranks_per_node is not None or max_remote_choices is not None:
        if kind == "gshard":
            raise ValueError("ranks_per_node: gate 'gshard' has no topology-aware routing")
        common.update(ranks_per_node=ranks_per_node, max_remote_choices=max_remote_choices)
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
