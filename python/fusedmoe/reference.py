# python/fusedmoe/reference.py — the MoE layer in plain, vectorised PyTorch, with exactly the
# semantics of include/fusedmoe/config.hpp and moe_layer.hpp: all five gates (softmax, sigmoid with
# selection bias, noisy, Switch with jitter, GShard with random routing), capacity with per-rank
# groups and choice-major slot order, all FFN kinds, shared experts, expert and gate biases, and
# the aux (load-balancing) and z losses. Differentiable through torch autograd.
#
# Two uses: the independent oracle of tests/python (compared with the torch ops), and the
# "plain PyTorch MoE" baseline (fusedmoe.MoE(..., backend="reference")).
#
# Training mode is supported: the noise (noisy gate ε, Switch jitter, GShard's uniform) comes from
# fusedmoe/noise.py, a numpy uint64 port of the counter-based generator of
# include/fusedmoe/noise.hpp, so the reference draws the very numbers the library draws.
#
# Precision: the router (logits, probabilities, top-k, weights, losses) runs in `router_dtype`
# (float64 by default, like the CPU backend); the expert FFNs run in x's dtype.
#
# Definitions (T tokens of all ranks, E experts, k = top_k):
#   logits   l = r·Wgᵀ + bg, r = x (or x ⊙ jitter for Switch in training);
#            noisy gate in training: l += ε ⊙ softplus(x·Wnᵀ)
#   probs    p = softmax(l), or sigmoid(l) for the sigmoid gate
#   top-k    the k largest p (+ selection_bias for sigmoid); ties to the lower expert index
#   weights  w = p[sel] / Σ p[sel] when renormalising (always for gshard, never for switch)
#   gshard   in training the second choice is dropped (index -1, weight 0) when 2·w₂ < u
#   capacity per source rank q: C_q = min(T_q, ceil(cf·T_q·k/E)), slots granted choice-major
#   aux      E · Σ_e f_e · mean_t q_{t,e},  f_e = routed_count_e / (T·k),
#            q = p (softmax gates) or s / Σ s (sigmoid); f carries no gradient
#   z        mean_t logsumexp(l_t)²
# Test: tests/python/test_ops_forward.py, test_ops_backward.py, test_training_mode.py.
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import noise
from .config import MoeConfig

__all__ = [
    "Routing",
    "route",
    "apply_capacity",
    "balance_losses",
    "activation",
    "expert_ffn",
    "resolve_tokens_per_rank",
    "moe_forward",
]


@dataclass
class Routing:
    """Result of route() and apply_capacity() (T tokens, E experts, k choices).

    Attributes:
        logits: [T, E] router logits (router dtype), incl. noise / jitter in training.
        probs: [T, E] softmax(logits), or sigmoid(logits) for the sigmoid gate.
        lse: [T] logsumexp(logits).
        selected: [T, k] int64 chosen experts before GShard's random drop (-1 only if forced).
        topk_idx: [T, k] int64 experts used; -1 = none.
        topk_weight: [T, k] gate weights (router dtype; 0 where topk_idx = -1), differentiable.
        kept: [T, k] bool, set by apply_capacity(): (t, j) is computed.
        expert_counts: [E] int64 assignments before capacity (apply_capacity()).
        kept_counts: [E] int64 assignments computed (apply_capacity()).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    lse: torch.Tensor
    selected: torch.Tensor
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor
    kept: Optional[torch.Tensor] = None
    expert_counts: Optional[torch.Tensor] = None
    kept_counts: Optional[torch.Tensor] = None


def _as_config(config: Union[str, MoeConfig]) -> MoeConfig:
    return MoeConfig.from_string(config) if isinstance(config, str) else config


def renormalises(config: MoeConfig) -> bool:
    """Whether the gate divides its k weights by their sum (switch: never; gshard: always)."""
    if config.gate == "switch":
        return False
    if config.gate == "gshard":
        return True
    return bool(config.renormalize)


def route(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor],
          noise_weight: Optional[torch.Tensor], selection_bias: Optional[torch.Tensor],
          config: Union[str, MoeConfig], *, training: bool = False, seed: int = 0,
          token_offset: int = 0, forced_topk_idx: Optional[torch.Tensor] = None,
          router_dtype: torch.dtype = torch.float64) -> Routing:
    """The gate: logits, probabilities, top-k selection and gate weights.

    Args:
        x: [T, H] tokens.
        gate_weight: [E, H] router weight Wg.
        gate_bias: [E] router bias or None.
        noise_weight: [E, H] noise weight Wn of the noisy gate, or None.
        selection_bias: [E] selection-only bias of the sigmoid gate, or None.
        config: MoeConfig or its string (gate, top_k, renormalize, jitter_eps are used).
        training: apply noise / jitter / random routing.
        seed: noise key.
        token_offset: global index of x's first token (noise key).
        forced_topk_idx: [T, k] integer experts to use instead of top-k (-1 = none), or None.
        router_dtype: dtype of the router computation.
    Returns:
        Routing (kept / counts unset; see apply_capacity()).
    """
    c = _as_config(config)
    T, H = x.shape
    E, k = c.num_experts, c.top_k
    device = x.device
    r_in = x.to(router_dtype)
    if c.gate == "switch" and training and c.jitter_eps > 0.0:
        u = noise.uniform(seed, noise.SWITCH_JITTER, T, H, token_offset).to(device, router_dtype)
        r_in = r_in * (1.0 - c.jitter_eps + 2.0 * c.jitter_eps * u)
    logits = r_in @ gate_weight.to(router_dtype).t()
    if gate_bias is not None:
        logits = logits + gate_bias.to(router_dtype)
    if c.gate == "noisy" and training:
        pre = x.to(router_dtype) @ noise_weight.to(router_dtype).t()
        eps = noise.normal(seed, noise.NOISY_GATE, T, E, token_offset).to(device, router_dtype)
        # softplus exactly as the library: x for x > 30, log1p(exp(x)) otherwise.
        softplus = torch.where(pre > 30.0, pre, torch.log1p(torch.exp(torch.clamp(pre, max=30.0))))
        logits = logits + eps * softplus
    lse = torch.logsumexp(logits, dim=-1) if T > 0 else logits.new_zeros((0,))
    probs = torch.sigmoid(logits) if c.gate == "sigmoid" else torch.softmax(logits, dim=-1)

    if forced_topk_idx is not None:
        selected = forced_topk_idx.to(device=device, dtype=torch.int64)
    else:
        score = probs.detach()
        if c.gate == "sigmoid" and selection_bias is not None:
            score = score + selection_bias.detach().to(router_dtype)
        # Stable descending sort: ties go to the lower expert index, as in the library.
        selected = torch.sort(score, dim=-1, descending=True, stable=True).indices[:, :k]
    valid = selected >= 0
    picked = torch.gather(probs, 1, selected.clamp(min=0)) * valid
    if renormalises(c):
        denom = picked.sum(dim=-1, keepdim=True)
        weight = picked / torch.where(denom > 0, denom, torch.ones_like(denom))
    else:
        weight = picked
    topk_idx = selected.clone()
    if c.gate == "gshard" and training and forced_topk_idx is None and T > 0:
        u = noise.uniform(seed, noise.GSHARD_SECOND, T, 1, token_offset)[:, 0].to(device, router_dtype)
        drop = 2.0 * weight[:, 1].detach() < u
        topk_idx[:, 1] = torch.where(drop, torch.full_like(topk_idx[:, 1], -1), topk_idx[:, 1])
        keep = torch.stack([torch.ones_like(drop), ~drop], dim=1)
        weight = weight * keep
    return Routing(logits=logits, probs=probs, lse=lse, selected=selected, topk_idx=topk_idx,
                   topk_weight=weight)


def resolve_tokens_per_rank(config: Union[str, MoeConfig], num_tokens: int,
                            tokens_per_rank: Sequence[int] = ()) -> list:
    """The W rank shares of T tokens (empty = even split), checked as in the library.

    Args:
        config: MoeConfig or its string (world_size is used).
        num_tokens: T.
        tokens_per_rank: W non-negative counts summing to T, or empty.
    Returns:
        list of W ints.
    """
    c = _as_config(config)
    W = c.world_size
    if len(tokens_per_rank) == 0:
        if num_tokens % W != 0:
            raise ValueError(f"tokens_per_rank: empty, but T = {num_tokens} is not a multiple of "
                             f"world_size = {W}")
        return [num_tokens // W] * W
    shares = [int(v) for v in tokens_per_rank]
    if len(shares) != W or any(v < 0 for v in shares) or sum(shares) != num_tokens:
        raise ValueError(f"tokens_per_rank: {shares} must be {W} non-negative counts summing to {num_tokens}")
    return shares


def apply_capacity(routing: Routing, config: Union[str, MoeConfig],
                   tokens_per_rank: Sequence[int] = ()) -> Routing:
    """Capacity drops and counts: fills routing.kept, expert_counts, kept_counts.

    Each source rank q (its tokens are the next T_q rows of x) grants every expert at most
    C_q = config.capacity(T_q) slots, in choice-major order (all first choices in token order,
    then all second choices, ...). Entries with topk_idx = -1 take no slot.

    Args:
        routing: from route().
        config: MoeConfig or its string.
        tokens_per_rank: [W] tokens of each rank (empty = even split).
    Returns:
        the same Routing, completed.
    """
    c = _as_config(config)
    idx = routing.topk_idx
    T, k = idx.shape
    E = c.num_experts
    shares = resolve_tokens_per_rank(c, T, tokens_per_rank)
    kept = torch.zeros_like(idx, dtype=torch.bool)
    valid = idx >= 0
    begin = 0
    for share in shares:
        seg = idx[begin:begin + share]                                 # [T_q, k]
        flat = seg.t().reshape(-1)                                     # choice-major [k·T_q]
        key = torch.where(flat >= 0, flat, torch.full_like(flat, E))   # no expert → sorts last
        order = torch.sort(key, stable=True).indices
        sorted_key = key[order]
        group_size = torch.bincount(sorted_key, minlength=E + 1)
        group_start = torch.cumsum(group_size, 0) - group_size
        slot = torch.empty_like(flat)
        slot[order] = torch.arange(flat.numel(), device=flat.device) - group_start[sorted_key]
        keep_flat = (flat >= 0) & (slot < c.capacity(share))
        kept[begin:begin + share] = keep_flat.reshape(k, share).t()
        begin += share
    routing.kept = kept
    routing.expert_counts = torch.bincount(idx[valid], minlength=E)
    routing.kept_counts = torch.bincount(idx[kept], minlength=E)
    return routing


def balance_losses(routing: Routing, config: Union[str, MoeConfig]) -> tuple:
    """The aux (load-balancing) loss and the router z-loss of a routing.

    Args:
        routing: from apply_capacity() (expert_counts set).
        config: MoeConfig or its string.
    Returns:
        (aux_loss, z_loss): 0-dim tensors of the router dtype (0 when T = 0).
    """
    c = _as_config(config)
    T = routing.probs.shape[0]
    if T == 0:
        zero = routing.probs.sum() * 0.0
        return zero, zero
    p = routing.probs
    q = p / p.sum(dim=-1, keepdim=True) if c.gate == "sigmoid" else p
    f = routing.expert_counts.to(p.dtype) / float(T * c.top_k)
    aux = float(c.num_experts) * (f * q.mean(dim=0)).sum()
    z = (routing.lse * routing.lse).mean()
    return aux, z


def activation(kind: str, h: torch.Tensor) -> torch.Tensor:
    """The scalar activation of an FFN kind (relu / exact gelu for MLPs; silu / gelu gates).

    Args:
        kind: "relu", "gelu", "swiglu" or "geglu".
        h: any tensor.
    """
    if kind == "relu":
        return torch.relu(h)
    if kind in ("gelu", "geglu"):
        return F.gelu(h, approximate="none")
    if kind == "swiglu":
        return F.silu(h)
    raise ValueError(f"ffn: unknown FFN kind {kind!r}")


def expert_ffn(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
               b2: Optional[torch.Tensor], kind: str) -> torch.Tensor:
    """One expert: act(x·w1 + b1)·w2 + b2, gated kinds act(g) ⊙ u with [g | u] = x·w1 + b1.

    Args:
        x: [n, H] rows.
        w1: [H, N1] (N1 = I, or 2I for gated kinds).
        b1: [N1] or None.
        w2: [I, H].
        b2: [H] or None.
        kind: "relu", "gelu", "swiglu" or "geglu".
    Returns:
        [n, H].
    """
    h = x @ w1
    if b1 is not None:
        h = h + b1
    if kind in ("swiglu", "geglu"):
        width = w2.shape[0]
        a = activation(kind, h[:, :width]) * h[:, width:]
    else:
        a = activation(kind, h)
    out = a @ w2
    if b2 is not None:
        out = out + b2
    return out


def moe_forward(x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: Optional[torch.Tensor],
                noise_weight: Optional[torch.Tensor], selection_bias: Optional[torch.Tensor],
                w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], shared_w1: Optional[torch.Tensor],
                shared_b1: Optional[torch.Tensor], shared_w2: Optional[torch.Tensor],
                shared_b2: Optional[torch.Tensor], forced_topk_idx: Optional[torch.Tensor],
                config: Union[str, MoeConfig], tokens_per_rank: Sequence[int] = (),
                training: bool = False, seed: int = 0, token_offset: int = 0,
                backend: Optional[str] = None, *, router_dtype: torch.dtype = torch.float64):
    """The whole layer; same arguments and outputs as torch.ops.fusedmoe.moe_forward.

    Shapes (T tokens, H hidden, E experts, S shared experts, I / Is ffn sizes, N1 / Ns1 = I / Is
    or twice that for gated kinds, k = top_k):

    Args:
        x: [T, H].
        gate_weight: [E, H].  gate_bias: [E] or None.
        noise_weight: [E, H] (noisy gate) or None.  selection_bias: [E] (sigmoid gate) or None.
        w1: [E, H, N1].  b1: [E, N1] or None.  w2: [E, I, H].  b2: [E, H] or None.
        shared_w1: [S, H, Ns1] or None.  shared_b1: [S, Ns1] or None.
        shared_w2: [S, Is, H] or None.  shared_b2: [S, H] or None.
        forced_topk_idx: [T, k] integer routing to use instead of top-k, or None.
        config: MoeConfig or its string.
        tokens_per_rank: [W] tokens of each emulated rank (empty = even split).
        training: noise / jitter / random routing on.
        seed: noise key.  token_offset: global index of x's first token.
        backend: ignored (accepted so that calls match the op's).
        router_dtype: dtype of the router computation (float64 like the CPU backend).
    Returns:
        (y [T, H], topk_idx int32 [T, k], topk_weight [T, k] (x's dtype), kept bool [T, k],
         expert_counts int64 [E], kept_counts int64 [E], aux_loss 0-dim, z_loss 0-dim);
        y, topk_weight, aux_loss and z_loss are differentiable.
    """
    del backend
    c = _as_config(config)
    T, H = x.shape
    r = route(x, gate_weight, gate_bias, noise_weight, selection_bias, c, training=training,
              seed=seed, token_offset=token_offset, forced_topk_idx=forced_topk_idx,
              router_dtype=router_dtype)
    apply_capacity(r, c, tokens_per_rank)
    aux, z = balance_losses(r, c)

    acc = torch.zeros(T, H, dtype=router_dtype, device=x.device)
    for e in range(c.num_experts):
        token_idx, choice = torch.nonzero((r.topk_idx == e) & r.kept, as_tuple=True)
        if token_idx.numel() == 0:
            continue
        out = expert_ffn(x[token_idx], w1[e], None if b1 is None else b1[e], w2[e],
                         None if b2 is None else b2[e], c.ffn)
        contribution = r.topk_weight[token_idx, choice].unsqueeze(1) * out.to(router_dtype)
        acc = acc.index_add(0, token_idx, contribution)
    for s in range(c.num_shared_experts):
        out = expert_ffn(x, shared_w1[s], None if shared_b1 is None else shared_b1[s], shared_w2[s],
                         None if shared_b2 is None else shared_b2[s], c.ffn)
        acc = acc + out.to(router_dtype)
    y = acc.to(x.dtype)
    return (y, r.topk_idx.to(torch.int32), r.topk_weight.to(x.dtype), r.kept, r.expert_counts,
            r.kept_counts, aux.to(x.dtype), z.to(x.dtype))
