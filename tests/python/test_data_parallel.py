# tests/python/test_data_parallel.py — fusedmoe.MoE under data parallelism, gloo on the CPU:
#   - torch DistributedDataParallel, 2 processes: the averaged gradients and one SGD step equal
#     one process on the concatenated batch;
#   - FSDP2 (torch.distributed.fsdp.fully_shard), 2 processes: the same, with sharded parameters;
#   - expert parallel × data parallel, 4 processes (2 × 2, fusedmoe.distributed.
#     expert_data_parallel_groups): with allreduce_grads, and with DDP over the non-expert
#     parameters plus allreduce_expert_grads, the gradients equal one process holding every
#     expert and every token.
# A small model around the layer (Linear → MoE → tanh → Linear), fp64, dropless; the task loss
# only (a balance loss is not additive over batch shards: each rank's is over its own tokens).
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedmoe
from fusedmoe import distributed

E, H, I, K, T_PER_RANK = 4, 12, 10, 2, 7
LR = 0.1


class Net(nn.Module):
    """Linear → MoE → tanh → Linear on [T, H] tokens."""

    def __init__(self, group=None):
        super().__init__()
        self.inp = nn.Linear(H, H, dtype=torch.float64)
        self.moe = fusedmoe.MoE(E, H, I, top_k=K, gate="softmax", ffn="swiglu", num_shared_experts=1,
                                gate_bias=True, expert_bias=True, group=group, dtype=torch.float64)
        self.out = nn.Linear(H, H, dtype=torch.float64)

    def forward(self, x):
        return self.out(torch.tanh(self.moe(self.inp(x))))


def reference_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def copy_weights(net, full, ep_rank=0, ep_size=1):
    """net's parameters from the one-process `full` (experts: this expert-parallel rank's block)."""
    per = E // ep_size
    src = dict(full.named_parameters())
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(src[name][ep_rank * per:(ep_rank + 1) * per] if name.startswith("moe.experts.") else src[name])


def batch(world):
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(world * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    dy = torch.randn(world * T_PER_RANK, H, dtype=torch.float64, generator=gen)
    return x, dy


def single_process(world):
    """One process, the whole batch: gradients of Σ_t y_t·dy_t and the parameters after one SGD
    step on the rank-averaged gradient (what data parallelism with a per-rank sum loss steps on)."""
    net = reference_net()
    x, dy = batch(world)
    (net(x) * dy).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        stepped = {n: p - LR * p.grad / world for n, p in net.named_parameters()}
    return grads, stepped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run(fn, world):
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(fn, args=(world, free_port(), results), nprocs=world, join=True)
    return dict(results)


# --- DDP ---------------------------------------------------------------------------------------
def ddp_worker(rank, world, port, results):
    init(rank, world, port)
    try:
        net = Net()
        copy_weights(net, reference_net())
        model = nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        x, dy = batch(world)
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        (model(x[mine]) * dy[mine]).sum().backward()
        grads = {n: p.grad.clone() for n, p in net.named_parameters()}
        opt.step()
        results[rank] = dict(grads=grads, params={n: p.detach().clone() for n, p in net.named_parameters()})
    finally:
        dist.destroy_process_group()


def test_ddp_equals_one_process_on_the_whole_batch():
    world = 2
    results = run(ddp_worker, world)
    grads, stepped = single_process(world)
    for rank in range(world):
        for name, g in grads.items():
            # DDP averages over the ranks; each rank's loss sums over its own tokens.
            assert rel(results[rank]["grads"][name] * world, g) < 1e-12, f"rank {rank}: gradient of {name}"
            assert rel(results[rank]["params"][name], stepped[name]) < 1e-13, f"rank {rank}: {name} after the step"


# --- FSDP2 -------------------------------------------------------------------------------------
def fsdp_worker(rank, world, port, results):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    init(rank, world, port)
    try:
        net = Net()
        copy_weights(net, reference_net())
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(net.moe, mesh=mesh)   # the MoE layer is its own unit: gathered around its op call
        fully_shard(net, mesh=mesh)
        assert isinstance(net.moe.experts.w1, DTensor)
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        x, dy = batch(world)
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        (net(x[mine]) * dy[mine]).sum().backward()
        grads = {n: p.grad.full_tensor() for n, p in net.named_parameters()}
        local = {n: tuple(p.to_local().shape) for n, p in net.named_parameters()}
        opt.step()
        results[rank] = dict(grads=grads, local=local,
                             params={n: p.detach().full_tensor() for n, p in net.named_parameters()})
    finally:
        dist.destroy_process_group()


def test_fsdp2_equals_one_process_on_the_whole_batch():
    world = 2
    results = run(fsdp_worker, world)
    grads, stepped = single_process(world)
    for rank in range(world):
        r = results[rank]
        assert r["local"]["moe.experts.w1"] == (E // world, H, 2 * I), "experts sharded on dim 0"
        for name, g in grads.items():
            assert rel(r["grads"][name] * world, g) < 1e-12, f"rank {rank}: gradient of {name}"
            assert rel(r["params"][name], stepped[name]) < 1e-13, f"rank {rank}: {name} after the step"


# --- expert parallel × data parallel -----------------------------------------------------------
EP = 2


def ep_dp_worker(rank, world, port, results):
    init(rank, world, port)
    try:
        ep_group, edp_group = distributed.expert_data_parallel_groups(EP)
        ep_rank = dist.get_rank(ep_group)
        x, dy = batch(world)
        mine = slice(rank * T_PER_RANK, (rank + 1) * T_PER_RANK)
        full = reference_net()
        out = dict(ep_ranks=dist.get_process_group_ranks(ep_group), edp_ranks=dist.get_process_group_ranks(edp_group))

        # 1. allreduce_grads: gate, shared experts and the Linears over every rank, experts over
        #    the ranks holding the same experts.
        net = Net(ep_group)
        copy_weights(net, full, ep_rank, EP)
        (net(x[mine]) * dy[mine]).sum().backward()
        out["reduced"] = distributed.allreduce_grads(net, None, edp_group)
        out["sum"] = {n: p.grad.clone() for n, p in net.named_parameters()}

        # 2. DDP over every rank for the non-expert parameters (averaging), the expert parameters
        #    excluded from it and averaged over their expert data-parallel group.
        net = Net(ep_group)
        copy_weights(net, full, ep_rank, EP)
        ignored = distributed.expert_parameter_names(net)
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(net, ignored)
        model = nn.parallel.DistributedDataParallel(net)
        (model(x[mine]) * dy[mine]).sum().backward()
        out["ignored"] = ignored
        out["expert_reduced"] = distributed.allreduce_expert_grads(net, edp_group, scale=1.0 / world)
        out["ddp"] = {n: p.grad.clone() for n, p in net.named_parameters()}
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_expert_and_data_parallel_equal_one_process():
    world = 4
    results = run(ep_dp_worker, world)
    grads, _ = single_process(world)
    per = E // EP
    expert_names = sorted(n for n in grads if n.startswith("moe.experts."))
    for rank in range(world):
        r = results[rank]
        ep_rank = rank % EP
        assert r["ep_ranks"] == [rank - ep_rank, rank - ep_rank + 1]
        assert r["edp_ranks"] == [ep_rank, ep_rank + EP]
        assert sorted(r["reduced"]["experts"]) == expert_names == sorted(r["ignored"]) == sorted(r["expert_reduced"])
        assert sorted(r["reduced"]["replicated"]) == sorted(n for n in grads if n not in expert_names)
        for name, g in grads.items():
            expected = g[ep_rank * per:(ep_rank + 1) * per] if name in expert_names else g
            assert rel(r["sum"][name], expected) < 1e-12, f"rank {rank}: gradient of {name} (allreduce_grads)"
            assert rel(r["ddp"][name] * world, expected) < 1e-12, f"rank {rank}: gradient of {name} (DDP)"
