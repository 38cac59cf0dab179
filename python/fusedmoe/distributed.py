# python/fusedmoe/distributed.py — expert parallelism over a torch.distributed process group.
#
# fusedmoe.MoE(group=g) with a group of W ranks holds E / W experts per rank (contiguous blocks:
# expert e on rank e // (E / W)) and a replicated gate. Its forward, on each rank:
#   1. routes its own tokens (the gate, capacity per source rank, balance losses over its tokens);
#   2. sends every kept (token, j) row to the rank owning its expert (all_to_all, with autograd);
#   3. runs its local experts on the rows it received with the fused op (each row through its
#      expert: the op with k = 1 and the row's local expert forced, so the weight is exactly 1);
#   4. returns the rows (all_to_all) and combines them with the gate weights.
# Options of step 1 and 2: a topology-aware gate (gates.py: ranks_per_node, max_remote_choices)
# routes through forced expert indices computed here; hot-expert shadowing (shadowing.py,
# MoE(shadowing=policy)) computes the rows of the experts its policy picks on their source ranks
# with broadcast copies of their weights instead of sending the rows.
# Replicated parameters (gate, shared experts) need their gradients summed over the group —
# allreduce_replicated_grads(model, group), or DDP over the data-parallel group. Expert
# parameters are local: reduce them only over replicas of the same experts. With expert and
# data parallelism together (W = ep · dp ranks), expert_data_parallel_groups() makes the groups
# and allreduce_grads() reduces each parameter over the ranks that hold a copy of it.
# This is the modular path with torch's collectives. The fused single-kernel path with
# GPU-initiated transfers: init_fused_transport(group) binds the fused op (backend "fused") to an
# NCCL communicator of the group; the op then runs router, dispatch, experts and combine of this
# rank in one kernel, writing into its peers' memory directly.
# Test: tests/python/test_expert_parallel.py (2 gloo processes equal one process),
# test_shadowing.py, test_topology_gate.py, test_data_parallel.py.
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_to_all_single

from . import reference, shadowing


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


def _gather_counts(counts: torch.Tensor, group, world: int) -> torch.Tensor:
    """[W, E]: every rank's [E] counts, row q from rank q of the group."""
    parts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(parts, counts.contiguous(), group=group)
    return torch.stack(parts)


def _local_expert_rows(moe, rows: torch.Tensor, expert: torch.Tensor, w1, b1, w2, b2,
                       config) -> torch.Tensor:
    """Each row through its expert (of the given stacked weights) with the fused op: k = 1 and
    the row's expert forced, so the gate weight is exactly 1.

    Args: rows [n, H]; expert [n] int32 in [0, len(w1)); w1 [m, H, N1]; b1 [m, N1] or None;
    w2 [m, I, H]; b2 [m, H] or None; config: the layer's MoeConfig. Returns [n, H].
    """
    m, H = w1.shape[0], rows.shape[1]
    inner = config.replace(num_experts=m, top_k=1, gate="softmax", renormalize=True,
                           capacity_factor=0.0, num_shared_experts=0, shared_ffn_size=0, gate_bias=False)
    gate_zero = torch.zeros(m, H, dtype=rows.dtype, device=rows.device)
    out = torch.ops.fusedmoe.moe_forward(
        rows, gate_zero, None, None, None, w1, b1, w2, b2, None, None, None, None,
        expert.reshape(-1, 1), inner.to_string(), [], False, 0, 0, moe.backend,
        save_for_backward=torch.is_grad_enabled() and (rows.requires_grad or w1.requires_grad))
    return out[0]


def expert_parallel_forward(moe, tokens: torch.Tensor, seed: int,
                            forced_topk_idx: Optional[torch.Tensor] = None) -> tuple:
    """The expert-parallel forward of fusedmoe.MoE `moe` on this rank's tokens.

    Collective over moe.group: every rank calls it once per layer call.

    Args:
        moe: a fusedmoe.MoE with an expert-parallel group of W > 1 ranks.
        tokens: [T, H] this rank's tokens (T may differ between ranks).
        seed: noise key of stochastic gates (training).
        forced_topk_idx: [T, k] integer routing to use instead of the gate's top-k, or None.
    Returns:
        (y [T, H], routing) where routing is reference.Routing (for the losses and counts).
        Sets moe.last_shadowed (the experts shadowed in this call, ascending; [] without).
    """
    group = moe.group
    world = group_size(group)
    rank = dist.get_rank(group)
    config = moe.config_for(tokens.dtype)
    E, k, H = moe.num_experts, moe.top_k, moe.d_model
    per_rank = E // world
    g = moe.gate
    route_args = (tokens, g.weight, g.bias, g.noise_weight, g.selection_bias, config)
    route_kwargs = {"training": moe.training, "seed": seed, "router_dtype": tokens.dtype}
    routing = reference.route(*route_args, **route_kwargs, forced_topk_idx=forced_topk_idx)
    if forced_topk_idx is None and g.node_limited:
        # Topology-aware gate: select from the same scores under the per-token limit of experts
        # on other nodes, then route with that selection forced (weights, losses, counts follow).
        forced = g.node_limited_topk(g.selection_scores(routing.probs), world, rank)
        routing = reference.route(*route_args, **route_kwargs, forced_topk_idx=forced)
    routing = reference.apply_capacity(routing, config, [tokens.shape[0]])

    # Kept (token, j) rows in (expert, token, j) order.
    flat_idx = routing.topk_idx.reshape(-1)
    flat_kept = routing.kept.reshape(-1)
    pairs = torch.nonzero(flat_kept & (flat_idx >= 0), as_tuple=False).reshape(-1)
    experts = flat_idx[pairs]
    order = torch.argsort(experts, stable=True)
    pairs, experts = pairs[order], experts[order]

    # Shadowing: the same decision on every rank, from the step's [W, E] kept counts.
    shadowed: List[int] = []
    if moe.shadowing is not None:
        counts = _gather_counts(routing.kept_counts, group, world)
        choice = moe.shadowing.choose(counts, shadowing.expert_costs(moe, tokens.dtype))
        shadowed = shadowing.check_choice(choice, E)
    moe.last_shadowed = shadowed
    if shadowed:
        is_shadowed = torch.zeros(E, dtype=torch.bool, device=tokens.device)
        is_shadowed[shadowed] = True
        here = is_shadowed[experts]
        travel_pos = torch.nonzero(~here, as_tuple=False).reshape(-1)
        local_pos = torch.nonzero(here, as_tuple=False).reshape(-1)
        t_pairs, t_experts = pairs[travel_pos], experts[travel_pos]
    else:
        t_pairs, t_experts = pairs, experts

    # Rows to send, grouped by destination rank (ascending experts = ascending ranks).
    dest = t_experts // per_rank
    send_counts = torch.bincount(dest, minlength=world).to(torch.int64)
    recv_counts = _exchange_counts(send_counts, group)
    send_rows = tokens.index_select(0, t_pairs // k)
    in_splits, out_splits = send_counts.tolist(), recv_counts.tolist()
    recv_rows = all_to_all_single(torch.empty(sum(out_splits), H, dtype=tokens.dtype, device=tokens.device),
                                  send_rows, out_splits, in_splits, group=group)
    local_expert = (t_experts - dest * per_rank).to(torch.int32)
    recv_expert = torch.empty(sum(out_splits), dtype=torch.int32, device=tokens.device)
    dist.all_to_all_single(recv_expert, local_expert, out_splits, in_splits, group=group)

    ex = moe.experts
    expert_rows = _local_expert_rows(moe, recv_rows, recv_expert, ex.w1, ex.b1, ex.w2, ex.b2, config)

    # Back to the source ranks.
    returned = all_to_all_single(torch.empty(sum(in_splits), H, dtype=tokens.dtype, device=tokens.device),
                                 expert_rows, in_splits, out_splits, group=group)
    if shadowed:
        # The shadowed experts' rows never left this rank: run them on the broadcast copies and
        # put every row back at its place in `pairs`, so the combine below sums in the same order.
        sw1, sb1, sw2, sb2 = shadowing.broadcast_shadow_weights(moe, shadowed, rank)
        slot = torch.full((E,), -1, dtype=torch.int32, device=tokens.device)
        slot[shadowed] = torch.arange(len(shadowed), dtype=torch.int32, device=tokens.device)
        l_pairs = pairs[local_pos]
        local_rows = _local_expert_rows(moe, tokens.index_select(0, l_pairs // k), slot[experts[local_pos]],
                                        sw1, sb1, sw2, sb2, config)
        rows = tokens.new_zeros(pairs.shape[0], H).index_copy(0, travel_pos, returned) \
                                                  .index_copy(0, local_pos, local_rows)
    else:
        rows = returned

    # The weighted sum over each token's k results.
    weights = routing.topk_weight.reshape(-1)[pairs].to(tokens.dtype)
    y = torch.zeros_like(tokens).index_add(0, pairs // k, rows * weights.unsqueeze(1))
    if moe.shared_experts is not None:
        sh = moe.shared_experts
        for s in range(moe.num_shared_experts):
            y = y + reference.expert_ffn(tokens, sh.w1[s], None if sh.b1 is None else sh.b1[s], sh.w2[s],
                                         None if sh.b2 is None else sh.b2[s], moe.ffn)
    return y, routing


def _expert_parameter_ids(model: torch.nn.Module) -> set:
    from .moe import MoE
    ids = set()
    for module in model.modules():
        if isinstance(module, MoE) and group_size(module.group) > 1:
            ids.update(id(p) for p in module.experts.parameters())
    return ids


def expert_parameter_names(model: torch.nn.Module) -> List[str]:
    """Names (as in model.named_parameters()) of the expert parameters of every expert-parallel
    fusedmoe.MoE in `model`: the ones each rank holds a different slice of.

    For DDP over the whole data-parallel world, exclude them from DDP (e.g. with
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model) and
    reduce them with allreduce_expert_grads over their expert data-parallel group.

    Args:
        model: any nn.Module.
    """
    ids = _expert_parameter_ids(model)
    return [name for name, p in model.named_parameters() if id(p) in ids]


def _allreduce_coalesced(grads: List[torch.Tensor], group, scale: float) -> None:
    """Sums the tensors over `group` in place, one collective per (dtype, device), then scales."""
    buckets: Dict[tuple, List[torch.Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.dtype, g.device), []).append(g)
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, group=group)
        if scale != 1.0:
            flat.mul_(scale)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def allreduce_replicated_grads(model: torch.nn.Module, group=None, *, scale: float = 1.0) -> List[str]:
    """Sums, over `group`, the gradients of every parameter of `model` except the expert
    parameters of its expert-parallel fusedmoe.MoE layers (those are local to each rank).

    Args:
        model: any nn.Module.
        group: the ranks over which these parameters are replicated (None = the default group).
        scale: multiplies the sums (e.g. 1 / W when every rank's loss is a mean over its tokens).
    Returns:
        the names of the reduced parameters.
    """
    local = _expert_parameter_ids(model)
    named = [(name, p) for name, p in model.named_parameters() if p.grad is not None and id(p) not in local]
    _allreduce_coalesced([p.grad for _, p in named], group, float(scale))
    return [name for name, _ in named]


def allreduce_expert_grads(model: torch.nn.Module, expert_group, *, scale: float = 1.0) -> List[str]:
    """Sums the expert gradients of every expert-parallel fusedmoe.MoE in `model` over
    `expert_group`, the ranks that hold the same experts (expert_data_parallel_groups()).

    Args:
        model: any nn.Module.
        expert_group: the expert data-parallel group of this rank.
        scale: multiplies the sums.
    Returns:
        the names of the reduced parameters.
    """
    local = _expert_parameter_ids(model)
    named = [(name, p) for name, p in model.named_parameters() if p.grad is not None and id(p) in local]
    _allreduce_coalesced([p.grad for _, p in named], expert_group, float(scale))
    return [name for name, _ in named]


def allreduce_grads(model: torch.nn.Module, group=None, expert_group=None, *,
                    scale: float = 1.0) -> Dict[str, List[str]]:
    """The gradient reduction of expert + data parallelism: every parameter summed over the
    ranks that hold a copy of it.

    Expert parameters of expert-parallel fusedmoe.MoE layers go over `expert_group` (the ranks
    with the same experts; None = no other copy, nothing to do); every other parameter (gates,
    shared experts, attention, embeddings, MoE layers without a group) over `group`. With the
    loss of every rank summed over its own tokens, the result is the gradient of the sum over the
    tokens of all ranks, as one process would compute it; pass scale = 1 / W for the mean when
    each rank's loss is the mean over its tokens (equal token counts).

    Args:
        model: any nn.Module.
        group: the group of every rank (None = the default group).
        expert_group: this rank's expert data-parallel group, or None.
        scale: multiplies every sum.
    Returns:
        {"replicated": names reduced over group, "experts": names reduced over expert_group}.
    """
    replicated = allreduce_replicated_grads(model, group, scale=scale)
    experts = allreduce_expert_grads(model, expert_group, scale=scale) if expert_group is not None else []
    return {"replicated": replicated, "experts": experts}


def expert_data_parallel_groups(expert_parallel_size: int) -> Tuple[object, object]:
    """The process groups of expert parallelism × data parallelism over the default group.

    The W ranks form W / ep expert-parallel groups of ep consecutive ranks ([0, ep), [ep, 2·ep),
    ...): each such group holds every expert once and is the `group` of fusedmoe.MoE. The ranks
    at the same position in these groups (r, r + ep, r + 2·ep, ...) hold the same experts and
    form the expert data-parallel groups, over which expert gradients are summed
    (allreduce_grads / allreduce_expert_grads). Collective: every rank calls it, in the same
    order relative to other new_group calls.

    Args:
        expert_parallel_size: ep, a divisor of the world size.
    Returns:
        (expert_parallel_group, expert_data_parallel_group) of this rank.
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    ep = expert_parallel_size
    if isinstance(ep, bool) or not isinstance(ep, int) or ep < 1 or world % ep != 0:
        raise ValueError(f"expert_parallel_size = {ep!r}: must be a positive divisor of the world size {world}")
    mine_ep = mine_dp = None
    for start in range(0, world, ep):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + ep)))
        if start <= rank < start + ep:
            mine_ep = g
    for offset in range(ep):
        g = dist.new_group(list(range(offset, world, ep)))
        if rank % ep == offset:
            mine_dp = g
    return mine_ep, mine_dp


def init_fused_transport(group=None) -> None:
    """Runs this process's fused forwards (backend "fused") as its rank of `group`, over NCCL.

    Rank 0 of the group creates an NCCL unique id, which travels to the others through the group
    (torch.distributed.broadcast); every rank then joins an NCCL communicator of the group's size
    (fusedmoe's own, on the current CUDA device), whose symmetric memory window holds the fused
    kernel's heaps: the kernel writes rows and flags straight into its peers' heaps (NVLink / P2P).
    After this, a fused op with world_size = W (the group's size) takes this rank's tokens only,
    the same token count on every rank. Collective over `group`; undo with
    close_fused_transport().
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    uid = torch.ops.fusedmoe.nccl_unique_id() if rank == 0 else torch.zeros(128, dtype=torch.uint8)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buffer = uid.to(device)
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    torch.ops.fusedmoe.use_nccl_transport(buffer.cpu(), world, rank)


def close_fused_transport() -> None:
    """Back to emulated ranks in one process; collective over the ranks of the NCCL transport."""
    torch.ops.fusedmoe.use_local_transport()


def fused_transport() -> Dict[str, int]:
    """{"nccl": 0 or 1, "world": W, "rank": r} of the fused kernel's transport."""
    nccl, world, rank = torch.ops.fusedmoe.fused_transport()
    return {"nccl": nccl, "world": world, "rank": rank}
