# tests/python/test_shadowing.py — hot-expert shadowing (fusedmoe.shadowing).
#
# The cost model and the greedy choice against hand-computed numbers; then 2 gloo processes on the
# CPU with routing skewed towards expert 3 (a large gate bias): the cost-model policy picks it, and
# with any set of shadowed experts (the policy's, one expert of each rank, every expert) the
# outputs, dx and every gradient equal the expert-parallel step without shadowing and one process
# holding every expert. fp64, dropless.
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedmoe
from fusedmoe import distributed
from fusedmoe.shadowing import (CostModelPolicy, ExpertCosts, FixedPolicy, ShadowingPolicy, StepTime,
                                check_choice, expert_costs)

WORLD = 2
E, H, I, K, T_PER_RANK = 4, 16, 12, 2, 9
HOT, WARM = 3, 2            # both owned by rank 1
HOT_BIAS, WARM_BIAS = 4.0, 0.5  # added to their router biases: every token picks HOT


# --- the cost model, by hand -----------------------------------------------------------------
# W = 2 ranks, E = 4 (experts 0, 1 on rank 0; 2, 3 on rank 1). Rows of source rank q for expert e:
COUNTS = torch.tensor([[10, 2, 40, 1],
                       [10, 2, 50, 1]])
UNIT = ExpertCosts(row_bytes=1.0, expert_bytes=10.0, row_flops=1.0)


def unit_policy(**kw):
    return CostModelPolicy(bandwidth=1.0, flops=1.0, latency=0.0, **kw)


def test_step_time_by_hand():
    p = unit_policy()
    # S = {}: sent = (41, 12), recv = (12, 41) → comm 4·41; rows = (24, 92) → compute 3·92.
    assert p.step_time(COUNTS, [], UNIT) == StepTime(164.0, 276.0, 0.0, 440.0)
    # S = {2}: sent = (1, 12), recv = (12, 1) → 4·12; rows = (24 + 40, 2 + 50) → 3·64; 2·10 shadow.
    assert p.step_time(COUNTS, [2], UNIT) == StepTime(48.0, 192.0, 20.0, 260.0)
    # S = {0, 2}: sent = (1, 2), recv = (2, 1) → 4·2; rows = (4 + 10 + 40, 2 + 10 + 50) → 3·62.
    assert p.step_time(COUNTS, [0, 2], UNIT) == StepTime(8.0, 186.0, 40.0, 234.0)
    # S = {0, 1, 2}: sent = (1, 0), recv = (0, 1) → 4·1; rows = (52, 64) → 3·64; 3·20.
    assert p.step_time(COUNTS, [0, 1, 2], UNIT) == StepTime(4.0, 192.0, 60.0, 256.0)
    # Inference: 2 passes, compute once, one transfer per shadowed expert.
    f = unit_policy(backward=False)
    assert f.step_time(COUNTS, [], UNIT) == StepTime(82.0, 92.0, 0.0, 174.0)
    assert f.step_time(COUNTS, [2], UNIT) == StepTime(24.0, 64.0, 10.0, 98.0)
    # Latency: each shadowed expert pays 2 · (latency + expert_bytes / bandwidth).
    lat = CostModelPolicy(bandwidth=1.0, flops=1.0, latency=5.0)
    assert lat.step_time(COUNTS, [2], UNIT).shadow == 30.0
    # Real units: bandwidth 1e3 B/s, 1e3 FLOP/s → every term 1000x smaller.
    assert CostModelPolicy(bandwidth=1e3, flops=1e3, latency=0.0).step_time(COUNTS, [2], UNIT).total \
        == pytest.approx(0.260, rel=1e-15)
    # [E] counts are spread evenly over world_size ranks: (10, 2, 45, 1) per rank.
    # S = {}: sent = (46, 12) → 4·46; rows = (24, 92) → 3·92.
    assert p.step_time(COUNTS.sum(0), [], UNIT, world_size=2) == StepTime(184.0, 276.0, 0.0, 460.0)


def test_greedy_choice_by_hand():
    # Candidates by load: 2 (90), 0 (20), 1 (4), 3 (2). 440 → 260 (take 2) → 234 (take 0) →
    # 256 (1 does not help: stop).
    assert unit_policy().choose(COUNTS, UNIT) == [0, 2]
    assert unit_policy(max_shadowed=1).choose(COUNTS, UNIT) == [2]
    assert unit_policy(max_shadowed=0).choose(COUNTS, UNIT) == []
    # Inference: 174 → 98 (2) → 86 (0: comm 4, compute 62, shadow 20) → 96 (1: stop).
    assert unit_policy(backward=False).step_time(COUNTS, [0, 2], UNIT).total == 86.0
    assert unit_policy(backward=False).choose(COUNTS, UNIT) == [0, 2]
    # Heavier experts: shadowing 2 costs 2·100 and the step stays at 440 — not strictly better.
    heavy = ExpertCosts(row_bytes=1.0, expert_bytes=100.0, row_flops=1.0)
    assert unit_policy().step_time(COUNTS, [2], heavy).total == 440.0
    assert unit_policy().choose(COUNTS, heavy) == []
    # Balanced load: nothing to gain.
    assert unit_policy().choose(torch.full((2, 4), 5), UNIT) == []
    # No load at all: no candidate.
    assert unit_policy().choose(torch.zeros(2, 4, dtype=torch.int64), UNIT) == []
    # Defaults are realistic: a tiny expert is never worth a 20 µs broadcast.
    tiny = ExpertCosts(row_bytes=128.0, expert_bytes=4928.0, row_flops=1152.0)
    assert CostModelPolicy().choose(COUNTS, tiny) == []


def test_expert_costs_of_a_layer():
    layer = fusedmoe.MoE(E, H, I, top_k=K, ffn="swiglu", expert_bias=True, dtype=torch.float64)
    # w1 [16, 24] + b1 [24] + w2 [12, 16] + b2 [16] = 616 numbers of 8 bytes;
    # 2·16·24 + 2·12·16 FLOP per row.
    assert expert_costs(layer) == ExpertCosts(row_bytes=128.0, expert_bytes=4928.0, row_flops=1152.0)
    mlp = fusedmoe.MoE(E, H, I, top_k=K, ffn="relu", dtype=torch.float32)
    assert expert_costs(mlp) == ExpertCosts(row_bytes=64.0, expert_bytes=4.0 * (16 * 12 + 12 * 16),
                                            row_flops=2.0 * 16 * 12 * 2)


def test_argument_checks():
    with pytest.raises(ValueError, match="bandwidth"):
        CostModelPolicy(bandwidth=0.0)
    with pytest.raises(ValueError, match="latency"):
        CostModelPolicy(latency=-1.0)
    with pytest.raises(ValueError, match="max_shadowed"):
        CostModelPolicy(max_shadowed=-1)
    with pytest.raises(ValueError, match="distinct"):
        FixedPolicy([1, 1])
    with pytest.raises(ValueError, match="num_experts = 4"):
        check_choice([4], 4)
    with pytest.raises(ValueError, match="not a list"):
        check_choice(None, 4)
    assert check_choice((3, 1), 4) == [1, 3]
    with pytest.raises(TypeError, match="shadowing"):
        fusedmoe.MoE(E, H, I, shadowing="yes")
    with pytest.raises(NotImplementedError):
        ShadowingPolicy().choose(COUNTS, UNIT)
    # Without a group the policy has nothing to do and the layer runs as usual.
    layer = fusedmoe.MoE(E, H, I, shadowing=FixedPolicy([0]), dtype=torch.float64)
    layer(torch.randn(3, H, dtype=torch.float64))
    assert layer.last_shadowed == []


# --- two processes ---------------------------------------------------------------------------
# The distributed policy: unit bandwidth and compute rate on this layer's real sizes
# (row 128 B, expert 4928 B, 1152 FLOP per row): moving the hot expert's rows off rank 1 saves
# far more than its two transfers cost.
def dist_policy():
    return CostModelPolicy(bandwidth=1.0, flops=1.0, latency=0.0)


VARIANTS = {
    "cost_model": dist_policy,
    "one_per_rank": lambda: FixedPolicy([0, HOT]),
    "all": lambda: FixedPolicy(range(E)),
}


def build(group, seed=0, shadowing=None):
    torch.manual_seed(seed)
    layer = fusedmoe.MoE(E, H, I, top_k=K, gate="softmax", ffn="swiglu", num_shared_experts=1,
                         gate_bias=True, expert_bias=True, group=group, shadowing=shadowing,
                         dtype=torch.float64)
    with torch.no_grad():
        layer.gate.bias[HOT] += HOT_BIAS
        layer.gate.bias[WARM] += WARM_BIAS
    return layer


def inputs():
    gen = torch.Generator().manual_seed(123)
    x_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    dy_all = torch.randn(WORLD * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    return x_all, dy_all


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        single = dict(build(None).named_parameters())
        x_all, dy_all = inputs()
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        per = E // WORLD
        out = {}
        for name, make in [("plain", lambda: None), *VARIANTS.items()]:
            layer = build(dist.group.WORLD, shadowing=make())
            with torch.no_grad():  # the same weights: this rank's slice of the experts
                for pname, p in layer.named_parameters():
                    full = single[pname]
                    p.copy_(full[rank * per:(rank + 1) * per] if pname.startswith("experts.") else full)
            x = x_all[mine].clone().requires_grad_(True)
            y = layer(x)
            (y * dy_all[mine]).sum().backward()
            distributed.allreduce_replicated_grads(layer, dist.group.WORLD)
            out[name] = dict(y=y.detach(), dx=x.grad, shadowed=list(layer.last_shadowed),
                             counts=layer.last_kept_counts.clone(),
                             grads={n: p.grad.clone() for n, p in layer.named_parameters()})
        results[rank] = out
    finally:
        dist.destroy_process_group()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def test_shadowed_steps_equal_unshadowed_and_single_process():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=WORLD, join=True)

    single = build(None)
    x_all, dy_all = inputs()
    x = x_all.clone().requires_grad_(True)
    y = single(x)
    (y * dy_all).sum().backward()
    idx = single.last_topk_idx.long()
    counts = torch.stack([torch.bincount(idx[q * T_PER_RANK:(q + 1) * T_PER_RANK].reshape(-1), minlength=E)
                          for q in range(WORLD)])
    assert (idx == HOT).any(dim=1).all(), "the skew: every token routes to the hot expert"

    # The policy's decision, made on both ranks from the all-gathered [W, E] load.
    layer_costs = expert_costs(single)
    expected = dist_policy().choose(counts, layer_costs)
    # With these inputs: shadowing HOT lowers the modelled step, adding WARM raises it again.
    times = [dist_policy().step_time(counts, s, layer_costs).total for s in ([], [HOT], [WARM, HOT])]
    assert times[1] < times[0] and times[2] > times[1], (counts, times)
    assert expected == [HOT]
    wanted = {"plain": [], "cost_model": expected, "one_per_rank": [0, HOT], "all": list(range(E))}

    per = E // WORLD
    for rank in range(WORLD):
        r = results[rank]
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        assert torch.equal(r["plain"]["counts"], counts[rank])
        for name, run in r.items():
            assert run["shadowed"] == wanted[name], f"rank {rank}, {name}: shadowed experts"
            for what, got, ep, one in (("y", run["y"], r["plain"]["y"], y.detach()[mine]),
                                       ("dx", run["dx"], r["plain"]["dx"], x.grad[mine])):
                assert rel(got, ep) < 1e-13, f"rank {rank}, {name}: {what} vs the unshadowed step"
                assert rel(got, one) < 1e-12, f"rank {rank}, {name}: {what} vs one process"
            for pname, p in single.named_parameters():
                full = p.grad[rank * per:(rank + 1) * per] if pname.startswith("experts.") else p.grad
                assert rel(run["grads"][pname], r["plain"]["grads"][pname]) < 1e-13, \
                    f"rank {rank}, {name}: gradient of {pname} vs the unshadowed step"
                assert rel(run["grads"][pname], full) < 1e-12, f"rank {rank}, {name}: gradient of {pname}"
