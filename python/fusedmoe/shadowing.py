# python/fusedmoe/shadowing.py — hot-expert shadowing for expert parallelism (FasterMoE-style).
#
# With expert parallelism (fusedmoe.MoE(..., group=g), see distributed.py) every row routed to
# expert e travels to e's owner rank and back, forward and backward, and the owner of a popular
# expert computes far more rows than the others while they wait. Shadowing replicates a few hot
# experts for one step instead: the owner broadcasts the expert's weights to every rank, each rank
# computes its own rows of that expert locally, and in backward the gradients of the copies are
# summed back into the owner's parameters. Outputs and gradients are those of the plain
# expert-parallel step (up to float rounding); only where the arithmetic runs changes.
#
# Which experts to shadow is decided every step, identically on every rank, from the measured load
# of the step (the kept rows of every (source rank, expert) pair, all-gathered), by a policy:
#   CostModelPolicy  a greedy choice under an explicit cost model (bandwidth, compute rate,
#                    collective latency): shadow the next-hottest expert while the modelled step
#                    time goes down;
#   FixedPolicy      always the same experts (for tests and for measured, known-hot experts).
# Other policies subclass ShadowingPolicy; they must be deterministic functions of their
# arguments, because every rank evaluates them separately and must reach the same decision.
#
# Use: fusedmoe.MoE(..., group=g, shadowing=fusedmoe.shadowing.CostModelPolicy()).
# After each forward, moe.last_shadowed lists the experts that were shadowed.
# Test: tests/python/test_shadowing.py.
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "ExpertCosts",
    "StepTime",
    "ShadowingPolicy",
    "CostModelPolicy",
    "FixedPolicy",
    "expert_costs",
    "check_choice",
    "broadcast_shadow_weights",
]


@dataclass(frozen=True)
class ExpertCosts:
    """Sizes of one routed expert of a layer, as the cost model needs them.

    Attributes:
        row_bytes: bytes of one token row (H · element size): what travels per routed row.
        expert_bytes: bytes of one expert's weights (w1, b1, w2, b2 of one expert): what a
            shadow broadcast sends and what its gradient reduction returns.
        row_flops: floating-point operations of one row through one expert, forward only
            (2·H·N1 + 2·I·H; N1 = I, or 2I for gated FFNs).
    """

    row_bytes: float
    expert_bytes: float
    row_flops: float


def expert_costs(moe, dtype: Optional[torch.dtype] = None) -> ExpertCosts:
    """The ExpertCosts of fusedmoe.MoE `moe` for activations of `dtype`.

    Args:
        moe: a fusedmoe.MoE.
        dtype: element type of the rows and of the weights on the wire (default: the experts').
    Returns:
        ExpertCosts.
    """
    ex = moe.experts
    element = torch.empty((), dtype=dtype or ex.w1.dtype).element_size()
    H, N1, I = ex.d_model, ex.in_width, ex.d_ffn
    weights = H * N1 + I * H + ((N1 + H) if ex.has_bias else 0)
    return ExpertCosts(row_bytes=float(H * element), expert_bytes=float(weights * element),
                       row_flops=float(2 * H * N1 + 2 * I * H))


class StepTime(NamedTuple):
    """A modelled step time, in seconds, and its parts (see CostModelPolicy.step_time)."""

    comm: float     # token rows over the network (all_to_all), at the most loaded rank
    compute: float  # expert FFNs at the most loaded rank
    shadow: float   # broadcasting the shadowed experts (and reducing their gradients)
    total: float


class ShadowingPolicy:
    """Decides which experts an expert-parallel layer shadows in one step.

    Subclasses implement choose(); it runs on every rank with the same arguments and must return
    the same list on every rank (a deterministic function of its arguments).
    """

    def choose(self, counts: torch.Tensor, costs: ExpertCosts) -> List[int]:
        """The experts to shadow this step.

        Args:
            counts: [W, E] int64: rows (kept after capacity) that source rank q sends to expert e
                this step, for the W ranks of the expert-parallel group.
            costs: sizes of one expert of the layer (ExpertCosts).
        Returns:
            ascending global expert indices in [0, E) (empty: no shadowing this step).
        """
        raise NotImplementedError


def _load_matrix(counts: torch.Tensor, world_size: Optional[int]) -> List[List[float]]:
    """counts [W, E], or [E] spread evenly over world_size source ranks, as W lists of floats."""
    if isinstance(counts, list) and counts and isinstance(counts[0], list):
        return counts  # already a matrix of floats (internal calls)
    if not isinstance(counts, torch.Tensor):
        counts = torch.as_tensor(counts)
    if counts.dim() == 1:
        if world_size is None or world_size < 1:
            raise ValueError("counts: a [E] load needs world_size (the source ranks it is spread over)")
        row = [float(v) / world_size for v in counts.tolist()]
        return [list(row) for _ in range(world_size)]
    if counts.dim() != 2:
        raise ValueError(f"counts: shape {tuple(counts.shape)}, expected [W, E] or [E]")
    return [[float(v) for v in r] for r in counts.tolist()]


class CostModelPolicy(ShadowingPolicy):
    """Shadows hot experts when an explicit cost model says the step gets faster.

    The model of one layer's step on W ranks, E experts in contiguous blocks of n = E / W
    (owner(e) = e // n), with c[q][e] rows of source rank q for expert e and a shadowed set S:

        sent_q    = Σ_{e ∉ S, owner(e) ≠ q} c[q][e]            rows rank q sends
        recv_r    = Σ_{e ∉ S, owner(e) = r} Σ_{q ≠ r} c[q][e]   rows rank r receives
        rows_r    = Σ_{e ∉ S, owner(e) = r} Σ_q c[q][e] + Σ_{e ∈ S} c[r][e]   rows rank r computes
        comm      = passes · row_bytes · max_r max(sent_r, recv_r) / bandwidth
        compute   = compute_factor · row_flops · max_r rows_r / flops
        shadow    = |S| · transfers · (latency + expert_bytes / bandwidth)
        total     = comm + compute + shadow

    with passes = 4 (dispatch and combine, and their gradients in backward), compute_factor = 3
    (forward, input gradient, weight gradient) and transfers = 2 (the weight broadcast and the
    gradient reduction); with backward=False: 2, 1 and 1. The all_to_all lasts as long as its
    busiest rank, and every rank waits for the busiest expert rank, hence the maxima. A broadcast
    or a reduction of one expert is modelled as one latency plus one pass of its bytes over a
    link (pipelined ring / tree collectives move every byte over each link about once).

    choose() is greedy, as in FasterMoE: experts in descending global load (ties: lower index),
    each added to S while it lowers `total` (strictly); the first that does not ends the search.

    Args:
        bandwidth: bytes per second one rank sends (and receives) over the network; the default
            25e9 is a 200 Gb/s link per GPU. Measure it (an all_to_all benchmark) for real use.
        flops: sustained floating-point operations per second of the expert FFNs on one rank
            (default 4e14, a Hopper GPU's 16-bit grouped GEMMs).
        latency: seconds of fixed cost of one broadcast or reduction (default 2e-5).
        max_shadowed: at most this many experts per step (None: no limit).
        backward: model a training step (forward + backward); False models inference.
    """

    def __init__(self, bandwidth: float = 25e9, flops: float = 4e14, latency: float = 2e-5,
                 max_shadowed: Optional[int] = None, backward: bool = True):
        for name, value in (("bandwidth", bandwidth), ("flops", flops)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r}: must be a positive finite number")
        if not (isinstance(latency, (int, float)) and math.isfinite(latency) and latency >= 0):
            raise ValueError(f"latency = {latency!r}: must be a finite number >= 0")
        if max_shadowed is not None and (isinstance(max_shadowed, bool) or not isinstance(max_shadowed, int)
                                         or max_shadowed < 0):
            raise ValueError(f"max_shadowed = {max_shadowed!r}: must be None or an integer >= 0")
        self.bandwidth = float(bandwidth)
        self.flops = float(flops)
        self.latency = float(latency)
        self.max_shadowed = max_shadowed
        self.backward = bool(backward)

    def step_time(self, counts: torch.Tensor, shadowed: Sequence[int], costs: ExpertCosts,
                  world_size: Optional[int] = None) -> StepTime:
        """The modelled time of one step with `shadowed` experts replicated.

        Args:
            counts: [W, E] rows of source rank q for expert e, or [E] global rows (then spread
                evenly over `world_size` source ranks).
            shadowed: global expert indices in S.
            costs: ExpertCosts of the layer.
            world_size: W, needed only for [E] counts.
        Returns:
            StepTime (seconds).
        """
        c = _load_matrix(counts, world_size)
        W, E = len(c), len(c[0]) if c else 0
        if W == 0 or E % W != 0:
            raise ValueError(f"counts: {E} experts over {W} ranks; expected a multiple of the ranks")
        n = E // W
        S = set(int(e) for e in shadowed)
        sent, recv, rows = [0.0] * W, [0.0] * W, [0.0] * W
        for e in range(E):
            owner = e // n
            for q in range(W):
                if e in S:
                    rows[q] += c[q][e]
                else:
                    rows[owner] += c[q][e]
                    if q != owner:
                        sent[q] += c[q][e]
                        recv[owner] += c[q][e]
        passes, compute_factor, transfers = (4, 3, 2) if self.backward else (2, 1, 1)
        comm = passes * costs.row_bytes * max(max(sent), max(recv)) / self.bandwidth
        compute = compute_factor * costs.row_flops * max(rows) / self.flops
        shadow = len(S) * transfers * (self.latency + costs.expert_bytes / self.bandwidth)
        return StepTime(comm, compute, shadow, comm + compute + shadow)

    def choose(self, counts: torch.Tensor, costs: ExpertCosts,
               world_size: Optional[int] = None) -> List[int]:
        """The greedy choice (class docstring).

        Args:
            counts: [W, E] int64 rows per (source rank, expert), or [E] with `world_size`.
            costs: ExpertCosts of the layer.
            world_size: W, needed only for [E] counts.
        Returns:
            ascending expert indices to shadow.
        """
        c = _load_matrix(counts, world_size)
        E = len(c[0]) if c else 0
        load = [sum(c[q][e] for q in range(len(c))) for e in range(E)]
        candidates = sorted((e for e in range(E) if load[e] > 0), key=lambda e: (-load[e], e))
        limit = E if self.max_shadowed is None else self.max_shadowed
        chosen: List[int] = []
        best = self.step_time(c, chosen, costs).total
        for e in candidates[:limit]:
            t = self.step_time(c, chosen + [e], costs).total
            if not t < best:
                break
            chosen.append(e)
            best = t
        return sorted(chosen)

    def __repr__(self) -> str:
        return (f"CostModelPolicy(bandwidth={self.bandwidth:g}, flops={self.flops:g}, "
                f"latency={self.latency:g}, max_shadowed={self.max_shadowed}, backward={self.backward})")


class FixedPolicy(ShadowingPolicy):
    """Shadows the same experts every step.

    Args:
        experts: global expert indices (any order, no duplicates).
    """

    def __init__(self, experts: Sequence[int]):
        experts = [int(e) for e in experts]
        if len(set(experts)) != len(experts) or any(e < 0 for e in experts):
            raise ValueError(f"experts = {experts}: must be distinct indices >= 0")
        self.experts = sorted(experts)

    def choose(self, counts: torch.Tensor, costs: ExpertCosts) -> List[int]:
        """Args: as ShadowingPolicy.choose (unused). Returns: the fixed experts, ascending."""
        return list(self.experts)

    def __repr__(self) -> str:
        return f"FixedPolicy({self.experts})"


def check_choice(choice, num_experts: int) -> List[int]:
    """A policy's answer as an ascending list of distinct ints in [0, num_experts).

    Args:
        choice: the sequence of expert indices a ShadowingPolicy returned.
        num_experts: E.
    Raises:
        ValueError naming the policy's answer when it is not such a list.
    """
    try:
        out = sorted(int(e) for e in choice)
    except (TypeError, ValueError):
        raise ValueError(f"shadowing: the policy returned {choice!r}, not a list of expert indices") from None
    if len(set(out)) != len(out) or any(not 0 <= e < num_experts for e in out):
        raise ValueError(f"shadowing: the policy returned {out}; expected distinct experts in "
                         f"[0, num_experts = {num_experts})")
    return out


class _BroadcastShadows(torch.autograd.Function):
    """Forward: row i of the result is the flat weights of shadowed expert i, broadcast from its
    owner. Backward: row i of the gradient is summed over the group onto the owner (a reduce),
    which returns it as the gradient of its flat weights. One autograd node for all shadowed
    experts keeps the order of these collectives the same on every rank."""

    @staticmethod
    def forward(ctx, group, owners, rank, anchor, *flats):
        del anchor  # only makes the result require grad on ranks that own no shadowed expert
        ctx.group, ctx.owners, ctx.rank = group, owners, rank
        out = flats[0].new_empty((len(owners), flats[0].shape[0]))
        for i, owner in enumerate(owners):
            if owner == rank:
                out[i].copy_(flats[i])
            dist.broadcast(out[i], group=group, group_src=owner)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # reduce() overwrites its buffer
        grads = []
        for i, owner in enumerate(ctx.owners):
            dist.reduce(grad[i], group=ctx.group, group_dst=owner, op=dist.ReduceOp.SUM)
            grads.append(grad[i] if owner == ctx.rank else None)
        return (None, None, None, None, *grads)


def broadcast_shadow_weights(moe, shadowed: Sequence[int], rank: int) -> tuple:
    """Copies of the shadowed experts' weights on every rank of moe.group, with autograd.

    Collective: every rank of the group calls it with the same `shadowed`. The owner of each
    expert (rank e // (E / W)) sends its weights; in backward the gradients of all copies are
    summed into the owner's parameters (moe.experts.w1[e - owner·E/W] etc.), so a step with
    shadowing accumulates the same gradients as one without.

    Args:
        moe: a fusedmoe.MoE with an expert-parallel group.
        shadowed: S ascending global expert indices.
        rank: this process's rank in moe.group.
    Returns:
        (w1 [S, H, N1], b1 [S, N1] or None, w2 [S, I, H], b2 [S, H] or None), contiguous.
    """
    ex = moe.experts
    per_rank = moe.num_experts // moe.world_size
    H, N1, I = ex.d_model, ex.in_width, ex.d_ffn
    parts = [("w1", (H, N1)), ("b1", (N1,)), ("w2", (I, H)), ("b2", (H,))]
    if not ex.has_bias:
        parts = [p for p in parts if p[0] in ("w1", "w2")]
    width = sum(math.prod(shape) for _, shape in parts)
    owners = [e // per_rank for e in shadowed]
    flats = []
    for e, owner in zip(shadowed, owners):
        if owner == rank:
            local = e - owner * per_rank
            flats.append(torch.cat([getattr(ex, name)[local].reshape(-1) for name, _ in parts]))
        else:
            flats.append(ex.w1.new_empty((width,)))
    # Backward must run on every rank (the reductions are collectives), also on ranks whose
    # inputs carry no gradient: the anchor requires grad whenever the experts do.
    anchor = torch.zeros((), dtype=ex.w1.dtype, device=ex.w1.device,
                         requires_grad=ex.w1.requires_grad and torch.is_grad_enabled())
    stacked = _BroadcastShadows.apply(moe.group, owners, rank, anchor, *flats)
    out, offset = {}, 0
    for name, shape in parts:
        size = math.prod(shape)
        out[name] = stacked[:, offset:offset + size].reshape(len(shadowed), *shape).contiguous()
        offset += size
    return out["w1"], out.get("b1"), out["w2"], out.get("b2")
