# python/fusedmoe/distributed.py — expert parallelism over a torch.distributed process group.
#
# fusedmoe.MoE(group=g) with a group of W ranks holds E / W experts per rank (contiguous blocks:
# expert e on rank e // (E / W)) and a replicated gate. Its forward, on each rank:
#   1. routes its own tokens (the gate, capacity per source rank, balance losses over its tokens);
#   2. sends every kept (token, j) row to the rank owning its expert (all_to_all, with autograd);
#   3. runs its local experts on the rows it received with the fused op (each row through its
#      expert: the op with k = 1 and the row's local expert forced, so the weight is exactly 1);
#   4. returns the rows (all_to_all) and combines them with the gate weights.
# Replicated parameters (gate, shared experts) need their gradients summed over the group —
# allreduce_replicated_grads(model, group), or DDP over the data-parallel group. Expert
# parameters are local: reduce them only over replicas of the same experts.
# This is the modular path with torch's collectives; the fused single-kernel path with
# GPU-initiated transfers replaces steps 2–4 when it exists.
# Test: tests/python/test_expert_parallel.py (2 gloo processes equal one process).
from __future__ import annotations

from typing import List

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from . import reference


def group_size(group) -> int:
    """Ranks of a process group (None = 1; anything with size() counts as a group)."""
    if group is None:
        return 1
    if callable(getattr(group, "size", None)):
        return int(group.size())
    return dist.get_world_size(group)


def _exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv


def expert_parallel_forward(moe, tokens: torch.Tensor, seed: int) -> tuple:
    """The expert-parallel forward of fusedmoe.MoE `moe` on this rank's tokens [T, H].

    Returns (y [T, H], routing) where routing is reference.Routing (for the losses and counts).
    """
    group = moe.group
    world = group_size(group)
    config = moe.config_for(tokens.dtype)
    E, k, H = moe.num_experts, moe.top_k, moe.d_model
    per_rank = E // world
    g = moe.gate
    routing = reference.route(tokens, g.weight, g.bias, g.noise_weight, g.selection_bias, config,
                              training=moe.training, seed=seed, router_dtype=tokens.dtype)
    routing = reference.apply_capacity(routing, config, [tokens.shape[0]])

    # Rows to send, grouped by destination rank, in (expert, token, j) order.
    flat_idx = routing.topk_idx.reshape(-1)
    flat_kept = routing.kept.reshape(-1)
    pairs = torch.nonzero(flat_kept & (flat_idx >= 0), as_tuple=False).reshape(-1)
    experts = flat_idx[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]
    dest = experts // per_rank
    send_counts = torch.bincount(dest, minlength=world).to(torch.int64)
    recv_counts = _exchange_counts(send_counts, group)
    send_rows = tokens.index_select(0, pairs // k)
    in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
    recv_rows = all_to_all_single(torch.empty(sum(out_splits), H, dtype=tokens.dtype, device=tokens.device),
                                  send_rows, out_splits, in_splits, group=group)
    local_expert = (experts - dest * per_rank).to(torch.int32)
    recv_expert = torch.empty(sum(out_splits), dtype=torch.int32, device=tokens.device)
    dist.all_to_all_single(recv_expert, local_expert, out_splits, in_splits, group=group)

    # Local experts: the fused op, each row through its expert (k = 1, forced, weight 1).
    ex = moe.experts
    inner = config.replace(num_experts=per_rank, top_k=1, gate="softmax", renormalize=True,
                           capacity_factor=0.0, num_shared_experts=0, shared_ffn_size=0, gate_bias=False)
    gate_zero = torch.zeros(per_rank, H, dtype=tokens.dtype, device=tokens.device)
    out = torch.ops.fusedmoe.moe_forward(
        recv_rows, gate_zero, None, None, None, ex.w1, ex.b1, ex.w2, ex.b2, None, None, None, None,
        recv_expert.reshape(-1, 1), inner.to_string(), [], False, 0, 0, moe.backend)
    expert_rows = out[0]

    # Back to the source ranks, then the weighted sum over each token's k results.
    returned = all_to_all_single(torch.empty(sum(in_splits), H, dtype=tokens.dtype, device=tokens.device),
                                 expert_rows, in_splits, out_splits, group=group)
    weights = routing.topk_weight.reshape(-1)[pairs].to(tokens.dtype)
    y = torch.zeros_like(tokens).index_add(0, pairs // k, returned * weights.unsqueeze(1))
    if moe.shared_experts is not None:
        sh = moe.shared_experts
        for s in range(moe.num_shared_experts):
            y = y + reference.expert_ffn(tokens, sh.w1[s], None if sh.b1 is None else sh.b1[s], sh.w2[s],
                                         None if sh.b2 is None else sh.b2[s], moe.ffn)
    return y, routing


def allreduce_replicated_grads(model: torch.nn.Module, group=None) -> List[str]:
    """Sums, over `group`, the gradients of every parameter that the expert-parallel MoE layers
    of `model` replicate (gate and shared experts). Expert parameters are left alone.

    Returns the names of the reduced parameters.
    """
    from .moe import MoE
    local = set()
    for module in model.modules():
        if isinstance(module, MoE) and group_size(module.group) > 1:
            local.update(id(p) for p in module.experts.parameters())
    reduced = []
    for name, p in model.named_parameters():
        if p.grad is not None and id(p) not in local:
            dist.all_reduce(p.grad, group=group)
            reduced.append(name)
    return reduced
